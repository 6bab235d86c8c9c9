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
