"""The bf16 CPU fast paths for CPUs without native bf16 GEMMs (zaya_hf.ops.cpu: fp32 GEMMs over converted weights,
fp32 prefill convs, experts multiplied expert by expert), the intra-op thread rule, and the real-size benchmark's
random checkpoint. The fast paths are forced on (`NATIVE_BF16_MATMUL` patched to False), so they run on any CPU."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_config
from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as ReferenceForCausalLM

import zaya_hf.ops.cpu as cpu_ops
from zaya_hf import ZayaForCausalLM
from zaya_hf.bench.checkpoint import is_random_checkpoint, write_random_checkpoint
from zaya_hf.bench.record import command_line
from zaya_hf.modeling_zaya import ZayaCCAProjection, ZayaExperts

BF16_ULP = 2**-7  # relative spacing of bf16 numbers: fp32 GEMMs differ from bf16 ones by summation order only


@pytest.fixture
def without_native_bf16(monkeypatch):
    monkeypatch.setattr(cpu_ops, "NATIVE_BF16_MATMUL", False)


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("out_features", [7, 300])  # one block, and several blocks of the converted weight
def test_fp32_gemm_equals_f_linear_in_bf16(out_features, monkeypatch):
    monkeypatch.setattr(cpu_ops, "_workspace", type(cpu_ops._workspace)())
    monkeypatch.setattr(cpu_ops, "FP32_GEMM_BLOCK_ELEMENTS", 64 * 33)  # 33 rows of 64 per block
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=gen).bfloat16()
    weight, bias = torch.randn(out_features, 64, generator=gen).bfloat16(), torch.randn(out_features).bfloat16()
    result = cpu_ops.fp32_gemm(x, weight, bias)
    assert result.shape == (2, 5, out_features) and result.dtype == torch.bfloat16
    exact = F.linear(x.float(), weight.float(), bias.float())
    assert relative_error(result, exact) <= BF16_ULP
    assert relative_error(result, F.linear(x, weight, bias)) <= 2 * BF16_ULP


def test_bf16_products_take_the_fp32_gemm_from_four_rows(without_native_bf16):
    weight = torch.randn(8, 16).bfloat16()
    assert not cpu_ops.uses_fp32_gemm(torch.randn(3, 16).bfloat16(), weight)
    assert cpu_ops.uses_fp32_gemm(torch.randn(4, 16).bfloat16(), weight)
    assert not cpu_ops.uses_fp32_gemm(torch.randn(4, 16), weight.float())  # fp32 keeps its own route
    assert not cpu_ops.uses_fp32_gemm(torch.randn(4, 16).bfloat16().requires_grad_(), weight)  # autograd: F.linear


@torch.no_grad()
def test_bf16_experts_by_expert_equal_the_eager_experts(without_native_bf16):
    config = tiny_config(experts_implementation="zaya_by_expert")
    experts = ZayaExperts(config)
    randomize(experts, seed=3)
    experts = experts.bfloat16()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(12, config.hidden_size, generator=gen).bfloat16()
    index = torch.tensor([0, 2, 2, 2, 2, 1, 2, 0, 3, 2, 1, 0])[:, None]  # expert 2 gets 6 tokens: the fp32 route
    weights = torch.rand(12, 1, generator=gen).bfloat16()
    weights[5] = 0  # a skip-class token
    eager = ZayaExperts(tiny_config(experts_implementation="eager")).bfloat16()
    eager.load_state_dict(experts.state_dict())
    expected = eager(hidden, index, weights)
    assert relative_error(experts(hidden, index, weights), expected) <= 2 * BF16_ULP


def test_grouped_mm_asked_for_runs_grouped_mm(without_native_bf16, monkeypatch):
    """`zaya_by_expert` is opt in: bf16 prefill under `grouped_mm` stays `grouped_mm` (transformers' tests check)."""
    from transformers.integrations import moe

    config = tiny_config(experts_implementation="grouped_mm")
    experts = cpu_ops.CPUExperts(config).bfloat16()
    calls = []
    monkeypatch.setitem(moe.ALL_EXPERTS_FUNCTIONS._global_mapping, "grouped_mm",
                        lambda module, *args: calls.append(args[0].shape) or torch.zeros_like(args[0]))
    experts(torch.randn(12, config.hidden_size).bfloat16(), torch.full((12, 1), 2), torch.ones(12, 1).bfloat16())
    assert calls == [torch.Size([12, config.hidden_size])]


@torch.no_grad()
def test_bf16_prefill_conv_in_fp32_equals_the_bf16_conv(without_native_bf16):
    projection = ZayaCCAProjection(tiny_config(cca_time0=3, cca_time1=2), layer_idx=0)
    randomize(projection, seed=4)
    projection = projection.bfloat16()
    window = torch.randn(2, projection.conv_qk_depthwise.in_channels, 9).bfloat16()
    expected = ZayaCCAProjection.causal_conv(projection, window)
    projection.__class__ = cpu_ops.CPUCCAProjection
    assert relative_error(projection.causal_conv(window), expected) <= 2 * BF16_ULP


def test_small_work_runs_on_one_thread_and_the_count_comes_back():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_ops.intra_op_threads(cpu_ops.PARALLEL_MIN_MULTIPLY_ADDS - 1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with cpu_ops.intra_op_threads(cpu_ops.PARALLEL_MIN_MULTIPLY_ADDS):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def test_random_checkpoint_loads_in_both_implementations_with_tokens_spread_over_the_experts(tmp_path):
    config = tiny_config(num_experts=8)
    folder = write_random_checkpoint(tmp_path / "random", config)
    layers = config.num_hidden_layers
    assert is_random_checkpoint(folder, layers) and not is_random_checkpoint(folder, layers + 1)
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    ours = ZayaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    reference = ReferenceForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = torch.randint(1, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0.05, atol=0.05)
    hidden = ours.model.embed_tokens(ids).reshape(-1, config.hidden_size)
    chosen = ours.model.layers[0].mlp.gate(hidden[None])[2]
    assert chosen.unique().numel() >= config.num_experts // 2  # at std 0.02 every token picks the same expert


def test_recorded_command_names_every_option():
    args = argparse.Namespace(layers=4, checkpoint=None, prefill_tokens=[512, 4096], smoke=False, compile=True)
    assert command_line("benchmarks/x.py", args) == "python benchmarks/x.py --layers 4 --prefill-tokens 512 4096 --compile"
