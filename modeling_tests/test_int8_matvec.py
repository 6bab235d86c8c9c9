"""zaya_hf's own int8 kernel (`zaya_hf.ops.native`): built for this machine, exact against a float64 product and
within rounding of torch's `_weight_int8pack_mm`, dispatched by `formats.quantized_matmul`, and refused clearly."""

import pytest
import torch

from zaya_hf.ops import native
from zaya_hf.ops.thresholds import INT8_NATIVE_MAX_ROWS, PARALLEL_MIN_MULTIPLY_ADDS
from zaya_hf.quantization import formats

pytestmark = pytest.mark.skipif(native.INT8_MATVEC is None,
                                reason=f"the int8 kernel was not built here: {native.INT8_MATVEC_UNAVAILABLE}")


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
