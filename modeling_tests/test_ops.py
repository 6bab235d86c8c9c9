"""The package's CPU fast paths (zaya_hf.ops.cpu) against the model's own forwards, which they replace."""

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, make_pair, tiny_config
from torch import nn

from zaya_hf import ZayaForCausalLM
from zaya_hf.modeling_zaya import ZayaCCAProjection, ZayaExperts
from zaya_hf.ops.cpu import (
    CPU_FORWARDS,
    ONEDNN_LINEAR_AVAILABLE,
    CPUAttention,
    CPUCCAProjection,
    CPUExperts,
    CPULinear,
    cpu_linear,
    packed_gqa_sdpa,
    uses_onednn_linear,
)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(scope="module")
def model():
    return make_pair(tiny_config(cca_time0=3, cca_time1=2), seed=21)[0]


def as_model_classes(module: nn.Module) -> nn.Module:
    """`module` with the model's own classes back in place of the CPU fast paths' (as remote code runs it)."""
    model_classes = {fast: base for base, fast in CPU_FORWARDS.items()}
    for child in module.modules():
        child.__class__ = model_classes.get(type(child), type(child))
    return module


def test_cpu_modules_get_the_fast_forwards_and_lose_them_off_the_cpu():
    model = ZayaForCausalLM(tiny_config())
    layer = model.model.layers[0]
    assert type(model.lm_head) is CPULinear and type(layer.self_attn.qkv_proj) is CPUCCAProjection
    assert type(layer.mlp.experts) is CPUExperts and type(layer.mlp.gate.router_mlp.fc1) is CPULinear
    model.to("meta")
    assert type(model.lm_head) is nn.Linear and type(layer.self_attn.qkv_proj) is ZayaCCAProjection
    assert type(layer.mlp.experts) is ZayaExperts


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_the_fast_forwards_equals_the_model_forwards(model, dtype):
    """Prefill then one-token steps of a left-padded batch: bit-identical in bf16, within 1e-5 in fp32 (oneDNN and
    the state-update conv sum in another order)."""
    import copy

    fast = copy.deepcopy(model).to(dtype)
    plain = as_model_classes(copy.deepcopy(fast))
    ids, mask, _ = left_padded_batch(seed=31)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    fast_out, plain_out = fast.generate(ids, **kwargs), plain.generate(ids, **kwargs)
    assert torch.equal(fast_out.sequences, plain_out.sequences)
    for fast_logits, plain_logits in zip(fast_out.logits, plain_out.logits):
        if dtype == torch.bfloat16:
            assert torch.equal(fast_logits, plain_logits)
        else:
            assert (fast_logits - plain_logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_bf16_decode_through_the_native_kernel_is_as_accurate_as_torchs_bf16(monkeypatch):
    """A model whose weights reach `BF16_NATIVE_MIN_WEIGHT_ELEMENTS`: its one-row bf16 products run through zaya_hf's
    kernel, which sums in another order than torch's, so the logits are compared with the fp32 model's: no further
    from them than the model forwards' bf16 logits, and the greedy tokens the same."""
    import copy

    from zaya_hf.ops import cpu, native

    if native.BF16_MATVEC is None:
        pytest.skip(f"the kernels were not built here: {native.NATIVE_UNAVAILABLE}")
    calls = []
    monkeypatch.setattr(cpu, "bf16_matvec", lambda *args: calls.append(args) or native.bf16_matvec(*args))
    config = tiny_config(hidden_size=128, moe_intermediate_size=128, vocab_size=256, num_hidden_layers=2,
                         layer_types=["hybrid", "hybrid_sliding"])
    exact = make_pair(config, seed=5)[0]
    fast = copy.deepcopy(exact).to(torch.bfloat16)
    plain = as_model_classes(copy.deepcopy(fast))
    ids = left_padded_batch(seed=5)[0][-1:]  # one unpadded row: a batch-1 decode, one row per product
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    fast_out, plain_out = fast.generate(ids, **kwargs), plain.generate(ids, **kwargs)
    assert calls, "the kernel was not used"
    assert torch.equal(fast_out.sequences, plain_out.sequences)
    reference = exact(fast_out.sequences, attention_mask=torch.ones_like(fast_out.sequences)).logits
    for step, (fast_logits, plain_logits) in enumerate(zip(fast_out.logits, plain_out.logits)):
        expected = reference[:, ids.shape[1] - 1 + step]
        fast_error = (fast_logits.float() - expected).abs().max()
        plain_error = (plain_logits.float() - expected).abs().max()
        assert fast_error <= 2 * plain_error + 1e-3, (step, fast_error, plain_error)


@torch.no_grad()
def test_decode_conv_state_update_equals_the_convolution(model):
    projection = model.model.layers[0].self_attn.qkv_proj
    assert type(projection) is CPUCCAProjection
    window = torch.randn(3, projection.conv_qk_depthwise.in_channels, projection.conv_width + 1)
    full = ZayaCCAProjection.causal_conv(projection, window)
    assert (projection.causal_conv(window) - full).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 5])
def test_small_expert_batches_equal_transformers_grouped_mm(model, tokens):
    experts = model.model.layers[1].mlp.experts
    assert type(experts) is CPUExperts and experts.config._experts_implementation == "grouped_mm"
    hidden = torch.randn(tokens, model.config.hidden_size)
    index = torch.tensor([[0], [3], [2], [2], [0]])[:tokens]
    weights = torch.rand(tokens, 1)
    expected = ZayaExperts.forward(experts, hidden, index, weights)  # the experts interface: grouped_mm
    assert (experts(hidden, index, weights) - expected).abs().max().item() <= 1e-6
    assert (experts.gathered(hidden, index[:, 0], weights) - expected).abs().max().item() <= 1e-6


