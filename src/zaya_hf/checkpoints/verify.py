"""Verification of a checkpoint folder: the tensors its config requires, each once, of the right shape and a floating
dtype; no NaN/inf in any of them (a read of the whole checkpoint, one tensor at a time); and a forward pass through the
first layer on a slice of the vocabulary (cheap at any model size)."""

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration_zaya import ZayaConfig
from ..modeling_zaya import ZayaForCausalLM
from .errors import CheckpointError, VerificationError
from .files import CheckpointReader
from .layouts import (
    Layout,
    TensorGroup,
    check_tensors,
    current_tensor_shapes,
    detect_layout,
    expected_tensor_shapes,
    legacy_names,
    read_config,
    read_current_tensor,
)

SLICE_VOCAB_ROWS = 64
SLICE_TOKENS = 8
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class CheckpointReport:
    """What a verification found; `str()` gives a one-line summary."""

    folder: Path
    layout: Layout
    num_tensors: int
    num_shards: int
    num_parameters: int
    forward_checked: bool

    def __str__(self) -> str:
        forward = ", forward pass on a slice ok" if self.forward_checked else ""
        return (
            f"{self.folder}: {self.layout} layout, {self.num_tensors} tensors ({self.num_parameters:,} values) in "
            f"{self.num_shards} shard(s), every expected tensor present once with its shape{forward}"
        )


def run_command(work: Callable[[], CheckpointReport]) -> int:
    """A command line's exit status: print the report of `work` (0), or, as one line, the checkpoint error it raised
    (2, the status of every refused input of the `zaya-hf` commands)."""
    try:
        report = work()
    except (CheckpointError, FileExistsError, FileNotFoundError) as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)  # "zaya-hf convert: error: ...", as argparse
        return 2
    print(report)
    return 0


def check_forward_on_slice(reader: CheckpointReader, layout: Layout, config: ZayaConfig) -> torch.Tensor:
    """Load layer 0, the final norm and the first vocabulary rows through `from_pretrained` into a one-layer model
    and run a forward pass; returns the logits. Fails on tensors that do not load or give non-finite outputs."""
    rows = min(config.vocab_size, SLICE_VOCAB_ROWS)
    slice_config = ZayaConfig.from_dict(
        {
            **config.to_diff_dict(),
            "num_hidden_layers": 1,
            "layer_types": config.layer_types[:1],
            "vocab_size": rows,
            "pad_token_id": None,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    )
    state = {}
    for name in current_tensor_shapes(slice_config):
        group = TensorGroup(name, legacy_names(name, config))  # names of the full model: layer 0 is not the last
        if name in EMBEDDING_NAMES:
            state[name] = reader.get_rows(group.names(layout)[0], rows)
        else:
            state[name] = read_current_tensor(reader, group, layout)
    dtype = state["model.embed_tokens.weight"].dtype
    model = ZayaForCausalLM.from_pretrained(None, config=slice_config, state_dict=state, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.arange(SLICE_TOKENS)[None] % rows).logits
    if not torch.isfinite(logits).all():
        raise VerificationError(f"{reader.folder}: the first layer gives non-finite logits on a test input.")
    return logits


def verify_checkpoint(folder: str | Path, *, forward: bool = True, values: bool = True) -> CheckpointReport:
    """Check a current- or legacy-layout folder: readable shards consistent with their index, exactly the tensors the
    config requires with their shapes and floating dtypes, (`values=True`) no NaN/inf in any tensor, and
    (`forward=True`) a forward pass through the first layer. Without `values` only headers and layer 0 are read."""
    folder = Path(folder)
    with CheckpointReader(folder) as reader:
        layout = detect_layout(folder, reader.names)
        config = read_config(folder, layout)
        shapes = {name: reader.shape(name) for name in reader.names}
        check_tensors(shapes, expected_tensor_shapes(config, layout), folder)
        if values:
            for name in reader.names:
                reader.get(name)  # reading checks for NaN/inf
        if forward:
            check_forward_on_slice(reader, layout, config)
        return CheckpointReport(
            folder=folder,
            layout=layout,
            num_tensors=len(shapes),
            num_shards=len(reader.shard_names),
            num_parameters=sum(torch.Size(shape).numel() for shape in shapes.values()),
            forward_checked=forward,
        )
