"""Conversion between the legacy (80 half-layers) and the current checkpoint layout, both directions.

    python conversion/convert_legacy_checkpoint.py LEGACY_DIR OUTPUT_DIR            # legacy -> current
    python conversion/convert_legacy_checkpoint.py CURRENT_DIR OUTPUT_DIR --to legacy

The input is checked completely (shards, index, every tensor and its shape) before anything is written; tensors are
then streamed in input-shard order into sharded safetensors, the tokenizer files are copied, and the output is
verified before it appears under its name. The input is only ever read.
"""

import argparse
import dataclasses
from pathlib import Path

from transformers.utils.logging import tqdm

from ..configuration_zaya import ZayaConfig
from .errors import CheckpointError
from .files import CONFIG_FILE, CheckpointReader, ShardedWriter, copy_companion_files, staged_output, write_json
from .layouts import (
    LAYOUTS,
    Layout,
    check_tensors,
    current_config_to_legacy,
    detect_layout,
    expected_tensor_shapes,
    read_config,
    read_current_tensor,
    tensor_groups,
)
from .verify import CheckpointReport, run_command, verify_checkpoint


def open_checked(folder: Path) -> tuple[CheckpointReader, Layout, ZayaConfig]:
    """Open a checkpoint folder and check it completely (layout, shards, index, tensors, shapes) before any use."""
    reader = CheckpointReader(folder)
    try:
        layout = detect_layout(folder, reader.names)
        config = read_config(folder, layout)
        check_tensors({name: reader.shape(name) for name in reader.names}, expected_tensor_shapes(config, layout), folder)
    except BaseException:
        reader.close()
        raise
    return reader, layout, config


def write_checkpoint(
    reader: CheckpointReader,
    source: Layout,
    target: Layout,
    config: ZayaConfig,
    output: Path,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> None:
    """Write the tensors of `reader` (a checked `source`-layout checkpoint) and its config into `output` in `target`
    layout. `balancing_biases` become fp32 in the current layout, as the model keeps them."""
    shard_order = {name: rank for rank, name in enumerate(reader.shard_names)}
    groups = sorted(tensor_groups(config), key=lambda g: shard_order[reader.location[g.names(source)[0]]])
    writer = ShardedWriter(output, max_shard_size)
    for group in tqdm(groups, desc=f"{source} -> {target}", unit="tensor", disable=not progress):
        tensor = read_current_tensor(reader, group, source)
        if target == "current" and group.current.endswith(".balancing_biases"):
            tensor = tensor.float()
        parts = tensor.unbind(0) if len(group.names(target)) > 1 else (tensor,)  # [E, ...] -> per-expert slices
        for name, part in zip(group.names(target), parts, strict=True):
            writer.add(name, part)
    writer.close()
    config_json = config.to_diff_dict() if target == "current" else current_config_to_legacy(config)
    config_json.pop("auto_map", None)  # a conversion ships no code for it to point to
    write_json(output / CONFIG_FILE, config_json)


def convert_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    to: Layout = "current",
    max_shard_size: int | str = "5GB",
    forward_check: bool = True,
    progress: bool = True,
) -> CheckpointReport:
    """Convert a ZAYA checkpoint folder to the `to` layout (`"current"` or `"legacy"`), detecting the input layout.

    Refuses an output folder that overlaps the input or is not empty. Raises a `CheckpointError` subclass naming the
    problem for any input that is not a complete, consistent checkpoint; the output appears only once verified.
    """
    if to not in LAYOUTS:
        raise ValueError(f"`to` must be one of {LAYOUTS}, got {to!r}.")
    input_dir = Path(input_dir)
    reader, source, config = open_checked(input_dir)
    with reader:
        if source == to:
            raise CheckpointError(f"{input_dir} is already in the {to} layout: nothing to convert.")
        with staged_output(output_dir, input_dir) as staging:
            write_checkpoint(reader, source, to, config, staging, max_shard_size, progress)
            copy_companion_files(input_dir, staging)
            report = verify_checkpoint(staging, forward=forward_check, values=False)  # the input's values were checked
    return dataclasses.replace(report, folder=Path(output_dir))


def main(argv: list[str] | None = None) -> int:
    """Command line: `convert INPUT_DIR OUTPUT_DIR [--to current|legacy]`. Returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Convert a ZAYA1 checkpoint between the legacy (80 half-layers) and the current layout.",
    )
    parser.add_argument("input_dir", type=Path, help="checkpoint folder (config.json + safetensors); only read")
    parser.add_argument("output_dir", type=Path, help="new folder for the result; must not exist or be empty")
    parser.add_argument("--to", choices=LAYOUTS, default="current", help="target layout (default: current)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    parser.add_argument("--no-forward-check", action="store_true", help="skip the forward pass on a slice of the result")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_command(
        lambda: convert_checkpoint(
            args.input_dir,
            args.output_dir,
            to=args.to,
            max_shard_size=args.max_shard_size,
            forward_check=not args.no_forward_check,
            progress=not args.no_progress,
        )
    )
