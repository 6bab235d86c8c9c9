# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""zaya_hf's fast paths: faster forwards for some of ZAYA1's modules. Package-only, never shipped as remote code.

Importing this package registers its installers with `ZayaPreTrainedModel.fast_paths`, which runs them whenever a
model is built, loaded or moved: `cpu` (products, the decode-step conv and small expert batches on the CPU; see
`zaya_hf.ops.cpu`) and, where triton is installed, `triton` (the fused kernels, when `kernel_backend` selects them;
see `zaya_hf.ops.triton`). Each installer swaps module classes for subclasses whose forward is faster; the model's
own forwards are the one torch implementation every fast path is tested against. The size thresholds of all of them
live in `zaya_hf.ops.thresholds`. One fast path is opt in, because it gives up training and saving:
`prepack_for_cpu_inference` (`zaya_hf.ops.prepacked`: bf16 weights in oneDNN's layout for eager CPU inference).
"""

from ..modeling_zaya import ZayaPreTrainedModel
from .cpu import install_cpu_forwards
from .prepacked import prepack_for_cpu_inference

ZayaPreTrainedModel.fast_paths["cpu"] = install_cpu_forwards

try:
    from .triton import install_triton_forwards
except ImportError:  # triton is an optional dependency: kernel_backend="triton" then fails with a clear error
    install_triton_forwards = None
else:
    ZayaPreTrainedModel.fast_paths["triton"] = install_triton_forwards

__all__ = ["install_cpu_forwards", "install_triton_forwards", "prepack_for_cpu_inference"]
