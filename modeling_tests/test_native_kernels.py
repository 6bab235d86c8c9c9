"""zaya_hf's own C kernels (`zaya_hf.ops.native`): built for this machine; the int8 and the bf16 product exact
against a float64 product and within rounding of torch's kernels (`_weight_int8pack_mm`, `F.linear`), dispatched by
`formats.quantized_matmul` and `ops.cpu.cpu_linear`, and refused clearly."""

import pytest
import torch
import torch.nn.functional as F

from zaya_hf.ops import cpu, native
from zaya_hf.ops.thresholds import (
    BF16_NATIVE_MAX_ROWS,
    BF16_NATIVE_MIN_WEIGHT_ELEMENTS,
    INT8_NATIVE_MAX_ROWS,
    PARALLEL_MIN_MULTIPLY_ADDS,
)
from zaya_hf.quantization import formats

pytestmark = pytest.mark.skipif(native.INT8_MATVEC is None,
                                reason=f"the kernels were not built here: {native.NATIVE_UNAVAILABLE}")


def operands(m: int, n: int, k: int, dtype: torch.dtype, scale_dtype: torch.dtype | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scale = (torch.rand(n, generator=generator) / 64).to(scale_dtype or dtype)
    return x, weight, scale


def exact(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T) * scale.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("k", [2048, 2047, 40, 13])  # whole vectors, and tails of every length class
def test_kernel_is_the_exact_product_up_to_fp32_accumulation(dtype, m, k):
    n = 4 * 7 + 3  # whole blocks of weight rows and a partial one
    x, weight, scale = operands(m, n, k, dtype)
    out = native.int8_matvec(x, weight, scale)
    assert out.dtype == dtype and out.shape == (m, n)
    reference = exact(x, weight, scale)
    # fp32 accumulation of K products ~ 1e-7 relative to their magnitudes; bf16 output adds half an ulp (2^-9).
    magnitude = (x.double().abs() @ weight.double().abs().T) * scale.double()
    tolerance = magnitude * 1e-6 + (reference.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0)
    assert ((out.double() - reference).abs() <= tolerance).all()


def test_bf16_scales_with_fp32_inputs_and_the_parallel_path():
    m, n, k = 2, 2048 + 5, 2048
    assert m * n * k >= PARALLEL_MIN_MULTIPLY_ADDS  # split across torch's intra-op threads
    x, weight, scale = operands(m, n, k, torch.float32, torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = native.int8_matvec(x, weight, scale)
    finally:
        torch.set_num_threads(threads)
    reference = exact(x, weight, scale)
    assert torch.allclose(parallel.double(), reference, rtol=1e-5, atol=1e-4)
    torch.set_num_threads(1)
    try:
        assert torch.equal(native.int8_matvec(x, weight, scale), parallel)  # each output is one thread's sum
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_agrees_with_torchs_int8_kernel(dtype):
    x, weight, scale = operands(2, 512, 1024, dtype)
    ours, torchs = native.int8_matvec(x, weight, scale), torch.ops.aten._weight_int8pack_mm(x, weight, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-4)
    else:  # both round an fp32 sum to bf16; the sums differ in order, so at most one bf16 ulp apart
        ulp = torch.finfo(torch.bfloat16).eps * torchs.float().abs().clamp_min(1e-2)
        assert ((ours.float() - torchs.float()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_matmul_dispatches_few_rows_to_the_kernel(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(formats, "int8_matvec", lambda *args: calls.append(args) or native.int8_matvec(*args))
    few = min(INT8_NATIVE_MAX_ROWS[dtype], 2)
    x, weight, scale = operands(few, 64, 128, dtype)
    torch.testing.assert_close(formats.quantized_matmul(x, weight, scale, 8, 0), native.int8_matvec(x, weight, scale))
    assert len(calls) == 1
    if INT8_NATIVE_MAX_ROWS[dtype] < 16:  # more rows: torch's kernel
        x, weight, scale = operands(16, 64, 128, dtype)
        assert torch.equal(formats.quantized_matmul(x, weight, scale, 8, 0),
                           torch.ops.aten._weight_int8pack_mm(x, weight, scale))
        assert len(calls) == 1
    monkeypatch.setattr(formats, "INT8_MATVEC", None)  # where the kernel could not be built: torch's kernel
    x, weight, scale = operands(1, 64, 128, dtype)
    assert torch.equal(formats.quantized_matmul(x, weight, scale, 8, 0),
                       torch.ops.aten._weight_int8pack_mm(x, weight, scale))
    assert len(calls) == 1


def test_bad_operands_are_refused_by_name():
    x, weight, scale = operands(1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"weight \(8, 16\) torch.int16"):
        native.int8_matvec(x, weight.to(torch.int16), scale)
    with pytest.raises(ValueError, match=r"rows \(1, 15\)"):
        native.int8_matvec(x[:, :15], weight, scale)
    with pytest.raises(ValueError, match=r"scale \(7,\)"):
        native.int8_matvec(x, weight, scale[:7])
    with pytest.raises(ValueError, match="float16"):
        native.int8_matvec(x.half(), weight, scale)


def test_library_is_built_once_per_source_and_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("ZAYA_HF_CACHE", str(tmp_path))
    library = native.build_library()
    assert library.parent == tmp_path and library.exists()
    built_at = library.stat().st_mtime_ns
    assert native.build_library() == library and library.stat().st_mtime_ns == built_at  # cached, not rebuilt
    broken = tmp_path / "broken.c"
    broken.write_text("int broken( {\n")
    with pytest.raises(RuntimeError, match="failed to build broken.c"):
        native.build_library(broken)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([library.name, "broken.c"])  # nothing half-built
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C compiler: '.*no-such-compiler' is not an executable"):
        native.build_library()


def bf16_operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=generator).bfloat16(),
            (torch.randn(n, k, generator=generator) / 32).bfloat16())


def within_an_ulp(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Both round an fp32 sum to bf16 and the sums differ in order only: at most one bf16 ulp apart."""
    ulp = torch.finfo(torch.bfloat16).eps * theirs.float().abs().clamp_min(1e-2)
    return bool(((ours.float() - theirs.float()).abs() <= ulp).all())


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [2048, 2047, 129, 13])  # whole unrolled steps, and tails of every length class
def test_bf16_kernel_is_the_exact_product_up_to_fp32_accumulation(m, k):
    x, weight = bf16_operands(m, 37, k)
    out = native.bf16_matvec(x, weight)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 37)
    reference = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T
    assert ((out.double() - reference).abs() <= magnitude * 1e-6 + reference.abs() * 2.0**-8).all()


def test_bf16_kernel_keeps_leading_dims_agrees_with_f_linear_and_splits_across_threads():
    x, weight = bf16_operands(2, 2048 + 5, 2048)
    x = x.view(2, 1, 2048)  # [B, 1, K]: a decode step's hidden states
    assert 2 * weight.numel() >= PARALLEL_MIN_MULTIPLY_ADDS
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = native.bf16_matvec(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert parallel.shape == (2, 1, 2048 + 5) and within_an_ulp(parallel, F.linear(x, weight))
    torch.set_num_threads(1)
    try:
        assert torch.equal(native.bf16_matvec(x, weight), parallel)  # each output is one thread's sum
    finally:
        torch.set_num_threads(threads)


def test_cpu_linear_sends_few_bf16_rows_by_large_weights_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "bf16_matvec", lambda *args: calls.append(args) or native.bf16_matvec(*args))
    side = int(BF16_NATIVE_MIN_WEIGHT_ELEMENTS**0.5)
    x, weight = bf16_operands(BF16_NATIVE_MAX_ROWS, side, side)
    assert torch.equal(cpu.cpu_linear(x, weight), native.bf16_matvec(x, weight)) and len(calls) == 1
    cases = {  # what keeps F.linear, bit for bit
        "more rows": (bf16_operands(BF16_NATIVE_MAX_ROWS + 1, side, side)[0], weight, None),
        "a smaller weight": (x, weight[: side // 2], None),
        "a bias": (x, weight, torch.zeros(side, dtype=torch.bfloat16)),
        "fp32": (x.float(), weight.float(), None),
        "a strided weight": (x, bf16_operands(1, side, 2 * side)[1][:, :side], None),
    }
    for case, (rows, matrix, bias) in cases.items():
        assert torch.equal(cpu.cpu_linear(rows, matrix, bias), F.linear(rows, matrix, bias)), case
    with torch.enable_grad():
        trained = weight.clone().requires_grad_()
        cpu.cpu_linear(x, trained).sum().backward()  # autograd records it: F.linear, which has a backward
    assert trained.grad is not None
    monkeypatch.setattr(cpu, "BF16_MATVEC", None)  # where the kernel could not be built
    assert torch.equal(cpu.cpu_linear(x, weight), F.linear(x, weight))
    assert len(calls) == 1


def test_bf16_kernel_refuses_bad_operands_by_name():
    x, weight = bf16_operands(1, 8, 16)
    with pytest.raises(ValueError, match="torch.float32 / torch.bfloat16"):
        native.bf16_matvec(x.float(), weight)
    with pytest.raises(ValueError, match=r"x \(1, 15\) and weight \(8, 16\)"):
        native.bf16_matvec(x[:, :15], weight)
    with pytest.raises(ValueError, match=r"weight \(2, 8, 16\)"):
        native.bf16_matvec(x, weight.expand(2, 8, 16))
