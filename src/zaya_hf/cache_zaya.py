"""The CCA-aware cache of ZAYA1.

Besides keys and values, every CCA layer carries two small recurrent states (ZAYA_ARCHITECTURE.md §3):

* the conv state: the last `(cca_time0 - 1) + (cca_time1 - 1)` pre-convolution q/k columns, `[B, (H+K)*D, W]`;
* the delayed-value state: `v_proj_delayed(h)` of the last processed token, `[B, K*D/2]`.

transformers' stock hybrid cache layers copy only keys and values in their batch operations, so shared-prefix
fan-out (`batch_repeat_interleave`) and row selection (`batch_select_indices`) silently pair the wrong conv and
value state with each row. Here every batch operation moves all four tensors together.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


class ZayaCCAStateMixin:
    """Conv and delayed-value state of one CCA layer, carried through every batch operation.

    Mixed into a key/value cache layer (full or sliding window) of transformers, whose batch operations it extends.
    """

    is_croppable = False  # the conv / delayed-value state of tokens already folded in cannot be restored

    def _init_cca_state(self) -> None:
        self.conv_state: torch.Tensor | None = None  # [B, (H+K)*D, W]
        self.value_state: torch.Tensor | None = None  # [B, K*D/2]

    @property
    def has_cca_state(self) -> bool:
        return self.conv_state is not None

    def update_cca_state(self, conv_state: torch.Tensor, value_state: torch.Tensor) -> None:
        self.conv_state = conv_state
        self.value_state = value_state

    def _map_cca_state(self, fn) -> None:
        if self.conv_state is not None:
            self.conv_state = fn(self.conv_state)
            self.value_state = fn(self.value_state)

    def reset(self) -> None:
        super().reset()
        self._init_cca_state()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_cca_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_cca_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_cca_state(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self) -> None:
        super().offload()
        self._map_cca_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized:
            self._map_cca_state(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "ZayaCache cannot be cropped: the CCA conv and delayed-value state of removed tokens are not kept."
            )


class ZayaCacheLayer(ZayaCCAStateMixin, DynamicLayer):
    """Cache of a full-attention (`hybrid`) CCA layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._init_cca_state()


class ZayaSlidingCacheLayer(ZayaCCAStateMixin, DynamicSlidingWindowLayer):
    """Cache of a sliding-window (`hybrid_sliding`) CCA layer: keeps the last `sliding_window - 1` keys/values."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self._init_cca_state()


class ZayaCache(Cache):
    """Cache for ZAYA1 generation: keys/values plus the CCA conv and delayed-value state of every layer.

    `ZayaForCausalLM.generate()` creates one by default; build one yourself to reuse a prefilled prompt:

    ```python
    >>> cache = ZayaCache(model.config)
    >>> out = model(prompt_ids, cache=cache, use_cache=True)
    >>> cache.batch_repeat_interleave(4)  # fan the prefix out to 4 samples; conv/value state included
    ```
    """

    def __init__(self, config, **kwargs):
        config = config.get_text_config(decoder=True)
        layers = [
            ZayaSlidingCacheLayer(sliding_window=config.sliding_window)
            if layer_type == "hybrid_sliding"
            else ZayaCacheLayer()
            for layer_type in config.layer_types
        ]
        super().__init__(layers=layers, **kwargs)

    def get_cca_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The `(conv_state, value_state)` of layer `layer_idx`, or `(None, None)` before its first token."""
        layer = self.layers[layer_idx]
        return layer.conv_state, layer.value_state

    def update_cca_state(self, layer_idx: int, conv_state: torch.Tensor, value_state: torch.Tensor) -> None:
        self.layers[layer_idx].update_cca_state(conv_state, value_state)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        layer = self.layers[0 if layer_idx is None else layer_idx]
        return layer.has_cca_state

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the cache tensors (keys, values, conv and delayed-value state)."""
        total = 0
        for layer in self.layers:
            for tensor in (layer.keys, layer.values, layer.conv_state, layer.value_state):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total


__all__ = ["ZayaCache", "ZayaCacheLayer", "ZayaSlidingCacheLayer"]
