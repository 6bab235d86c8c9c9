# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""The CCA-aware dynamic cache of ZAYA1.

Every CCA layer carries two small recurrent states besides its keys and values (ZAYA_ARCHITECTURE.md §3), held under
transformers' linear-attention cache-layer names, so that generic code (and transformers' own `DynamicCache(config)`
/ `StaticCache(config)`, which build the same hybrid layers) reads them the usual way:

* `conv_states[0]`: the last `W = (cca_time0 - 1) + (cca_time1 - 1)` pre-convolution q/k columns, `[B, (H+K)*D, W]`;
* `recurrent_states[0]`: `v_proj_delayed(h)` of the last processed token, `[B, K*D/2]`.

transformers' hybrid layers move only keys and values in `batch_repeat_interleave` / `batch_select_indices`, so a
shared-prefix fan-out pairs each row with the wrong conv state, and they cannot be cropped once a recurrent state
exists. `ZayaCache`'s layers move every state in every batch operation, and while `activate_past_recording` is on
(assisted decoding asks for it) they keep the per-token history of both states, so `crop(-n)` restores the exact
state of n tokens ago. `StaticCache` needs nothing of the sort (no fan-out, no cropping): it is used as it is.
"""

import torch
from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
)


class ZayaCCAStateMixin:
    """Conv and delayed-value state of one CCA layer, moved by every batch operation and restored by `crop`.

    While past recording is on, `conv_states[0]` holds `W + r` columns and `recorded_values` the delayed values
    `[B, 1 + r, K*D/2]` (the state before recording, then one per token), `r` being the tokens since the last crop.
    """

    _key_value_layer: type  # the transformers layer that holds this layer's keys and values

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.recorded_values: torch.Tensor | None = None

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None,
                          **kwargs) -> torch.Tensor:
        """Append the step's pre-conv columns `[B, C, S]`; returns the window `[B, C, W + S]` the conv reads."""
        if not self.is_conv_states_initialized[state_idx]:
            # zeros of width `conv_kernel_size`: the columns before the first token
            self.lazy_initialization(conv_states=conv_states, state_idx=state_idx, conv_kernel_size=conv_kernel_size)
        window = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
        if self.record_past:
            self.conv_states[state_idx] = window
        else:
            self.conv_states[state_idx].copy_(window[..., window.shape[-1] - self.conv_kernel_size[state_idx] :])
        self.has_previous_state[state_idx] = True
        return window

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0,
                               delayed_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Keep the last token's delayed value `[B, K*D/2]`; while recording, also every token's (`delayed_values`
        `[B, S, K*D/2]`), which `crop` needs."""
        if self.record_past:
            if delayed_values is None:
                raise ValueError("A recording ZayaCache needs the delayed value of every token (`delayed_values`).")
            if self.recorded_values is None:
                before = self.recurrent_states[state_idx]
                before = recurrent_states.new_zeros(recurrent_states.shape) if before is None else before.clone()
                self.recorded_values = before[:, None]
            self.recorded_values = torch.cat([self.recorded_values, delayed_values], dim=1)
        return super().update_recurrent_state(recurrent_states, state_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"ZayaCache.crop takes minus the number of tokens to remove, got {tokens_to_remove}.")
        removed = -tokens_to_remove
        if self.has_previous_state[0]:
            recorded = self.conv_states[0].shape[-1] - self.conv_kernel_size[0]
            if not self.record_past or removed > recorded:
                raise RuntimeError(
                    f"Cannot remove {removed} token(s) from the CCA state: only {recorded if self.record_past else 0} were "
                    "recorded since the last crop. Call `activate_past_recording()` before the forward passes you "
                    "want to undo."
                )
            end = self.conv_states[0].shape[-1] - removed
            self.conv_states[0] = self.conv_states[0][..., end - self.conv_kernel_size[0] : end]
            if self.recorded_values is not None:
                kept = self.recorded_values[:, self.recorded_values.shape[1] - removed - 1]
                self.recurrent_states[0] = kept.clone()
                self.recorded_values = self.recurrent_states[0][:, None]
        self._key_value_layer.crop(self, tokens_to_remove)

    def reset(self) -> None:
        super().reset()  # zeroes the states in place
        if self.is_conv_states_initialized[0]:  # a recording cache may hold more than W columns
            self.conv_states[0] = self.conv_states[0][..., : self.conv_kernel_size[0]]
        self.recorded_values = None

    def _map_cca_state(self, fn) -> None:
        if self.is_conv_states_initialized[0]:
            self.conv_states[0] = fn(self.conv_states[0])
        if self.is_recurrent_states_initialized[0]:
            self.recurrent_states[0] = fn(self.recurrent_states[0])
        if self.recorded_values is not None:
            self.recorded_values = fn(self.recorded_values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._key_value_layer.reorder_cache(self, beam_idx)
        self._map_cca_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._key_value_layer.batch_repeat_interleave(self, repeats)
        self._map_cca_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_value_layer.batch_select_indices(self, indices)
        self._map_cca_state(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    @property
    def nbytes(self) -> int:
        """Bytes held: keys and values (with any room reserved for tokens to come), conv and delayed-value state."""
        held = (*self._key_value_tensors(), self.conv_states[0], self.recurrent_states[0], self.recorded_values)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _key_value_tensors(self) -> tuple:
        return (self.keys, self.values) if self.is_initialized else ()


class ZayaCacheLayer(ZayaCCAStateMixin, LinearAttentionAndFullAttentionLayer):
    """Cache of a full-attention (`hybrid`) CCA layer.

    Keys and values are prefix views of buffers with room to grow, so that a decode step writes its column in place
    instead of copying the whole cache (`torch.cat`, as `DynamicLayer` does). Room is reserved only up to
    `max_length`, which `generate()` sets to the longest the call can reach; with `max_length=None` every update
    allocates exactly.
    """

    _key_value_layer = DynamicLayer

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.max_length: int | None = None
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not (_is_prefix_view(self.keys, self._key_buffer, needed)
                and _is_prefix_view(self.values, self._value_buffer, needed)):
            # Double the room (capped at `max_length`): a long decode reallocates O(log T) times, not T times.
            capacity = needed if self.max_length is None else max(needed, min(self.max_length, 2 * needed))
            self._key_buffer = _grown(self.keys, key_states, length, capacity)
            self._value_buffer = _grown(self.values, value_states, length, capacity)
        self._key_buffer[:, :, length:needed].copy_(key_states)
        self._value_buffer[:, :, length:needed].copy_(value_states)
        self.keys, self.values = self._key_buffer[:, :, :needed], self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def _key_value_tensors(self) -> tuple:
        if not self.is_initialized:
            return ()
        keys = self._key_buffer if _is_prefix_view(self.keys, self._key_buffer, 0) else self.keys
        values = self._value_buffer if _is_prefix_view(self.values, self._value_buffer, 0) else self.values
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


class ZayaSlidingCacheLayer(ZayaCCAStateMixin, LinearAttentionAndSlidingWindowAttentionLayer):
    """Cache of a sliding-window (`hybrid_sliding`) CCA layer: keeps the last `sliding_window - 1` keys/values."""

    _key_value_layer = DynamicSlidingWindowLayer


class ZayaCache(DynamicCache):
    """The dynamic cache of ZAYA1 generation: keys/values plus the CCA conv and delayed-value state of every layer.

    `ZayaForCausalLM.generate()` uses one by default; build one yourself to reuse a prefilled prompt:

    ```python
    >>> cache = ZayaCache(model.config)
    >>> out = model(prompt_ids, cache=cache, use_cache=True)
    >>> cache.batch_repeat_interleave(4)  # fan the prefix out to 4 samples; conv/value state included
    ```
    """

    def __init__(self, config, offloading: bool = False, offload_only_non_sliding: bool = False):
        config = config.get_text_config(decoder=True)
        layers = [
            ZayaSlidingCacheLayer(sliding_window=config.sliding_window)
            if layer_type == "hybrid_sliding"
            else ZayaCacheLayer()
            for layer_type in config.layer_types
        ]
        # `Cache.__init__`, not `DynamicCache.__init__`: the layers are given, not derived from the config
        super(DynamicCache, self).__init__(
            layers=layers, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding
        )

    def set_max_length(self, max_length: int | None) -> None:
        """The longest (in tokens) this cache will grow before it is reset: full-attention layers reserve room up
        to it instead of copying their keys/values at every step. `generate()` sets it to the call's
        `max_length - 1`; `None` (the default) allocates exactly."""
        for layer in self.layers:
            if isinstance(layer, ZayaCacheLayer):
                layer.max_length = max_length

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the cache tensors: keys and values (with the room reserved for the tokens still
        to come in a `generate()` call), conv and delayed-value state."""
        return sum(layer.nbytes for layer in self.layers)


