"""Shared fixtures: tiny ZAYA configs, randomised weights, and transformers' own ZAYA as the numerical reference."""

import os

import torch

# Without a GPU the Triton kernels of kernels_zaya are tested in Triton's CPU interpreter; the variable must be set
# before zaya_hf (and so triton) is imported. It changes nothing for kernel_backend "auto" / "torch".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers.models.zaya.configuration_zaya import ZayaConfig as ReferenceConfig  # noqa: E402
from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as ReferenceForCausalLM  # noqa: E402

from zaya_hf import ZayaConfig, ZayaForCausalLM  # noqa: E402

# The tiny test models are dominated by per-op overhead: one intra-op thread is faster, and immune to the
# oversubscription that spinning OpenMP threads suffer when several processes share the CPU.
torch.set_num_threads(1)

TINY = dict(
    vocab_size=101,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    moe_intermediate_size=32,
    router_hidden_size=16,
    layer_types=["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"],
    sliding_window=6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(**overrides) -> ZayaConfig:
    return ZayaConfig(**{**TINY, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every scale, bias, temperature and balancing bias away from its init so that parity tests see them."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if any(key in name for key in ("scale", "norm", "temp")):
            param.copy_(1.0 + 0.3 * noise)
        elif "bias" in name:
            param.copy_(0.2 * noise)
        else:
            param.copy_(0.1 * noise)
    for name, buffer in model.named_buffers():
        if name.endswith("balancing_biases"):
            buffer.copy_(0.05 * torch.randn(buffer.shape, generator=gen))
    return model


def make_pair(config: ZayaConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(ours, reference) with identical random weights, in eval mode."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    ours = randomize(ZayaForCausalLM(config), seed).eval()
    if dtype != torch.float32:
        # Keep the fp32 balancing biases representable in `dtype`: the reference stores them in the model dtype.
        for module in ours.modules():
            if hasattr(module, "balancing_biases"):
                module.balancing_biases.copy_(module.balancing_biases.to(dtype).float())
    reference = ReferenceForCausalLM(ReferenceConfig(**config.to_diff_dict())).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(dtype), reference.to(dtype)


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch: Dynamo's per-function recompile limit (8) counts across tests otherwise."""
    torch._dynamo.reset()


@pytest.fixture
def pair():
    return make_pair()


def left_padded_batch(seed: int = 0, lengths=(9, 6, 11), vocab: int = 101, pad_id: int = 0):
    """input_ids / attention_mask for rows of different lengths, left-padded, plus the unpadded rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask, rows
