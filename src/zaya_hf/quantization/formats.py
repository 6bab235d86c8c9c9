# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Symmetric round-to-nearest weight quantization and the two layouts a quantized weight lives in.

* The checkpoint layout is compressed-tensors' "pack-quantized" one (what vLLM's compressed-tensors loader reads for
  W4A16 / W8A16): the integers `q` in [-qmax, qmax] are offset by 2^(bits-1) to unsigned and packed densely, low
  bits first, into int32 words along the input dimension (`[..., N, K * bits / 32]`); the scales are
  `[..., N, K / group_size]` (`[..., N, 1]` per channel) in the model's dtype; dequantized = q * scale.
* The kernel layout is what torch's CPU kernels read: int8 `[..., N, K]` with scales `[..., N]` for
  `torch._weight_int8pack_mm`, and for `torch._weight_int4pack_mm_for_cpu` the unsigned nibbles of each block of
  `int4_block_n()` output rows interleaved (`[..., N, K / 2]` uint8; see `pack_int4_kernel`) with
  `scale_and_zero` `[..., K / group_size, N, 2]` (zero 0: the kernel computes (u - 8) * scale + zero). The block
  is 32 rows with AVX2 and 64 with AVX-512, so N is padded with zero rows to a whole block in this layout only
  (`int4_padded_rows`); products and conversions back cut the padding off.

