# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""zaya_hf's own C kernel: the weight-only int8 product of decode (`int8_matvec.c`), built for this machine.

torch's CPU kernel for int8 weights (`torch._weight_int8pack_mm`) reads a large weight more slowly than `F.linear`
reads the same weight in bf16 (twice the bytes), so int8 decode gained little over bf16 (the per-shape runs:
`python benchmarks/bench_quant_kernels.py`, recorded: benchmarks/results/bench_quant_kernels.jsonl). The kernel here
reads the same operands in the same layout, streaming each weight row once for the few rows of a decode step.

It is compiled once per machine, at import, with the system's C compiler (`$CC`, default `cc`) and `-march=native
-fopenmp`, into `$ZAYA_HF_CACHE` (default `~/.cache/zaya_hf`), named by a hash of the source, the flags and the
compiler's target description, and loaded with ctypes. Where there is no compiler, or the build or load fails,
`INT8_MATVEC` is None, `INT8_MATVEC_UNAVAILABLE` says why, and products keep torch's kernel.
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

SOURCE = Path(__file__).with_name("int8_matvec.c")
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


def _load() -> tuple[ctypes._CFuncPtr | None, str | None]:
    try:
        function = ctypes.CDLL(str(build_library())).zaya_int8_matvec
    except (OSError, RuntimeError) as error:
        return None, str(error)
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return function, None


INT8_MATVEC, INT8_MATVEC_UNAVAILABLE = _load()


def int8_matvec(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`rows` [M, K] (fp32 or bf16) times the int8 weight [N, K] with per-row `scale` [N] (fp32 or bf16) -> [M, N]
    in `rows`' dtype: the operands and result of `torch._weight_int8pack_mm`. Work under
    `PARALLEL_MIN_MULTIPLY_ADDS` runs on one thread, larger work on torch's intra-op threads."""
    if INT8_MATVEC is None:
        raise RuntimeError(f"zaya_hf's int8 kernel is unavailable: {INT8_MATVEC_UNAVAILABLE}")
    (m, k), n = rows.shape, weight.shape[0]
    if weight.dtype != torch.int8 or weight.shape[1] != k or scale.shape != (n,):
        raise ValueError(f"int8_matvec: rows {tuple(rows.shape)}, weight {tuple(weight.shape)} {weight.dtype} "
                         f"and scale {tuple(scale.shape)} do not make an [M, K] x int8 [N, K] product with [N] scales")
    if rows.dtype not in DTYPE_CODES or scale.dtype not in DTYPE_CODES:
        raise ValueError(f"int8_matvec: rows and scale must be float32 or bfloat16, not {rows.dtype} / {scale.dtype}")
    rows, weight, scale = rows.contiguous(), weight.contiguous(), scale.contiguous()
    out = rows.new_empty(m, n)
    threads = 1 if m * n * k < PARALLEL_MIN_MULTIPLY_ADDS else torch.get_num_threads()
    status = INT8_MATVEC(rows.data_ptr(), DTYPE_CODES[rows.dtype], weight.data_ptr(), scale.data_ptr(),
                         DTYPE_CODES[scale.dtype], out.data_ptr(), m, n, k, threads)
    if status != 0:
        raise MemoryError(f"int8_matvec: no memory for the fp32 copy of {m} x {k} rows")
    return out
