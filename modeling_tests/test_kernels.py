"""The Triton kernels of zaya_hf.ops against the modules whose forwards they replace, and the model with
kernel_backend="triton" against kernel_backend="torch".

Without a GPU these run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before zaya_hf is imported), so
every shape is tiny. The interpreter truncates fp32 -> bf16 instead of rounding to nearest, so bf16 results are only
checked loosely here; fp32 and fp16 are checked tightly.
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import left_padded_batch, randomize, tiny_config
from transformers import StaticCache

from zaya_hf import ZayaCache, ZayaConfig, ZayaForCausalLM
from zaya_hf.modeling_zaya import (
    ZayaAttention,
    ZayaDecoderLayer,
    ZayaExperts,
    ZayaResidualScaling,
    ZayaRMSNorm,
    ZayaRotaryEmbedding,
    ZayaRouter,
    apply_rotary_pos_emb,
)

pytest.importorskip("triton")
from zaya_hf.ops import triton_kernels as kernels  # noqa: E402
from zaya_hf.ops.triton import TritonAttention, TritonDecoderLayer, TritonExperts, TritonRouter  # noqa: E402

if not (kernels.INTERPRET or torch.cuda.is_available()):
    pytest.skip("needs a CUDA/ROCm GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if kernels.INTERPRET else "cuda"
ROOT = Path(__file__).resolve().parents[1]
# (atol, rtol) per dtype: a few ulps for fp32 / fp16; bf16 only loosely, as the interpreter truncates to bf16.
TOLERANCE = {torch.float32: (2e-5, 0.0), torch.float16: (4e-3, 2e-3), torch.bfloat16: (5e-2, 5e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare at the dtype's tolerance; `scale` < 1 for outputs smaller than ~1."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton launches of each fused operation, so that a silent fallback to torch cannot pass."""
    counts = collections.Counter()
    for name in ("_cca_launch", "_moe_launch", "_router_launch"):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)

    class CountedResidualNorm(kernels._ResidualNormFunction):
        @classmethod
        def apply(cls, *args):
            counts["_residual_norm"] += 1
            return super().apply(*args)

    monkeypatch.setattr(kernels, "_ResidualNormFunction", CountedResidualNorm)
    return counts


def randomized(module: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    return randomize(module, seed).eval().to(DEVICE, dtype)


# ---------------------------------------------------------------------------------------------- CCA projection tail


CCA_CONFIGS = {
    "zaya": dict(),  # t0 = t1 = 2, half the head dims rotated
    "wide_conv_full_rotary": dict(
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, cca_time0=3, cca_time1=2,
        rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}},
    ),
}


def cca_reference(attention: ZayaAttention, hidden: torch.Tensor, cache, cos, sin):
    """What the model computes for q/k: the CCA projection, QK norm and partial RoPE, [B, S, heads, D]."""
    query, key, _ = attention.qkv_proj(hidden, cache)
    query, key = attention.qk_norm(query, key)
    query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    return query.transpose(1, 2), key.transpose(1, 2)


def cca_kernel(attention: ZayaAttention, hidden: torch.Tensor, conv_state, cos, sin):
    projection = attention.qkv_proj
    depthwise, grouped = projection.conv_qk_depthwise, projection.conv_qk_grouped
    return kernels.cca_qk_mix(
        projection.q_proj(hidden), projection.k_proj(hidden), conv_state, depthwise.weight, depthwise.bias,
        grouped.weight, grouped.bias, attention.qk_norm.temp, cos, sin,
    )


