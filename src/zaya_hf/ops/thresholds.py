# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Every size threshold of zaya_hf's fast paths, in one place.

Each was chosen from measurements on the project's CPU machine (a 2-core AMD EPYC VM); the per-op runs behind them
are `python benchmarks/bench_cpu_ops.py` (recorded: benchmarks/results/bench_cpu_ops.json).
"""

import torch

# fp32 CPU products whose weight has at least this many elements (1 MiB) run through oneDNN instead of MKL: MKL's
# fp32 GEMV streams large weights at about half oneDNN's rate, but oneDNN pays more per call, so small weights that
# stay in cache are faster through MKL.
ONEDNN_MIN_WEIGHT_ELEMENTS = 512 * 512

# Inside a compiled CPU inference graph, products with at most this many rows of input per weight matrix (decode
# steps at batch 1-2) are written as multiply-and-sum, which Inductor fuses into one streaming reduction that reads
# the weight faster than an extern GEMV call, and reads a gathered expert's weight in place. With more rows oneDNN's
# GEMM catches up (fp32) or wins (bf16).
COMPILED_MATVEC_MAX_ROWS = {torch.float32: 2, torch.bfloat16: 1}

# bf16 CPU products with at least this many rows per weight matrix run as fp32 GEMMs over the converted weight, where
# oneDNN has no native bf16 kernels: torch's generic bf16 GEMM costs about one matrix-vector product per row, the
# conversion about two, so from 4 rows the fp32 GEMM is ahead (3x at 16 rows, 5-7x at 512).
FP32_GEMM_MIN_ROWS = 4

# Elements of the fp32 buffer a weight is converted into, block by block (1 MiB: one core's L2 on the machine).
FP32_GEMM_BLOCK_ELEMENTS = 256 * 1024

# CPU layers and products with fewer multiply-adds than this run on one intra-op thread (`ops.cpu.intra_op_threads`).
PARALLEL_MIN_MULTIPLY_ADDS = 8 * 1024 * 1024
