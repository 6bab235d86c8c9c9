"""The CCA-aware caches of ZAYA1.

Besides keys and values, every CCA layer carries two small recurrent states (ZAYA_ARCHITECTURE.md §3):

* the conv state: the last `W = (cca_time0 - 1) + (cca_time1 - 1)` pre-convolution q/k columns, `[B, (H+K)*D, W]`;
* the delayed-value state: `v_proj_delayed(h)` of the last processed token, `[B, K*D/2]`.

transformers' stock hybrid cache layers copy only keys and values in their batch operations, so shared-prefix
fan-out (`batch_repeat_interleave`) and row selection (`batch_select_indices`) silently pair the wrong conv and
value state with each row. Here every batch operation moves all four tensors together.

Both states cover only the last 1-2 tokens, so keeping a short history of them (while `activate_past_recording`
is on, as assisted decoding asks) is enough to make the cache croppable: `crop(-n)` restores the exact state of
n tokens ago.
"""

import torch
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)


class ZayaCCAStateMixin:
    """Conv and delayed-value state of one CCA layer, carried through every batch operation and `crop`.

    Mixed into a key/value cache layer of transformers (dynamic or static, full or sliding window). The tensors
    held are `conv_state [B, C, W + r]` and `value_state [B, 1 + r, K*D/2]`, where `r` is the number of tokens
    recorded since the last `crop` (always 0 unless past recording is on).
    """

    is_croppable = True

    def _init_cca_state(self, conv_width: int) -> None:
        self.conv_width = conv_width
        self.conv_state: torch.Tensor | None = None
        self.value_state: torch.Tensor | None = None
        self.has_cca_state = False  # False before the first token and after `reset`
        self.record_past = getattr(self, "record_past", False)

    def get_cca_state(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The working state: `(conv [B, C, W], value [B, K*D/2])`, or `(None, None)` before the first token."""
        if not self.has_cca_state:
            return None, None
        return _last(self.conv_state, self.conv_width, dim=-1), self.value_state[:, -1]

    def update_cca_state(self, qk_window: torch.Tensor, value_window: torch.Tensor) -> None:
        """Fold in one step: `qk_window [B, C, W + S]` = working conv state + the S new columns, and
        `value_window [B, 1 + S, K*D/2]` = previous delayed value + the S new ones."""
        if self.record_past and self.has_cca_state:
            kept_columns = self.conv_state.shape[-1] - self.conv_width
            self.conv_state = torch.cat([self.conv_state[..., :kept_columns], qk_window], dim=-1)
            self.value_state = torch.cat([self.value_state[:, :-1], value_window], dim=1)
        elif self.record_past:
            self.conv_state, self.value_state = qk_window, value_window
        else:
            conv_state, value_state = _last(qk_window, self.conv_width, dim=-1), value_window[:, -1:]
            if value_window.shape[1] > 2:  # a view of a multi-token window would keep all of it (a whole prompt) alive
                conv_state, value_state = conv_state.clone(), value_state.clone()
            self.conv_state, self.value_state = conv_state, value_state
        self.has_cca_state = True

    @property
    def nbytes(self) -> int:
        """Bytes held: keys, values (see `ZayaCacheLayer` for its reserved room), conv and delayed-value state."""
        return sum(t.numel() * t.element_size() for t in self._held_tensors() if t is not None)

    def _held_tensors(self) -> tuple:
        return self.keys, self.values, self.conv_state, self.value_state

    def _map_cca_state(self, fn) -> None:
        if self.conv_state is not None:
            self.conv_state = fn(self.conv_state)
            self.value_state = fn(self.value_state)

    def activate_past_recording(self) -> None:
        super_activate = getattr(super(), "activate_past_recording", None)
        if super_activate is not None:
            super_activate()
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"ZayaCache.crop takes minus the number of tokens to remove, got {tokens_to_remove}.")
        removed = -tokens_to_remove
        if self.has_cca_state:
            recorded = self.value_state.shape[1] - 1
            if removed > recorded:
                raise RuntimeError(
                    f"Cannot remove {removed} token(s) from the CCA state: only {recorded} were recorded since the "
                    "last crop. Call `activate_past_recording()` before the forward passes you want to undo."
                )
            kept = self.conv_state[..., : self.conv_state.shape[-1] - removed]
            self.conv_state = _last(kept, self.conv_width, dim=-1)
            self.value_state = self.value_state[:, self.value_state.shape[1] - removed - 1 :][:, :1]
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.conv_state = self.value_state = None
        self.has_cca_state = False

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


class ZayaCacheLayer(ZayaCCAStateMixin, DynamicLayer):
    """Growing cache of a full-attention (`hybrid`) CCA layer.

    Keys and values are prefix views of buffers with room to grow, so that a decode step writes its one column in
    place instead of copying the whole cache (`torch.cat`, as transformers' `DynamicLayer` does: ~2 ms of each
    batch-16 bench-small step). Room is only reserved up to `max_length`, which `generate()` sets to the longest the
    call can reach, so the cache never holds more than the call can use; with `max_length=None` every update
    allocates exactly.
    """

    def __init__(self, conv_width: int, **kwargs):
        super().__init__(**kwargs)
        self._init_cca_state(conv_width)
        self.max_length: int | None = None
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not (self._is_buffer_view(self.keys, self._key_buffer, needed)
                and self._is_buffer_view(self.values, self._value_buffer, needed)):
            # Double the room (capped at `max_length`): a long decode reallocates O(log T) times, not T times.
            capacity = needed if self.max_length is None else max(needed, min(self.max_length, 2 * needed))
            self._key_buffer = _grown(self.keys, key_states, length, capacity)
            self._value_buffer = _grown(self.values, value_states, length, capacity)
        self._key_buffer[:, :, length:needed].copy_(key_states)
        self._value_buffer[:, :, length:needed].copy_(value_states)
        self.keys, self.values = self._key_buffer[:, :, :needed], self._value_buffer[:, :, :needed]
        return self.keys, self.values

    @staticmethod
    def _is_buffer_view(tensor: torch.Tensor, buffer: torch.Tensor | None, needed: int) -> bool:
        """Whether `tensor` is still a prefix view of `buffer` (batch ops and offloading replace it) with room for
        `needed` tokens."""
        return (
            buffer is not None
            and needed <= buffer.shape[2]
            and tensor.data_ptr() == buffer.data_ptr()
            and tensor.shape[:2] == buffer.shape[:2]
            and tensor.stride() == buffer.stride()
        )

    def _held_tensors(self) -> tuple:
        keys = self._key_buffer if self._is_buffer_view(self.keys, self._key_buffer, 0) else self.keys
        values = self._value_buffer if self._is_buffer_view(self.values, self._value_buffer, 0) else self.values
        return keys, values, self.conv_state, self.value_state

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


class ZayaSlidingCacheLayer(ZayaCCAStateMixin, DynamicSlidingWindowLayer):
    """Cache of a sliding-window (`hybrid_sliding`) CCA layer: keeps the last `sliding_window - 1` keys/values."""

    def __init__(self, conv_width: int, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self._init_cca_state(conv_width)


class ZayaStaticCCAStateMixin(ZayaCCAStateMixin):
    """Pre-allocated CCA state updated in place, so that a compiled decode step sees fixed addresses.

    Not croppable: a static cache is for compiled decoding; assisted decoding uses the dynamic `ZayaCache`.
    """

    is_croppable = False

    def update_cca_state(self, qk_window: torch.Tensor, value_window: torch.Tensor) -> None:
        conv, value = _last(qk_window, self.conv_width, dim=-1), value_window[:, -1:]
        if self.conv_state is None:
            self.conv_state, self.value_state = conv.clone(), value.clone()
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.conv_state)
                torch._dynamo.mark_static_address(self.value_state)
        else:
            self.conv_state.copy_(conv)
            self.value_state.copy_(value)
        self.has_cca_state = True

    def activate_past_recording(self) -> None:
        raise NotImplementedError("A static ZayaCache cannot record its past; use the dynamic ZayaCache to crop.")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A static ZayaCache cannot be cropped; use the dynamic ZayaCache to crop.")

    def reset(self) -> None:
        # Keep the tensors (compiled graphs hold their addresses); the next update overwrites them in place.
        super(ZayaCCAStateMixin, self).reset()  # the key/value reset, skipping the dynamic state drop
        self.has_cca_state = False


class ZayaStaticCacheLayer(ZayaStaticCCAStateMixin, StaticLayer):
    def __init__(self, conv_width: int, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self._init_cca_state(conv_width)


class ZayaStaticSlidingCacheLayer(ZayaStaticCCAStateMixin, StaticSlidingWindowLayer):
    def __init__(self, conv_width: int, max_cache_len: int, sliding_window: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, sliding_window=sliding_window, **kwargs)
        self._init_cca_state(conv_width)


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
        super().__init__(layers=self._build_layers(config, conv_width(config)), **kwargs)

    @staticmethod
    def _build_layers(config, width: int) -> list:
        return [
            ZayaSlidingCacheLayer(width, sliding_window=config.sliding_window)
            if layer_type == "hybrid_sliding"
            else ZayaCacheLayer(width)
            for layer_type in config.layer_types
        ]

    def get_cca_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The `(conv_state [B, C, W], value_state [B, K*D/2])` of layer `layer_idx`, or `(None, None)`."""
        return self.layers[layer_idx].get_cca_state()

    def update_cca_state(self, layer_idx: int, qk_window: torch.Tensor, value_window: torch.Tensor) -> None:
        self.layers[layer_idx].update_cca_state(qk_window, value_window)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.layers[0 if layer_idx is None else layer_idx].has_cca_state

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


class ZayaStaticCache(ZayaCache):
    """Pre-allocated `ZayaCache` of `max_cache_len` tokens for compiled decoding
    (`generate(..., cache_implementation="static")`)."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        self.max_cache_len = max_cache_len
        super().__init__(config, **kwargs)

    def _build_layers(self, config, width: int) -> list:
        return [
            ZayaStaticSlidingCacheLayer(width, self.max_cache_len, sliding_window=config.sliding_window)
            if layer_type == "hybrid_sliding"
            else ZayaStaticCacheLayer(width, self.max_cache_len)
            for layer_type in config.layer_types
        ]


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


def _last(tensor: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The last `n` entries along `dim` (`n` may be 0, unlike `tensor[..., -n:]`)."""
    return tensor.narrow(dim, tensor.shape[dim] - n, n)


def conv_width(config) -> int:
    """Columns of pre-convolution q/k history one CCA layer needs: `(cca_time0 - 1) + (cca_time1 - 1)`."""
    return (config.cca_time0 - 1) + (config.cca_time1 - 1)


def predict_cache_nbytes(config, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a dynamic `ZayaCache` holds after `seq_len` tokens of `batch_size` sequences (no past recording; inside
    `generate()` the room reserved up to `set_max_length` comes on top, never beyond the call's max length).

    Per layer: keys + values `2 * B * K * T * D`, where T is capped at `sliding_window - 1` on sliding layers,
    plus the fixed per-sequence CCA state `B * ((H + K) * D * W + K * D / 2)`.
    """
    config = config.get_text_config(decoder=True)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    kv_dim, q_dim = config.num_key_value_heads * config.head_dim, config.num_attention_heads * config.head_dim
    fixed = (q_dim + kv_dim) * conv_width(config) + kv_dim // 2
    total = 0
    for layer_type in config.layer_types:
        tokens = min(seq_len, config.sliding_window - 1) if layer_type == "hybrid_sliding" else seq_len
        total += batch_size * (2 * kv_dim * tokens + fixed)
    return total * itemsize


__all__ = ["ZayaCache", "ZayaStaticCache", "predict_cache_nbytes"]
