# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Every size threshold of zaya_hf's fast paths, in one place.

Each was chosen from measurements on the project's CPU machine (a 2-core AMD EPYC VM, unless it says otherwise); the
per-op runs behind them are `python benchmarks/bench_cpu_ops.py` (recorded: benchmarks/results/bench_cpu_ops.json).
"""

import math

import torch

# fp32 CPU products whose weight has at least this many elements (1 MiB) run through oneDNN instead of MKL, on x86
# CPUs other than Intel's (`ops.cpu.ONEDNN_LINEAR_AVAILABLE`): there MKL's fp32 GEMV streams large weights at about
# half oneDNN's rate, but oneDNN pays more per call, so small weights that stay in cache are faster through MKL.
ONEDNN_MIN_WEIGHT_ELEMENTS = 512 * 512

# Inside a compiled CPU inference graph, products with at most this many rows of input per weight matrix (decode
# steps at batch 1-2) are written as multiply-and-sum, which Inductor fuses into one streaming reduction that reads
# the weight faster than an extern GEMV call, and reads a gathered expert's weight in place. With more rows oneDNN's
# GEMM catches up (fp32) or wins (bf16). bf16 products that zaya_hf's own kernel takes (`BF16_NATIVE_*` below, 2-D
# weights) go to it instead, as an opaque op.
COMPILED_MATVEC_MAX_ROWS = {torch.float32: 2, torch.bfloat16: 1}

# bf16 CPU products of the opt-in "zaya_by_expert" experts with at least this many rows per weight matrix run as
# fp32 GEMMs over the converted weight, where oneDNN has no native bf16 kernels: torch's generic bf16 GEMM costs
# about one matrix-vector product per row, the conversion about two, so from 4 rows the fp32 GEMM is ahead.
FP32_GEMM_MIN_ROWS = 4

# Elements of the fp32 buffer a weight is converted into, block by block (1 MiB: one core's L2 on the machine).
FP32_GEMM_BLOCK_ELEMENTS = 256 * 1024

# Intra-op threads. The rule: a CPU decoder layer (its tokens x the weights one token multiplies, one expert counted)
# or a product (rows x weight elements) under this many multiply-adds runs on one intra-op thread
# (`ops.cpu.intra_op_threads`); larger work keeps torch's thread count. Splitting such small work costs more than it
# saves, and on a busy machine each parallel region waits for its slowest, descheduled thread. So the embedded model
# (a layer: ~0.17 M multiply-adds a token) decodes on one thread at batch 1 and 16, bench-small (~1.6 M) at batch 1;
# bench-small's batches of 16 and the prefills keep the threads. Measured (`python benchmarks/bench_threads.py`,
# recorded: benchmarks/results/bench_threads.json; 2 threads on the 2-core machine at load average 5.0-5.6, busy):
# embedded model batch 1 41.6 tok/s with the rule vs 2.8 without (one thread throughout: 35.2); bench-small fp32
# batch 1 6.6 vs 1.9 (13.1). At batch 16 the busy machine favoured one thread throughout (embedded 336.6 vs 66.3,
# bench-small 88.5 vs 14.7), which the size rule does not reach: the batch's prompt (and, for the embedded model,
# the ops outside the layers) keep both threads. On the quiet machine (benchmarks/results/bench_threads_quiet.json) the
# rule cost up to 19% (embedded batch 16: 462.3 vs 569.6) and gained 25% at bench-small batch 1 (16.3 vs 13.0): small
# beside the busy machine's gains, so it stays. On a shared machine, OMP_NUM_THREADS=1 for small models.
PARALLEL_MIN_MULTIPLY_ADDS = 8 * 1024 * 1024

# Weights prepacked for oneDNN (`ops.prepacked.prepack_for_cpu_inference`) are laid out for products of this many
# rows. oneDNN picks the blocked layout by the row count it is told to expect: laid out for 1 row, products of 256
# rows and more ran 13-20% slower than with the plain weight (a prefill's), while the layout for 256 rows multiplies
# 1-16 rows (decode) as fast as the 1-row layout and 64-4,096 rows faster than or about as fast as the plain weight.
# Measured on a 2-core Xeon with AMX (`python benchmarks/bench_cpu_ops.py --prepack-rows`, recorded:
# benchmarks/results/bench_prepack_rows.json).
PREPACK_ROWS = 256

# Products with int8 weights and at most this many rows of input (by the input's dtype) run through zaya_hf's own
# kernel (`ops.native.int8_matvec`), the rest through torch's `_weight_int8pack_mm`. With fp32 inputs torch's kernel
# streamed a weight at 0.3-1.2 GB/s against 5-26 GB/s for ours at 1-4 rows (about 20x faster at 16), so ours takes
# every product; with bf16 inputs ours was 0.94-1.97x as fast as torch's at 1 row (1.97x on the head, which streams
# from memory), 0.92-1.30x at 2 and 0.52-0.85x at 4, where each weight byte feeds more multiply-adds than the fp32 FMA
# loop keeps up with. Measured on a 2-core AMD EPYC with AVX-512: `OMP_NUM_THREADS=1 python
# benchmarks/bench_quant_kernels.py --repeats 10 --rows 1 2 4 16` (recorded:
# benchmarks/results/bench_quant_kernels.jsonl, lines 26-45).
INT8_NATIVE_MAX_ROWS = {torch.float32: math.inf, torch.bfloat16: 2}

# bf16 products with at most `BF16_NATIVE_MAX_ROWS` rows of input and a 2-D weight of at least
# `BF16_NATIVE_MIN_WEIGHT_ELEMENTS` run through zaya_hf's own kernel (`ops.native.bf16_matvec`; in compiled graphs
# as an opaque op), the rest through `F.linear`. On one thread ours multiplied ZAYA1-8B's weights 2.1-3.1x as fast as
# `F.linear` at 1 row (the LM head, streamed from memory: 24.4 GB/s against 11.6) and 1.4-1.9x at 2 rows; at 4 rows
# 0.76-1.04x and at 16 rows 0.39-0.52x, each weight vector then feeding more multiply-adds than the one-row loop
# keeps up with. A weight row shorter than the kernel's unrolled step (128 elements) runs its scalar tail, and a small
# product pays more for the call than it saves: 64 x 64 took 2.3x `F.linear`'s time at 1 row, while the embedded
# model's 512 x 128 head took 0.45x. Measured on a 2-core AMD EPYC with AVX-512: `OMP_NUM_THREADS=1 python
# benchmarks/bench_quant_kernels.py --repeats 10 --rows 1 2 4 16` (recorded: benchmarks/results/bench_quant_kernels.jsonl,
# the last 28 lines, "dense-native").
BF16_NATIVE_MAX_ROWS = 2
BF16_NATIVE_MIN_WEIGHT_ELEMENTS = 128 * 128
