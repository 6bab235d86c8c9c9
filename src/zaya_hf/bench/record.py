"""One JSON line per benchmark run, with the command that reproduces it (the recorded runs in benchmarks/results)."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..ops.cpu import cpu_info

# the CPU features that decide which bf16 / int8 product kernels torch and oneDNN can use
MATMUL_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


def machine() -> dict:
    """Which CPU a run measured: recorded runs come from more than one machine, and ratios move with the CPU (its
    vector units decide how fast torch's bf16 and int8 products are, its memory how fast weights stream)."""
    info = cpu_info()
    return {"cpu": info.get("model name", "unknown"), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(),
            "cpu_matmul_flags": sorted(set(info.get("flags", "").split()) & MATMUL_FLAGS)}


def command_line(script: str, args: argparse.Namespace) -> str:
    """`python <script>` with every option of `args` as it was parsed (lists space-separated, unset ones left out)."""
    parts = ["python", script]
    for key, value in vars(args).items():
        if value is None or value is False:
            continue
        parts.append(f"--{key.replace('_', '-')}")
        if isinstance(value, (list, tuple)):
            parts += [str(item) for item in value]
        elif value is not True:
            parts.append(str(value))
    return " ".join(parts)


def emit(result: dict, script: str, args: argparse.Namespace, output: Path | None = None) -> None:
    """Add the command and the machine to `result`, print it as one JSON line and, given `output`, write the line
    there too."""
    result["command"] = command_line(script, args)
    result["machine"] = machine()
    line = json.dumps(result)
    print(line, file=sys.stdout, flush=True)
    if output is not None:
        output.write_text(line + "\n")