def _is_prefix_view(tensor: torch.Tensor, buffer: torch.Tensor | None, needed: int) -> bool:
    """Whether `tensor` is still a prefix view of `buffer` (batch operations replace it) with room for `needed`."""
    return (
        buffer is not None
        and needed <= buffer.shape[2]
        and tensor.data_ptr() == buffer.data_ptr()
        and tensor.shape[:2] == buffer.shape[:2]
        and tensor.stride() == buffer.stride()
    )


def _grown(held: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A `[B, heads, capacity, D]` buffer shaped like `new` that starts with the `length` tokens of `held`."""
    batch, heads, _, head_dim = new.shape
    if length and held.shape[:2] != new.shape[:2]:
        raise ValueError(
            f"Cannot add keys/values of batch x heads {tuple(new.shape[:2])} to a cache holding {tuple(held.shape[:2])}."
        )
    buffer = new.new_empty(batch, heads, capacity, head_dim)
    if length:
        buffer[:, :, :length].copy_(held)
    return buffer


def predict_cache_nbytes(config, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a `ZayaCache` holds after `seq_len` tokens of `batch_size` sequences (no past recording; inside
    `generate()` the room reserved up to `set_max_length` comes on top, never beyond the call's max length).

    Per layer: keys + values `2 * B * K * T * D`, where T is capped at `sliding_window - 1` on sliding layers,
    plus the fixed per-sequence CCA state `B * ((H + K) * D * W + K * D / 2)`.
    """
    config = config.get_text_config(decoder=True)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    kv_dim, q_dim = config.num_key_value_heads * config.head_dim, config.num_attention_heads * config.head_dim
    fixed = (q_dim + kv_dim) * config.cca_conv_width + kv_dim // 2
    total = 0
    for layer_type in config.layer_types:
        tokens = min(seq_len, config.sliding_window - 1) if layer_type == "hybrid_sliding" else seq_len
        total += batch_size * (2 * kv_dim * tokens + fixed)
    return total * itemsize


__all__ = ["ZayaCache", "predict_cache_nbytes"]