Both conversions are exact permutations of the same integers, so quantize -> save -> load is bit-identical.
"""

from dataclasses import dataclass
from functools import cache

import torch

from ..configuration_zaya import CheckpointError
from ..ops.native import INT8_MATVEC, int8_matvec
from ..ops.thresholds import INT8_NATIVE_MAX_ROWS

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
QMAX = {4: 7, 8: 127}  # symmetric: q in [-qmax, qmax], scale = absmax / qmax
QUANTIZE_ROWS_PER_CHUNK = 256  # rows quantized at a time: the fp32 temporaries stay in cache (and small)


class QuantizationFormatError(CheckpointError):
    """A weight that the requested format cannot hold, or quantized tensors that disagree with their config (a
    `CheckpointError`, so callers that handle refused checkpoints handle these too)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: `bits` 8 (per output channel) or 4 (groups of `group_size` inputs)."""

    bits: int
    group_size: int | None

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise naming `name` if a weight of `shape` [..., N, K] cannot be stored in this format."""
        out_features, in_features = shape[-2:]
        words = 32 // self.bits
        if self.group_size is not None and in_features % self.group_size:
            raise QuantizationFormatError(
                f"{name}: {in_features} input features are not divisible by group_size={self.group_size} "
                f"(shape {tuple(shape)}); choose a group size that divides {in_features}, or exclude the module "
                "with modules_to_not_convert."
            )
        if in_features % words:
            raise QuantizationFormatError(
                f"{name}: {in_features} input features do not fill whole int32 words of {words} {self.bits}-bit "
                f"values (shape {tuple(shape)})."
            )

    def packed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], shape[-1] * self.bits // 32)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], self.groups(shape[-1]))

    def stored(self, shape: tuple[int, ...], kernel_layout: bool) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
        """(integers' shape, their dtype, scales' shape) of a weight of `shape` [..., N, K] held in the checkpoint
        layout or in the kernel layout (see the module docstring)."""
        *lead, rows, cols = shape
        if not kernel_layout:
            return self.packed_shape(shape), torch.int32, self.scale_shape(shape)
        if self.bits == 8:
            return tuple(shape), torch.int8, (*lead, rows)
        padded = int4_padded_rows(rows)
        return (*lead, padded, cols // 2), torch.uint8, (*lead, self.groups(cols), padded, 2)


def quantize(weight: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [..., N, K] -> (q int8 [..., N, K], scale [..., N, groups] in `scale_dtype`), round to nearest.

    Each group is divided by its own scale as stored (already rounded to `scale_dtype`), so q * scale is exactly
    the dequantized weight a kernel computes. All-zero groups get scale 1 (their q are 0)."""
    flat = weight.reshape(-1, weight.shape[-1])
    q = torch.empty(flat.shape, dtype=torch.int8)
    scale = torch.empty(flat.shape[0], spec.groups(flat.shape[-1]), dtype=scale_dtype)
    group = spec.group_size or flat.shape[-1]
    for start in range(0, flat.shape[0], QUANTIZE_ROWS_PER_CHUNK):
        rows = flat[start : start + QUANTIZE_ROWS_PER_CHUNK].float().unflatten(-1, (-1, group))  # [n, G, g]
        step = torch.linalg.vector_norm(rows, float("inf"), dim=-1).div_(QMAX[spec.bits])  # absmax / qmax
        step = torch.where(step > 0, step, 1.0).to(scale_dtype)
        scale[start : start + rows.shape[0]] = step
        rows.div_(step.float()[..., None]).round_().clamp_(-QMAX[spec.bits], QMAX[spec.bits])
        q[start : start + rows.shape[0]] = rows.flatten(-2)
    return q.view(weight.shape), scale.view(*weight.shape[:-1], -1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., N, K] * scale [..., N, groups] -> [..., N, K] in `dtype`."""
    grouped = q.unflatten(-1, (scale.shape[-1], -1)).to(torch.float32)  # [..., N, G, g]
    return (grouped * scale.float()[..., None]).flatten(-2).to(dtype)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q int8 [..., K] -> compressed-tensors' pack-quantized int32 words [..., K * bits / 32]."""
    unsigned = q.view(torch.uint8) + (1 << (bits - 1))  # q + offset, wrapping mod 256 as two's complement does
    if bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)  # value 2j in the low nibble of byte j
    return unsigned.contiguous().view(torch.int32)  # little-endian: byte 0 holds the lowest bits


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 words [..., W] -> q int8 [..., W * 32 / bits]."""
    unsigned = packed.contiguous().view(torch.uint8)
    if bits == 4:
        unsigned = torch.stack([unsigned & 0xF, unsigned >> 4], dim=-1).flatten(-2)
    return (unsigned - (1 << (bits - 1))).view(torch.int8)


def pack_int4_kernel(q: torch.Tensor) -> torch.Tensor:
    """q int8 [..., N, K] in [-8, 7] -> torch's int4 CPU kernel layout [..., N, K / 2] uint8: within each block of
    B = `int4_block_n()` rows, byte (k, i) holds row i (low nibble) and row i + B/2 (high nibble) at column k."""
    *lead, rows, cols = q.shape
    block = int4_block_n()
    unsigned = (q + 8).view(torch.uint8).view(*lead, rows // block, 2, block // 2, cols)
    packed = unsigned[..., 0, :, :] | (unsigned[..., 1, :, :] << 4)  # [..., N/B, B/2, K]
    return packed.transpose(-1, -2).contiguous().view(*lead, rows, cols // 2)


def unpack_int4_kernel(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4_kernel`: [..., N, K / 2] uint8 -> q int8 [..., N, K]."""
    *lead, rows, half = packed.shape
    block = int4_block_n()
    blocks = packed.view(*lead, rows // block, 2 * half, block // 2)  # [..., N/B, K, B/2]
    unsigned = torch.stack([blocks & 0xF, blocks >> 4], dim=-3)  # [..., N/B, 2, K, B/2]
    unsigned = unsigned.transpose(-1, -2).reshape(*lead, rows, 2 * half)
    return (unsigned - 8).view(torch.int8)


def int4_padded_rows(rows: int) -> int:
    """`rows` rounded up to whole blocks of the int4 kernel layout."""
    return -(-rows // int4_block_n()) * int4_block_n()


def _pad_rows(tensor: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    """`tensor` [..., N, C] with rows of `value` appended up to `rows`."""
    missing = rows - tensor.shape[-2]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((*tensor.shape[:-2], missing, tensor.shape[-1]), value)], dim=-2)


@cache
def int4_block_n() -> int:
    """The output-row block of `torch._convert_weight_to_int4pack_for_cpu` on this machine (32 with AVX2, 64 with AVX-512): the
    layout `pack_int4_kernel` writes is checked against torch's own packing, once per process."""
    generator = torch.Generator().manual_seed(0)
    for block in (32, 64):
        values = torch.randint(0, 16, (4 * block, 64), dtype=torch.int32, generator=generator, device="cpu")
        expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        unsigned = values.to(torch.uint8).view(4, 2, block // 2, 64)
        candidate = (unsigned[:, 0] | (unsigned[:, 1] << 4)).transpose(-1, -2).contiguous().view(4 * block, 32)
        if torch.equal(candidate, expected):
            return block
    raise RuntimeError(
        "torch's int4 CPU kernel packs weights in a layout zaya_hf does not know on this machine "
        f"(torch {torch.__version__}); int4 quantization cannot run here, use bits=8."
    )


def scale_and_zero(scale: torch.Tensor) -> torch.Tensor:
    """Group scales [..., N, G] -> the int4 kernel's `[..., G, N, 2]` (scale, zero = 0)."""
    scale = scale.transpose(-1, -2)
    return torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()


def to_kernel_layout(q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [..., N, K], scale [..., N, G]) -> the tensors torch's CPU kernel for `spec` reads."""
    if spec.bits == 8:
        return q.contiguous(), scale[..., 0].contiguous()
    padded = int4_padded_rows(q.shape[-2])
    return pack_int4_kernel(_pad_rows(q, padded, 0)), scale_and_zero(_pad_rows(scale, padded, 1))


def from_kernel_layout(packed: torch.Tensor, kernel_scale: torch.Tensor, spec: QuantSpec,
                       rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `to_kernel_layout` for a weight of `rows` output rows: (q [..., N, K], scale [..., N, G])."""
    if spec.bits == 8:
        return packed, kernel_scale[..., None]
    scale = kernel_scale[..., 0].transpose(-1, -2)[..., :rows, :].contiguous()
    return unpack_int4_kernel(packed)[..., :rows, :].contiguous(), scale


def kernel_rows(packed: torch.Tensor, kernel_scale: torch.Tensor, spec: QuantSpec,
                index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `index` (any shape) of a kernel-layout weight [N, K] as (q int8 [..., K], scale [..., G]): an embedding
    lookup that unpacks only the rows it reads."""
    if spec.bits == 8:
        return packed[index], kernel_scale[index][..., None]
    block = int4_block_n()
    rows, half = packed.shape
    blocks = packed.view(rows // block, 2 * half, block // 2)  # [N/B, K, B/2]: byte (k, i) holds rows i, i + B/2
    within = index % block
    nibbles = blocks[index // block, :, within % (block // 2)]  # [..., K]
    unsigned = (nibbles >> (4 * (within // (block // 2)))[..., None]) & 0xF  # low nibble: the first half
    return (unsigned - 8).to(torch.int8), kernel_scale[..., 0][:, index].movedim(0, -1)


def kernel_linear(x: torch.Tensor, packed: torch.Tensor, kernel_scale: torch.Tensor, spec: QuantSpec,
                  out_features: int) -> torch.Tensor:
    """`x` [..., K] times the quantized weight [N = `out_features`, K] (kernel layout) -> [..., N], read by torch's CPU kernel.
    Compiled graphs call the kernel as an opaque op: Inductor's own lowering of it rounds differently."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        out = quantized_matmul_op(rows, packed, kernel_scale, spec.bits, spec.group_size or 0)
    else:
        out = quantized_matmul(rows, packed, kernel_scale, spec.bits, spec.group_size or 0)
    return out[:, :out_features].reshape(*x.shape[:-1], out_features)


def quantized_matmul(rows: torch.Tensor, packed: torch.Tensor, kernel_scale: torch.Tensor, bits: int,
                     group_size: int) -> torch.Tensor:
    """`rows` [M, K] times a kernel-layout weight -> [M, N] (padded N for int4). int8 products of few rows run
    through zaya_hf's own kernel where it was built (`ops.native`; which rows: `INT8_NATIVE_MAX_ROWS`)."""
    if bits == 8:
        if INT8_MATVEC is not None and rows.shape[0] <= INT8_NATIVE_MAX_ROWS.get(rows.dtype, 0):
            return int8_matvec(rows, packed, kernel_scale)
        return torch.ops.aten._weight_int8pack_mm(rows, packed, kernel_scale)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group_size, kernel_scale)


quantized_matmul_op = torch.library.custom_op("zaya_hf::quantized_matmul", mutates_args=())(quantized_matmul)


@quantized_matmul_op.register_fake
def _(rows, packed, kernel_scale, bits, group_size):
    return rows.new_empty(rows.shape[0], packed.shape[0])


__all__ = [
    "QMAX",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantSpec",
    "QuantizationFormatError",
    "dequantize",
    "from_kernel_layout",
    "int4_block_n",
    "int4_padded_rows",
    "kernel_linear",
    "kernel_rows",
    "quantized_matmul",
    "pack_int32",
    "pack_int4_kernel",
    "quantize",
    "to_kernel_layout",
    "unpack_int32",
    "unpack_int4_kernel",
]
