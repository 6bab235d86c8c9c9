# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""zaya_hf's own C kernels (`matvec.c`): the products of decode, a few rows times a large weight, built for this machine.

torch's CPU kernels stream a large weight at a decode step at about half the rate one thread can read memory, its
int8 kernel (`torch._weight_int8pack_mm`) even more slowly than `F.linear` reads the same weight in bf16, twice the
bytes (per-shape runs: `python benchmarks/bench_quant_kernels.py`, recorded: benchmarks/results/bench_quant_kernels.jsonl).
The kernels here read the same operands in the same layout, streaming each weight row once for all the rows of a
decode step.

They are compiled once per machine, at import, with the system's C compiler (`$CC`, default `cc`) and
`-march=native -fopenmp`, into `$ZAYA_HF_CACHE` (default `~/.cache/zaya_hf`), named by a hash of the source, the
flags and the compiler's target description, and loaded with ctypes. Where there is no compiler, or the build or
load fails, `INT8_MATVEC` and `BF16_MATVEC` are None, `NATIVE_UNAVAILABLE` says why, and products keep torch's kernels.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .thresholds import PARALLEL_MIN_MULTIPLY_ADDS

SOURCE = Path(__file__).with_name("matvec.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's DTYPE_FLOAT32 / DTYPE_BFLOAT16


def cache_dir() -> Path:
    return Path(os.environ.get("ZAYA_HF_CACHE", Path.home() / ".cache" / "zaya_hf"))


def build_library(source: Path = SOURCE) -> Path:
    """Compile `source` for this machine (once: the result is cached by content) and return the library's path.
    Raises `RuntimeError` with the compiler's message when there is no compiler or the build fails."""
    name = os.environ.get("CC", "cc")
    compiler = shutil.which(name)
    if compiler is None:
        raise RuntimeError(f"no C compiler: {name!r} is not an executable on PATH (set CC)")
    target = subprocess.run([compiler, "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                            check=False)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    key = hashlib.sha256("\0".join([source.read_text(), *FLAGS, version.stdout, target.stdout]).encode()).hexdigest()
    library = cache_dir() / f"{source.stem}-{key[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {source.name}: {result.stderr.strip()}")
        os.replace(built, library)  # atomic: a concurrent import sees the old name absent or the whole library
    return library


def _load() -> tuple[ctypes._CFuncPtr | None, ctypes._CFuncPtr | None, str | None]:
    try:
        library = ctypes.CDLL(str(build_library()))
    except (OSError, RuntimeError) as error:
        return None, None, str(error)
    int8, bf16 = library.zaya_int8_matvec, library.zaya_bf16_matvec
    int8.restype, bf16.restype = ctypes.c_int, None
    int8.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_int]
    return int8, bf16, None


INT8_MATVEC, BF16_MATVEC, NATIVE_UNAVAILABLE = _load()


def _threads(multiply_adds: int) -> int:
    """Work under `PARALLEL_MIN_MULTIPLY_ADDS` on one thread, larger work on torch's intra-op threads."""
    return 1 if multiply_adds < PARALLEL_MIN_MULTIPLY_ADDS else torch.get_num_threads()


def int8_matvec(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`rows` [M, K] (fp32 or bf16) times the int8 weight [N, K] with per-row `scale` [N] (fp32 or bf16) -> [M, N]
    in `rows`' dtype: the operands and result of `torch._weight_int8pack_mm`. Work under
    `PARALLEL_MIN_MULTIPLY_ADDS` runs on one thread, larger work on torch's intra-op threads."""
    if INT8_MATVEC is None:
        raise RuntimeError(f"zaya_hf's int8 kernel is unavailable: {NATIVE_UNAVAILABLE}")
    (m, k), n = rows.shape, weight.shape[0]
    if weight.dtype != torch.int8 or weight.shape[1] != k or scale.shape != (n,):
        raise ValueError(f"int8_matvec: rows {tuple(rows.shape)}, weight {tuple(weight.shape)} {weight.dtype} "
                         f"and scale {tuple(scale.shape)} do not make an [M, K] x int8 [N, K] product with [N] scales")
    if rows.dtype not in DTYPE_CODES or scale.dtype not in DTYPE_CODES:
        raise ValueError(f"int8_matvec: rows and scale must be float32 or bfloat16, not {rows.dtype} / {scale.dtype}")
    rows, weight, scale = rows.contiguous(), weight.contiguous(), scale.contiguous()
    out = rows.new_empty(m, n)
    status = INT8_MATVEC(rows.data_ptr(), DTYPE_CODES[rows.dtype], weight.data_ptr(), scale.data_ptr(),
                         DTYPE_CODES[scale.dtype], out.data_ptr(), m, n, k, _threads(m * n * k))
    if status != 0:
        raise MemoryError(f"int8_matvec: no memory for the fp32 copy of {m} x {k} rows")
    return out


def bf16_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` for bf16 `x` [..., K] and `weight` [N, K] -> [..., N], accumulated in fp32 and rounded
    once, as torch's bf16 product is (only the summation order differs). Work under `PARALLEL_MIN_MULTIPLY_ADDS` runs
    on one thread, larger work on torch's intra-op threads."""
    if BF16_MATVEC is None:
        raise RuntimeError(f"zaya_hf's bf16 kernel is unavailable: {NATIVE_UNAVAILABLE}")
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise ValueError(f"bf16_matvec: x and weight must be bfloat16, not {x.dtype} / {weight.dtype}")
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"bf16_matvec: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not make an "
                         "[..., K] x [N, K] product")
    (n, k), rows = weight.shape, x.reshape(-1, weight.shape[1]).contiguous()
    weight = weight.contiguous()
    out = x.new_empty(*x.shape[:-1], n)
    BF16_MATVEC(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], n, k, _threads(rows.numel() * n))
    return out