@pytest.mark.parametrize("shape", list(CCA_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_cca_qk_mix_equals_the_model_through_prefill_and_decode_steps(shape, dtype, launches):
    """A prefill (the kernel's block runs over time), then one-token steps (over the batch) reading the conv state
    as the cache hands it out, against the attention module's own projection, QK norm and RoPE."""
    config = tiny_config(num_hidden_layers=1, layer_types=["hybrid"], **CCA_CONFIGS[shape])
    attention = randomized(ZayaAttention(config, 0), dtype)
    rotary = ZayaRotaryEmbedding(config).to(DEVICE)
    hidden = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    positions = torch.arange(7, device=DEVICE)[None] + torch.tensor([[3], [0]], device=DEVICE)
    cos, sin = rotary(hidden, positions, "hybrid")
    cache, conv_state = ZayaCache(config), None
    for start, end in ((0, 5), (5, 6), (6, 7)):
        step_hidden, step_cos, step_sin = hidden[:, start:end], cos[:, start:end], sin[:, start:end]
        query, key, window = cca_kernel(attention, step_hidden, conv_state, step_cos, step_sin)
        ref_query, ref_key = cca_reference(attention, step_hidden, cache, step_cos, step_sin)
        assert_close(query, ref_query, dtype)
        assert_close(key, ref_key, dtype)
        conv_state = cache.get_conv_state(0)
        assert torch.equal(window[..., -conv_state.shape[-1] :], conv_state)  # the window's tail is the new state
    assert launches["_cca_launch"] == 3


# ---------------------------------------------------------------------------------------------- top-1 MoE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 37])
@torch.no_grad()
def test_moe_top1_equals_the_experts_and_zeroes_skipped_tokens(dtype, num_tokens, launches):
    config = tiny_config(num_experts=4, hidden_size=64, moe_intermediate_size=48)
    experts = randomized(ZayaExperts(config), dtype, seed=num_tokens)
    gen = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, 64, generator=gen).to(DEVICE, dtype)
    choice = torch.randint(0, 5, (num_tokens,), generator=gen).to(DEVICE)  # 4 = the skip class
    choice[choice == 2] = 0  # an expert no token chose
    weight = torch.rand(num_tokens, generator=gen).to(DEVICE, dtype)
    output = kernels.moe_top1(hidden, choice, weight, experts.gate_up_proj, experts.down_proj)
    skipped = (choice == 4)[:, None]  # the model hands skipped tokens to the experts as expert 0 with weight 0
    expected = experts(hidden, choice[:, None].masked_fill(skipped, 0), weight[:, None].masked_fill(skipped, 0))
    assert_close(output, expected, dtype, scale=0.25)
    assert torch.equal(output[skipped[:, 0]], torch.zeros_like(output[skipped[:, 0]]))
    assert torch.equal(kernels.moe_top1(hidden, torch.full_like(choice, 4), weight, experts.gate_up_proj,
                                        experts.down_proj), torch.zeros_like(hidden))
    assert launches["_moe_launch"] == 2


# ---------------------------------------------------------------------------------------------- router


@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_router_top1_equals_the_router(carried, dtype, launches):
    config = tiny_config(num_experts=4, router_hidden_size=16)
    router = randomized(ZayaRouter(config, layer_idx=1), dtype)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, config.hidden_size, generator=gen).to(DEVICE, dtype)
    router_state = torch.randn(2, 9, 16, generator=gen).to(DEVICE, dtype) if carried else None
    mlp = router.router_mlp
    logits, weight, choice, state = kernels.router_top1(
        router.down_proj(hidden), router_state, router.router_states_scale if carried else None, mlp.norm.weight,
        mlp.norm.variance_epsilon, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.out_proj.weight,
        router.balancing_biases,
    )
    ref_logits, ref_weights, ref_index, ref_state = router(hidden, router_state)
    assert launches["_router_launch"] == 1
    assert_close(logits.flatten(0, 1), ref_logits, dtype)
    assert_close(state, ref_state, dtype)
    weights, index = router.experts_arguments(weight.reshape(-1, 1), choice.reshape(-1, 1))
    assert_close(weights, ref_weights, dtype, scale=0.25)
    if dtype != torch.bfloat16:  # near-ties may flip with the interpreter's truncating bf16 casts
        assert torch.equal(index, ref_index)


# ---------------------------------------------------------------------------------------------- residual merge + norm


def run_residual_op(mode, hidden_states, residual, scaling, norm, kernel):
    """One of the three ways the decoder layer uses the kernel; returns its outputs and a scalar to differentiate."""
    params = (scaling.hidden_states_scale, scaling.hidden_states_bias, scaling.residual_scale, scaling.residual_bias)
    if mode == "merge_and_norm":
        outputs = (kernels.residual_merge_rmsnorm(hidden_states, residual, *params, norm.weight, norm.variance_epsilon)
                   if kernel else (merged := scaling(hidden_states, residual), norm(merged.to(norm.weight.dtype))))
    elif mode == "merge":
        outputs = (kernels.residual_merge_rmsnorm(hidden_states, residual, *params)[0] if kernel
                   else scaling(hidden_states, residual),)
    else:
        outputs = (kernels.residual_rmsnorm(residual, norm.weight, norm.variance_epsilon) if kernel
                   else norm(residual.to(norm.weight.dtype)),)
    probe = torch.linspace(-1, 1, residual.shape[-1], device=residual.device)
    return outputs, sum((out.float() * probe).sum() + (out.float() ** 2).sum() for out in outputs)


