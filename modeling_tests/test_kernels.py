"""The optional Triton kernels of kernels_zaya against their torch references, and the model with
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
from torch import nn

from zaya_hf import ZayaCache, ZayaConfig, ZayaForCausalLM, ZayaStaticCache
from zaya_hf import kernels_zaya as kz
from zaya_hf.modeling_zaya import ZayaResidualScaling, ZayaRMSNorm, ZayaRouterMLP, apply_partial_rotary

pytest.importorskip("triton")
if not (kz._INTERPRET or torch.cuda.is_available()):
    pytest.skip("needs a CUDA/ROCm GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if kz._INTERPRET else "cuda"
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
        original = getattr(kz, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kz, name, counted)

    class CountedResidualNorm(kz._ResidualNormFunction):
        @classmethod
        def apply(cls, *args):
            counts["_residual_norm"] += 1
            return super().apply(*args)

    monkeypatch.setattr(kz, "_ResidualNormFunction", CountedResidualNorm)
    return counts


# ---------------------------------------------------------------------------------------------- CCA projection tail


def cca_inputs(dtype, batch=2, seq_len=5, heads=4, kv_heads=2, head_dim=16, rotary_dim=8, t0=2, t1=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = (heads + kv_heads) * head_dim
    depthwise = nn.Conv1d(channels, channels, t0, groups=channels)
    grouped = nn.Conv1d(channels, channels, t1, groups=heads + kv_heads)
    with torch.no_grad():
        for conv in (depthwise, grouped):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.2)
    positions = torch.arange(seq_len)[None] + torch.tensor([[3], [0]])[:batch]  # two rows at different positions
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # [B, S, R]
    state = torch.randn(batch, channels, (t0 - 1) + (t1 - 1), generator=gen)
    tensors = dict(
        query=torch.randn(batch, seq_len, heads * head_dim, generator=gen),
        key=torch.randn(batch, seq_len, kv_heads * head_dim, generator=gen),
        conv_state=state,
        key_temperature=1.0 + 0.3 * torch.randn(kv_heads, generator=gen),
        cos=angles.cos(),
        sin=angles.sin(),
    )
    tensors = {name: t.to(DEVICE, dtype) for name, t in tensors.items()}
    return dict(tensors, depthwise=depthwise.to(DEVICE, dtype), grouped=grouped.to(DEVICE, dtype))


CCA_SHAPES = {
    "zaya": dict(),  # t0 = t1 = 2, half the head dims rotated
    "wide_conv_full_rotary": dict(heads=2, kv_heads=1, head_dim=32, rotary_dim=32, t0=3, t1=2, seq_len=4),
}


@pytest.mark.parametrize("shape", list(CCA_SHAPES))
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_cca_qk_mix_matches_reference(shape, cached, dtype, launches):
    inputs = cca_inputs(dtype, **CCA_SHAPES[shape])
    if not cached:
        inputs["conv_state"] = None
    query, key, window = kz.cca_qk_mix(**inputs)
    ref_query, ref_key, ref_window = kz.cca_qk_mix_reference(**inputs)
    assert launches["_cca_launch"] == 1
    assert_close(query, ref_query, dtype)
    assert_close(key, ref_key, dtype)
    assert torch.equal(window, ref_window)  # the cache's conv window: copied columns, exactly
    assert kz.cca_qk_mix(**inputs, return_window=False)[2] is None


def weights_and_steps(inputs: dict, steps: range) -> tuple[dict, list[dict]]:
    """The conv/temperature arguments, and the per-token slices of the sequence arguments for each step."""
    weights = {name: inputs[name] for name in ("depthwise", "grouped", "key_temperature")}
    return weights, [{n: inputs[n][:, t : t + 1] for n in ("query", "key", "cos", "sin")} for t in steps]


@pytest.mark.parametrize("shape", list(CCA_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_cca_qk_mix_decode_steps_from_a_strided_cache_state(shape, dtype, launches):
    """One token per row (the kernel's block then runs over the batch), reading the conv state as the dynamic
    cache hands it out: a narrow view of a longer tensor."""
    inputs = cca_inputs(dtype, seq_len=3, **{k: v for k, v in CCA_SHAPES[shape].items() if k != "seq_len"})
    width = inputs["conv_state"].shape[-1]
    history = torch.randn(*inputs["conv_state"].shape[:2], 4 + width, device=DEVICE).to(dtype)
    state = history.narrow(-1, 4, width)
    state.copy_(inputs["conv_state"])
    ref_state = state.clone()
    weights, steps = weights_and_steps(inputs, range(3))
    for step in steps:
        query, key, window = kz.cca_qk_mix(conv_state=state, **step, **weights)
        ref_query, ref_key, ref_window = kz.cca_qk_mix_reference(conv_state=ref_state, **step, **weights)
        assert_close(query, ref_query, dtype)
        assert_close(key, ref_key, dtype)
        assert torch.equal(window, ref_window)
        state, ref_state = window[..., 1:], ref_window[..., 1:]  # what the cache keeps: the last W columns
    assert launches["_cca_launch"] == 3


@torch.no_grad()
def test_cca_prefill_then_decode_equals_one_prefill(launches):
    inputs = cca_inputs(torch.float32, seq_len=6)
    inputs["conv_state"] = None
    whole_query, whole_key, whole_window = kz.cca_qk_mix(**inputs)
    weights, steps = weights_and_steps(inputs, range(4, 6))
    head = {name: inputs[name][:, :4] for name in ("query", "key", "cos", "sin")}
    query, key, window = kz.cca_qk_mix(conv_state=None, **head, **weights)
    parts = [(query, key)]
    for step in steps:
        query, key, window = kz.cca_qk_mix(conv_state=window[..., -2:], **step, **weights)
        parts.append((query, key))
    torch.testing.assert_close(torch.cat([q for q, _ in parts], 1), whole_query, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([k for _, k in parts], 1), whole_key, atol=1e-5, rtol=0)
    assert torch.equal(window[..., -2:], whole_window[..., -2:])


# ---------------------------------------------------------------------------------------------- top-1 MoE


def moe_inputs(dtype, num_tokens=37, hidden=64, intermediate=48, num_experts=4, unused_expert=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, num_experts + 1, (num_tokens,), generator=gen)  # index num_experts = skip
    choice[choice == unused_expert] = 0
    tensors = dict(
        hidden_states=torch.randn(num_tokens, hidden, generator=gen),
        weight=torch.rand(num_tokens, generator=gen),
        gate_up_proj=0.1 * torch.randn(num_experts, 2 * intermediate, hidden, generator=gen),
        down_proj=0.1 * torch.randn(num_experts, hidden, intermediate, generator=gen),
    )
    return dict({name: t.to(DEVICE, dtype) for name, t in tensors.items()}, choice=choice.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_moe_top1_matches_reference_and_zeroes_skipped_tokens(dtype, launches):
    inputs = moe_inputs(dtype)
    output = kz.moe_top1(**inputs)
    assert launches["_moe_launch"] == 1
    assert_close(output, kz.moe_top1_reference(**inputs), dtype, scale=0.25)
    skipped = inputs["choice"] == inputs["gate_up_proj"].shape[0]
    assert skipped.any() and torch.equal(output[skipped], torch.zeros_like(output[skipped]))


@pytest.mark.parametrize("num_tokens", [1, 3])
@torch.no_grad()
def test_moe_top1_few_tokens_and_all_skipped(num_tokens, launches):
    inputs = moe_inputs(torch.float32, num_tokens=num_tokens, seed=num_tokens)
    torch.testing.assert_close(kz.moe_top1(**inputs), kz.moe_top1_reference(**inputs), atol=1e-5, rtol=0)
    inputs["choice"].fill_(inputs["gate_up_proj"].shape[0])
    assert torch.equal(kz.moe_top1(**inputs), torch.zeros_like(inputs["hidden_states"]))
    assert launches["_moe_launch"] == 2


# ---------------------------------------------------------------------------------------------- router


def router_inputs(dtype, router_dim=16, num_classes=5, carried=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    router_mlp = ZayaRouterMLP(router_dim, num_classes, eps=1e-5)
    with torch.no_grad():
        for param in router_mlp.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    tensors = dict(
        router_hidden=torch.randn(2, 9, router_dim, generator=gen),
        router_state=torch.randn(2, 9, router_dim, generator=gen) if carried else None,
        router_states_scale=torch.randn(router_dim, generator=gen) if carried else None,
    )
    tensors = {name: t.to(DEVICE, dtype) if t is not None else None for name, t in tensors.items()}
    biases = (0.05 * torch.randn(num_classes, generator=gen)).to(DEVICE)
    return dict(tensors, router_mlp=router_mlp.to(DEVICE, dtype), balancing_biases=biases)


@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_router_top1_matches_reference(carried, dtype, launches):
    inputs = router_inputs(dtype, carried=carried)
    logits, weight, choice, state = kz.router_top1(**inputs)
    ref_logits, ref_weight, ref_choice, ref_state = kz.router_top1_reference(**inputs)
    assert launches["_router_launch"] == 1
    assert_close(logits, ref_logits, dtype)
    assert_close(weight, ref_weight, dtype, scale=0.25)
    assert_close(state, ref_state, dtype)
    if dtype != torch.bfloat16:  # near-ties may flip with the interpreter's truncating bf16 casts
        assert torch.equal(choice, ref_choice)


# ---------------------------------------------------------------------------------------------- residual merge + norm


def residual_inputs(dtype, hidden=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scaling, norm = ZayaResidualScaling(hidden), ZayaRMSNorm(hidden)
    with torch.no_grad():
        for param in (*scaling.parameters(), *norm.parameters()):
            param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
    hidden_states = torch.randn(3, 5, hidden, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(3, 5, hidden, generator=gen).to(DEVICE)  # the fp32 residual stream
    return hidden_states, residual, scaling.to(DEVICE, dtype), norm.to(DEVICE, dtype)


def run_residual_op(mode, hidden_states, residual, scaling, norm, reference):
    """One of the three ways the decoder layer uses the kernel; returns its outputs and a scalar to differentiate."""
    merge = kz.residual_merge_rmsnorm_reference if reference else kz.residual_merge_rmsnorm
    norm_only = kz.residual_rmsnorm_reference if reference else kz.residual_rmsnorm
    if mode == "merge_and_norm":
        outputs = merge(hidden_states, residual, scaling, norm)
    elif mode == "merge":
        outputs = (merge(hidden_states, residual, scaling)[0],)
    else:
        outputs = (norm_only(residual, norm),)
    probe = torch.linspace(-1, 1, residual.shape[-1], device=residual.device)
    return outputs, sum((out.float() * probe).sum() + (out.float() ** 2).sum() for out in outputs)


@pytest.mark.parametrize("mode", ["merge_and_norm", "merge", "norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_merge_rmsnorm_forward_and_backward(mode, dtype, launches):
    results = {}
    for reference in (False, True):
        hidden_states, residual, scaling, norm = residual_inputs(dtype)
        hidden_states.requires_grad_(), residual.requires_grad_()
        outputs, loss = run_residual_op(mode, hidden_states, residual, scaling, norm, reference)
        loss.backward()
        leaves = {"hidden_states": hidden_states, "residual": residual}
        leaves.update({f"scaling.{n}": p for n, p in scaling.named_parameters()})
        leaves.update({f"norm.{n}": p for n, p in norm.named_parameters()})
        results[reference] = outputs, {name: leaf.grad for name, leaf in leaves.items()}
    assert launches["_residual_norm"] == 1
    (outputs, grads), (ref_outputs, ref_grads) = results[False], results[True]
    for output, ref_output in zip(outputs, ref_outputs, strict=True):
        assert_close(output, ref_output, dtype)
    assert {n for n, g in grads.items() if g is not None} == {n for n, g in ref_grads.items() if g is not None}
    for name, grad in grads.items():
        if grad is not None:  # gradients are summed over rows: compare relative to their size
            scale = ref_grads[name].float().abs().max().item()
            tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
            torch.testing.assert_close(grad.float(), ref_grads[name].float(), atol=tolerance * scale, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------- references = the model


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_compute_exactly_what_the_model_computes(dtype):
    """The references (the kernels' ground truth and their fallback) are bit-identical to the model's torch path."""
    model = randomize(ZayaForCausalLM(tiny_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid"]))).eval()
    model = model.to(DEVICE, dtype)
    layer = model.model.layers[1]
    hidden = torch.randn(2, 6, 64, device=DEVICE, dtype=dtype)
    position_ids = torch.arange(6, device=DEVICE)[None].expand(2, 6)
    cos, sin = model.model.rotary_emb(hidden, position_ids, "hybrid")

    attention, projection = layer.self_attn, layer.self_attn.qkv_proj
    query, key, _ = projection(hidden)
    query, key = attention.qk_norm(query, key)
    query, key = (apply_partial_rotary(t.transpose(1, 2), cos, sin).transpose(1, 2) for t in (query, key))
    ref_query, ref_key, _ = kz.cca_qk_mix_reference(
        projection.q_proj(hidden), projection.k_proj(hidden), None, projection.conv_qk_depthwise,
        projection.conv_qk_grouped, attention.qk_norm.temp, cos, sin,
    )
    assert torch.equal(ref_query, query) and torch.equal(ref_key, key)

    router = layer.mlp.gate
    router_state = torch.randn(2, 6, 16, device=DEVICE, dtype=dtype)
    expected = router(hidden, router_state)
    actual = kz.router_top1_reference(
        router.down_proj(hidden), router_state, router.router_states_scale, router.router_mlp, router.balancing_biases
    )
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)

    _, weight, choice, _ = expected
    experts = layer.mlp.experts
    flat = hidden.reshape(-1, 64)
    torch.testing.assert_close(
        kz.moe_top1_reference(flat, choice.reshape(-1), weight.reshape(-1), experts.gate_up_proj, experts.down_proj),
        experts(flat, choice.reshape(-1), weight.reshape(-1)),
        atol=1e-6 if dtype == torch.float32 else 1e-2,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------- whole model


def kernel_model(seed=0, **overrides):
    """A model small enough for the interpreter that still has both layer types and GQA."""
    config = tiny_config(
        num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, **overrides,
    )
    torch.manual_seed(seed)
    return randomize(ZayaForCausalLM(config), seed).eval().to(DEVICE)


@pytest.mark.parametrize("static", [False, True], ids=["ZayaCache", "ZayaStaticCache"])
@torch.no_grad()
def test_model_logits_with_triton_equal_torch_through_decode_steps(static, launches):
    model = kernel_model()
    ids, mask, _ = left_padded_batch(seed=1, lengths=(6, 4))
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    next_tokens = torch.randint(3, 101, (2, 2), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(backend):
        model.config.kernel_backend = backend
        cache = ZayaStaticCache(model.config, max_cache_len=16) if static else ZayaCache(model.config)
        logits = [model(ids, attention_mask=mask, cache=cache, use_cache=True).logits]
        step_mask = mask
        for step in range(next_tokens.shape[1]):
            step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], dim=1)
            logits.append(model(next_tokens[:, step : step + 1], attention_mask=step_mask, cache=cache).logits)
        return logits, cache

    torch_logits, torch_cache = run("torch")
    assert sum(launches.values()) == 0
    triton_logits, triton_cache = run("triton")
    for triton_step, torch_step in zip(triton_logits, torch_logits, strict=True):
        assert (triton_step - torch_step)[:, -1].abs().max().item() <= 1e-4
    assert (triton_logits[0] - torch_logits[0])[mask.bool()].abs().max().item() <= 1e-4  # padded positions aside
    for layer in range(2):
        for ours, theirs in zip(triton_cache.get_cca_state(layer), torch_cache.get_cca_state(layer), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    steps = 1 + next_tokens.shape[1]
    per_layer = {"_cca_launch": 1, "_moe_launch": 1, "_router_launch": 1, "_residual_norm": 3}
    assert launches == {name: 2 * steps * count for name, count in per_layer.items()}  # 2 layers


@torch.no_grad()
def test_auto_backend_runs_the_torch_path_off_gpu(launches):
    model = kernel_model(kernel_backend="auto")
    ids = torch.randint(3, 101, (2, 5), device=DEVICE)
    auto_logits = model(ids).logits
    if DEVICE == "cpu":
        assert sum(launches.values()) == 0  # no kernel touched, nothing compiled
        model.config.kernel_backend = "torch"
        assert torch.equal(model(ids).logits, auto_logits)


def test_training_with_triton_backend_gives_torch_gradients(launches):
    """With autograd recording, the residual/norm kernel runs its Triton backward; the forward-only kernels fall
    back to their torch references, so every gradient matches the torch backend."""
    model = kernel_model().train()
    ids = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def grads(backend):
        model.config.kernel_backend = backend
        model.zero_grad()
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
        + "from zaya_hf import kernels_zaya\n"
        "assert not kernels_zaya.is_triton_available()\n"
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
    assert "ERROR kernel_backend='triton' needs the triton package" in result.stdout


def test_triton_backend_refuses_tensors_it_cannot_run_on(monkeypatch):
    monkeypatch.setattr(kz, "_INTERPRET", False)  # as outside the interpreter: CPU tensors cannot run the kernels
    model = kernel_model(kernel_backend="triton").cpu()
    with pytest.raises(RuntimeError, match="kernel_backend='triton' needs tensors on a CUDA or ROCm GPU, got cpu"):
        model(torch.tensor([[3, 4, 5]]))


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
    ZAYA1-8B sizes (fp32, fp16, bf16) for gfx942 (MI300X: the smallest shared memory of the supported GPUs) with the
    compilers shipped in the triton wheel. (scripts/compile_kernels.py also covers sm_80 and sm_90.)"""
    result = run_python(str(ROOT / "scripts" / "compile_kernels.py"), "--targets", "gfx942", interpret=False)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failures"] == [] and summary["compiled"] == summary["variants_per_target"] > 0