@torch.no_grad()
@pytest.mark.parametrize("dtype, masked", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)])
def test_packed_one_token_attention_equals_transformers_sdpa(model, dtype, masked):
    """Exactly under a mask (transformers packs the heads too), up to rounding without one (it calls enable_gqa)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attention = model.model.layers[0].self_attn
    query, key, value = (torch.randn(3, heads, length, 16, dtype=dtype) for heads, length in ((4, 1), (2, 37), (2, 37)))
    mask = torch.rand(3, 1, 1, 37) > 0.3 if masked else None
    ours, _ = packed_gqa_sdpa(attention, query, key, value, mask, scaling=0.25)
    reference, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=0.25)
    assert ours.shape == reference.shape == (3, 1, 4, 16)
    if masked:
        assert torch.equal(ours, reference)
    else:
        torch.testing.assert_close(ours, reference)


@torch.no_grad()
def test_cpu_sdpa_decode_steps_run_packed_and_generate_as_the_model_forwards(monkeypatch):
    ours = make_pair(tiny_config(), seed=3)[0]
    assert ours.config._attn_implementation == "sdpa"
    assert all(isinstance(layer.self_attn, CPUAttention) for layer in ours.model.layers)
    ids = torch.randint(3, 101, (2, 9))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    query_rows = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, *args, **kwargs):
        query_rows.append(query.shape[-2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    tokens = ours.generate(ids, **kwargs)
    groups = ours.config.num_attention_heads // ours.config.num_key_value_heads
    layers = ours.config.num_hidden_layers
    assert query_rows == [9] * layers + [groups] * layers * 5  # the prompt, then 5 one-token steps, heads packed
    monkeypatch.undo()
    assert torch.equal(tokens, as_model_classes(ours).generate(ids, **kwargs))


@pytest.mark.skipif(
    not ONEDNN_LINEAR_AVAILABLE, reason="oneDNN linear is used on x86 builds with mkldnn, on CPUs other than Intel's"
)
def test_fp32_inference_products_take_onednn_and_agree_with_f_linear():
    weight, bias = torch.randn(1024, 256) / 16, torch.randn(1024)
    decode_rows, prefill_rows = torch.randn(3, 1, 256), torch.randn(1, 300, 256)
    with torch.no_grad():
        for rows in (decode_rows, prefill_rows):
            assert uses_onednn_linear(rows, weight, bias)
            fast = cpu_linear(rows, weight, bias)
            assert fast.shape == (*rows.shape[:-1], 1024)
            assert (fast - F.linear(rows, weight, bias)).abs().max().item() <= 1e-5
        assert not uses_onednn_linear(decode_rows.bfloat16(), weight.bfloat16())  # F.linear uses oneDNN for bf16
        assert not uses_onednn_linear(decode_rows, weight[:64], bias[:64])  # small weights stay in cache: MKL
        compiled = torch.compile(cpu_linear, fullgraph=True, dynamic=False)  # the oneDNN call as an opaque op
        assert (compiled(decode_rows, weight, bias) - cpu_linear(decode_rows, weight, bias)).abs().max().item() <= 1e-6
    weight.requires_grad_()
    assert not uses_onednn_linear(decode_rows, weight, bias)  # autograd records: F.linear, which has a backward
    cpu_linear(decode_rows, weight, bias).sum().backward()
    assert weight.grad is not None


def compiled_targets(fn, *args) -> set[str]:
    """The ops of `fn`'s graph as torch.compile traces it (one graph, no break), after checking that the compiled
    function returns what the eager one does."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*args), fn(*args))  # the dtype's default tolerance: rounding differs
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0
    return {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 2])
def test_compiled_decode_step_multiplies_gathered_experts_in_place(model, tokens):
    """A compiled CPU step of 1-2 tokens multiplies each token's expert weights where they lie (multiply-and-sum,
    which Inductor fuses with the gather): no grouped op, and no bmm on a gathered copy."""
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(tokens, model.config.hidden_size)
    index, weights = torch.tensor([[3], [0]][:tokens]), torch.rand(tokens, 1)
    targets = compiled_targets(experts, hidden, index, weights)
    assert not any("grouped_mm" in target or "bmm" in target or "matmul" in target for target in targets), targets


@torch.no_grad()
@pytest.mark.parametrize("dtype, fused_rows", [(torch.float32, 2), (torch.bfloat16, 1)])
def test_compiled_products_of_few_rows_are_fused_reductions_equal_to_f_linear(dtype, fused_rows):
    weight, bias = (torch.randn(1024, 256) / 16).to(dtype), torch.randn(1024).to(dtype)
    stack, stack_bias = (torch.randn(3, 48, 256) / 16).to(dtype), torch.randn(3, 1, 48).to(dtype)  # as the CCA conv
    for rows in (1, 2, 5):
        x, grouped_x = torch.randn(rows, 1, 256).to(dtype), torch.randn(3, rows, 256).to(dtype)
        torch.testing.assert_close(cpu_linear(x, weight, bias), F.linear(x, weight, bias))
        grouped_reference = torch.baddbmm(stack_bias, grouped_x, stack.transpose(1, 2))
        torch.testing.assert_close(cpu_linear(grouped_x, stack, stack_bias), grouped_reference)
        targets = compiled_targets(cpu_linear, x, weight, bias) | compiled_targets(cpu_linear, grouped_x, stack, stack_bias)
        fused = not any("linear" in target or "baddbmm" in target for target in targets)
        assert fused == (rows <= fused_rows), (rows, targets)
