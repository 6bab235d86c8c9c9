"""Benchmarks of zaya_hf against transformers' own ZAYA (used by `benchmarks/` and `zaya-hf bench`)."""

from .decode import BENCH_SMALL, build_bench_small, reference_twin, run_decode_benchmark

__all__ = ["BENCH_SMALL", "build_bench_small", "reference_twin", "run_decode_benchmark"]