@pytest.mark.parametrize("mode", ["merge_and_norm", "merge", "norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_merge_rmsnorm_forward_and_backward_equal_the_modules(mode, dtype, launches):
    results = {}
    for kernel in (True, False):
        gen = torch.Generator().manual_seed(0)
        scaling, norm = ZayaResidualScaling(64), ZayaRMSNorm(64)
        with torch.no_grad():
            for param in (*scaling.parameters(), *norm.parameters()):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
        scaling, norm = scaling.to(DEVICE, dtype), norm.to(DEVICE, dtype)
        hidden_states = torch.randn(3, 5, 64, generator=gen).to(DEVICE, dtype).requires_grad_()
        residual = torch.randn(3, 5, 64, generator=gen).to(DEVICE).requires_grad_()  # the fp32 residual stream
        outputs, loss = run_residual_op(mode, hidden_states, residual, scaling, norm, kernel)
        loss.backward()
        leaves = {"hidden_states": hidden_states, "residual": residual}
        leaves.update({f"scaling.{n}": p for n, p in scaling.named_parameters()})
        leaves.update({f"norm.{n}": p for n, p in norm.named_parameters()})
        results[kernel] = outputs, {name: leaf.grad for name, leaf in leaves.items()}
    assert launches["_residual_norm"] == 1
    (outputs, grads), (ref_outputs, ref_grads) = results[True], results[False]
    for output, ref_output in zip(outputs, ref_outputs, strict=True):
        assert_close(output, ref_output, dtype)
    assert {n for n, g in grads.items() if g is not None} == {n for n, g in ref_grads.items() if g is not None}
    for name, grad in grads.items():
        if grad is not None:  # gradients are summed over rows: compare relative to their size
            scale = ref_grads[name].float().abs().max().item()
            tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
            torch.testing.assert_close(grad.float(), ref_grads[name].float(), atol=tolerance * scale, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------- whole model


def kernel_model(kernel_backend: str, seed: int = 0) -> ZayaForCausalLM:
    """A model small enough for the interpreter that still has both layer types and GQA."""
    config = tiny_config(
        num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, kernel_backend=kernel_backend,
    )
    torch.manual_seed(seed)
    return randomize(ZayaForCausalLM(config), seed).eval().to(DEVICE)


def test_triton_backend_puts_the_kernel_forwards_in_place_once():
    model = kernel_model("triton")
    layer = model.model.layers[0]
    assert type(layer) is TritonDecoderLayer and type(layer.self_attn) is TritonAttention
    assert type(layer.mlp.gate) is TritonRouter and type(layer.mlp.experts) is TritonExperts
    for backend in ("torch", "auto"):  # "auto" without a GPU (the interpreter does not count): the torch forwards
        layer = kernel_model(backend).model.layers[0]
        if DEVICE == "cpu":
            assert type(layer) is ZayaDecoderLayer and not isinstance(layer.self_attn, TritonAttention)


@pytest.mark.parametrize("static", [False, True], ids=["ZayaCache", "StaticCache"])
@torch.no_grad()
def test_model_logits_with_triton_equal_torch_through_decode_steps(static, launches):
    torch_model, triton_model = kernel_model("torch"), kernel_model("triton")
    ids, mask, _ = left_padded_batch(seed=1, lengths=(6, 4))
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    next_tokens = torch.randint(3, 101, (2, 2), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(model):
        cache = StaticCache(config=model.config, max_cache_len=16) if static else ZayaCache(model.config)
        logits = [model(ids, attention_mask=mask, cache=cache, use_cache=True).logits]
        step_mask = mask
        for step in range(next_tokens.shape[1]):
            step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], dim=1)
            logits.append(model(next_tokens[:, step : step + 1], attention_mask=step_mask, cache=cache).logits)
        return logits, cache

    torch_logits, torch_cache = run(torch_model)
    assert sum(launches.values()) == 0
    triton_logits, triton_cache = run(triton_model)
    for triton_step, torch_step in zip(triton_logits, torch_logits, strict=True):
        assert (triton_step - torch_step)[:, -1].abs().max().item() <= 1e-4
    assert (triton_logits[0] - torch_logits[0])[mask.bool()].abs().max().item() <= 1e-4  # padded positions aside
    for layer in range(2):
        for get_state in (type(torch_cache).get_conv_state, type(torch_cache).get_recurrent_state):
            torch.testing.assert_close(get_state(triton_cache, layer), get_state(torch_cache, layer), atol=1e-6, rtol=0)
    steps = 1 + next_tokens.shape[1]
    per_layer = {"_cca_launch": 1, "_moe_launch": 1, "_router_launch": 1, "_residual_norm": 3}
    assert launches == {name: 2 * steps * count for name, count in per_layer.items()}  # 2 layers


def test_training_with_triton_backend_gives_torch_gradients(launches):
    """With autograd recording, the residual/norm kernel runs its Triton backward; the forward-only kernels leave
    the step to the model's torch forwards, so every gradient matches the torch backend."""
    ids = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def grads(backend):
        model = kernel_model(backend).train()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    torch_grads, triton_grads = grads("torch"), grads("triton")
    assert launches["_residual_norm"] == 6 and launches["_cca_launch"] == launches["_moe_launch"] == 0
    assert triton_grads.keys() == torch_grads.keys()
    for name, grad in triton_grads.items():
        scale = torch_grads[name].abs().max().item()
        torch.testing.assert_close(grad, torch_grads[name], atol=1e-4 * max(scale, 1e-3), rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------- selection and fallbacks


def run_python(*args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if not interpret:
        environment.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, timeout=600)


SMALL_MODEL = (
    "import torch\n"
    "from zaya_hf import ZayaConfig, ZayaForCausalLM\n"
    "def build(backend):\n"
    "    return ZayaForCausalLM(ZayaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,"
    " num_key_value_heads=1, head_dim=16, num_experts=2, moe_intermediate_size=16, router_hidden_size=16,"
    " kernel_backend=backend)).eval()\n"
)


def test_package_runs_without_triton_and_triton_backend_fails_clearly():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if triton were not installed\n"
        + SMALL_MODEL
        + "from zaya_hf import ops\n"
        "assert ops.install_triton_forwards is None\n"
        "for backend in ('auto', 'torch'):\n"
        "    out = build(backend).generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False)\n"
        "    assert out.shape == (1, 6), out.shape\n"
        "try:\n"
        "    build('triton')\n"
        "except ImportError as error:\n"
        "    print('ERROR', error)\n"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert "ERROR kernel_backend='triton' needs the zaya_hf package with triton" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the triton backend has its device")
def test_triton_backend_without_a_gpu_fails_clearly(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)  # as outside the interpreter: no device runs the kernels
    with pytest.raises(RuntimeError, match="kernel_backend='triton' needs a CUDA or ROCm GPU"):
        kernel_model("triton")


def test_kernel_backend_is_validated_saved_and_overridable(tmp_path):
    with pytest.raises(Exception, match="kernel_backend must be one of"):
        tiny_config(kernel_backend="cuda")
    model = ZayaForCausalLM(tiny_config(kernel_backend="torch"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["kernel_backend"] == "torch"
    reloaded = ZayaForCausalLM.from_pretrained(tmp_path, kernel_backend="auto")
    assert reloaded.config.kernel_backend == "auto"
    assert ZayaConfig.from_pretrained(tmp_path).kernel_backend == "torch"
    # Other loaders of the checkpoint (here transformers' own ZAYA) ignore the field.
    from transformers.models.zaya.configuration_zaya import ZayaConfig as ReferenceConfig
    from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as ReferenceForCausalLM

    reference = ReferenceForCausalLM.from_pretrained(tmp_path, config=ReferenceConfig.from_pretrained(tmp_path))
    assert reference.config.hidden_size == 64


def test_every_kernel_compiles_for_mi300x_without_a_gpu():
    """The interpreter never runs Triton's compiler. Compile every kernel variant the launch code produces at
    ZAYA1-8B sizes (bf16, fp32) for gfx942 (MI300X: the smallest shared memory of the supported GPUs) with the
    compilers shipped in the triton wheel. (scripts/compile_kernels.py also covers sm_80 and sm_90.)"""
    # bf16 (ZAYA1-8B's dtype) and fp32 (the largest tiles); the script without --dtypes also compiles fp16.
    result = run_python(str(ROOT / "scripts" / "compile_kernels.py"), "--targets", "gfx942", "--dtypes", "bf16", "fp32",
                        interpret=False)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failures"] == [] and summary["compiled"] == summary["variants_per_target"] > 0
