# Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
"""Fused Triton kernels for ZAYA1 (ROCm and CUDA). Package-only: never shipped as remote code.

Each public function takes tensors (never modules) and runs its kernel; `zaya_hf.ops.triton` puts them in place of
module forwards when `kernel_backend` selects Triton, and the tests compare them against those modules' forwards.

* `cca_qk_mix`: the CCA projection tail. From the pre-conv q/k projections: causal depthwise + grouped conv over
  time, the q/k residual terms, QK L2 norm with the key temperature and partial NeoX RoPE, in one kernel that also
  writes the conv window. Specialised for decode (the block runs over the batch) and prefill (over time).
* `moe_top1`: tokens sorted by expert, a grouped GEMM with fused SwiGLU, then a grouped GEMM that applies the
  router weight and scatters back; the skip class writes zeros and unused experts get no programs at all.
* `residual_merge_rmsnorm` / `residual_rmsnorm`: the learned fp32 residual merge and the RMSNorm that follows
  (with a Triton backward: the only differentiable kernel).
* `router_top1`: router state update, RMSNorm -> GELU(fc1) -> GELU(fc2) -> logits, softmax and the biased top-1
  choice, one kernel per block of tokens.

Rounding follows the modules' torch path (ZAYA_ARCHITECTURE.md): kernels compute in fp32 and round to the model
dtype where the torch code does. Testing without a GPU: with `TRITON_INTERPRET=1` set before this module is
imported the kernels run on CPU tensors in Triton's interpreter (slow); bf16 `tl.dot` is wrong there, so dots upcast.
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The interpreter replaces `triton.jit` when TRITON_INTERPRET=1 is set at import time; read it the same way once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def on_triton_device(tensor: torch.Tensor) -> bool:
    """Whether a kernel can read `tensor`: a CUDA/ROCm tensor, or a CPU one under the interpreter."""
    return tensor.device.type == "cpu" if INTERPRET else tensor.is_cuda  # `is_cuda` is also True for ROCm


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _tl_dtypes(dtype: torch.dtype):
    """(storage dtype, dot operand dtype) for a model dtype: bf16 dots run in fp32 under the interpreter."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"The ZAYA Triton kernels support fp32, fp16 and bf16, got {dtype}.")
    dot_dtype = tl.float32 if INTERPRET and dtype == torch.bfloat16 else _TL_DTYPES[dtype]
    return _TL_DTYPES[dtype], dot_dtype


# Device functions called from kernels. The interpreter re-patches triton.language on every nested jit call
# (milliseconds each), so there they stay plain Python functions, which it runs the same way.
_device_function = (lambda fn: fn) if INTERPRET else triton.jit


def _configs(*configs):
    # `@triton.autotune` with several configs needs a GPU driver to benchmark them.
    return list(configs[:1]) if INTERPRET else list(configs)


@_device_function
def _round(x, DTYPE: tl.constexpr):
    """Round fp32 `x` to DTYPE and back: a rounding point of the torch path."""
    return x.to(DTYPE).to(tl.float32)


@_device_function
def _mma(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc += a @ b; fp32 operands use IEEE fp32 (no TF32) so fp32 models keep fp32 accuracy."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@_device_function
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


# ---------------------------------------------------------------- CCA projection tail


@_device_function
def _conv_input(
    src_ptr, state_ptr, batch, time, row_mask, cols, col_mask, channel0,
    stride_src_b, stride_src_s, stride_state_b, stride_state_c, stride_state_w,
    STATE_SIZE: tl.constexpr, HAS_STATE: tl.constexpr,
):
    """Pre-conv q/k columns at `time` [BLOCK_M, BLOCK_D]: the sequence, or before it the conv state (else 0)."""
    mask = row_mask[:, None] & col_mask[None, :]
    in_sequence = (time >= 0)[:, None]
    offsets = batch[:, None] * stride_src_b + tl.maximum(time, 0)[:, None] * stride_src_s + cols[None, :]
    x = tl.load(src_ptr + offsets, mask=mask & in_sequence, other=0.0).to(tl.float32)
    if HAS_STATE:
        slot = tl.maximum(STATE_SIZE + time, 0)  # state column w holds time w - STATE_SIZE
        state_offsets = batch[:, None] * stride_state_b + (channel0 + cols)[None, :] * stride_state_c
        state_offsets += slot[:, None] * stride_state_w
        x += tl.load(state_ptr + state_offsets, mask=mask & ~in_sequence, other=0.0).to(tl.float32)
    return x


@_device_function
def _grouped_conv_tap(
    depthwise_out, weight_ptr, channel0, out_offset, out_count, tap, in_cols, in_mask, acc,
    HEAD_DIM: tl.constexpr, T1: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N] += one tap of the grouped conv for output dims out_offset..+out_count of a head."""
    out_cols = tl.arange(0, BLOCK_N)
    # weight[channel0 + out_offset + o, i, tap] as a [BLOCK_D (i), BLOCK_N (o)] tile
    offsets = (channel0 + out_offset + out_cols)[None, :] * (HEAD_DIM * T1) + in_cols[:, None] * T1 + tap
    w = tl.load(weight_ptr + offsets, mask=in_mask[:, None] & (out_cols < out_count)[None, :], other=0.0)
    return _mma(depthwise_out, w, acc, DOT_DTYPE)


@_device_function
def _mixed_head_slice(
    acc, bias_ptr, q_ptr, k_ptr, batch, time, row_mask, head, channel0, out_offset, out_count,
    stride_qb, stride_qs, stride_kb, stride_ks,
    IS_KEY: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    """Conv output + bias + the q/k residual term for dims out_offset..+out_count of a head [BLOCK_M, BLOCK_N]."""
    cols = out_offset + tl.arange(0, BLOCK_N)
    col_mask = tl.arange(0, BLOCK_N) < out_count
    mask = row_mask[:, None] & col_mask[None, :]
    bias = tl.load(bias_ptr + channel0 + cols, mask=col_mask, other=0.0).to(tl.float32)
    mixed = _round(acc + bias[None, :], DTYPE)
    q_row = q_ptr + batch[:, None] * stride_qb + time[:, None] * stride_qs + cols[None, :]
    k_row = k_ptr + batch[:, None] * stride_kb + time[:, None] * stride_ks + cols[None, :]
    if IS_KEY:  # k_res[j] = mean over the group's query heads of (q[h] + k[j]) / 2
        key_val = tl.load(k_row + head * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
        total = tl.zeros_like(mixed)
        for g in tl.static_range(GROUP):
            query_val = tl.load(q_row + (head * GROUP + g) * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
            total += _round(query_val + key_val, DTYPE) * 0.5
        residual = _round(total / GROUP, DTYPE)
    else:  # q_res[h] = (q[h] + k[h // G]) / 2
        query_val = tl.load(q_row + head * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
        key_val = tl.load(k_row + (head // GROUP) * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
        residual = _round(query_val + key_val, DTYPE) * 0.5
    return _round(mixed + residual, DTYPE)


@triton.jit
def _cca_qk_mix_kernel(
    q_ptr, k_ptr, state_ptr, dw_weight_ptr, dw_bias_ptr, gw_weight_ptr, gw_bias_ptr, temp_ptr, cos_ptr, sin_ptr,
    out_ptr, window_ptr, seq_len, num_rows, eps, norm_scale,
    stride_qb, stride_qs, stride_kb, stride_ks, stride_state_b, stride_state_c, stride_state_w,
    stride_cos_b, stride_cos_s, stride_sin_b, stride_sin_s, stride_out_b, stride_out_h, stride_out_s,
    stride_window_b, stride_window_c,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, IS_KEY: tl.constexpr, HAS_STATE: tl.constexpr,
    WRITE_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One head (program_id 1) x BLOCK_M tokens (program_id 0, flattened (batch, time)) of Q or K (IS_KEY).

    With WRITE_WINDOW it also writes this head's channels of the conv window [B, C, W + S] (the state, or
    zeros, then the step's pre-conv columns), which is what the cache keeps."""
    STATE_SIZE: tl.constexpr = (T0 - 1) + (T1 - 1)
    HALF: tl.constexpr = ROTARY_DIM // 2
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    batch = rows // seq_len
    time = rows % seq_len
    in_cols = tl.arange(0, BLOCK_D)
    in_mask = in_cols < HEAD_DIM
    if IS_KEY:
        src_ptr = k_ptr + head * HEAD_DIM
        stride_src_b = stride_kb
        stride_src_s = stride_ks
        channel0 = (NUM_Q_HEADS + head) * HEAD_DIM
    else:
        src_ptr = q_ptr + head * HEAD_DIM
        stride_src_b = stride_qb
        stride_src_s = stride_qs
        channel0 = head * HEAD_DIM

    # Depthwise conv (kernel T0) then grouped conv (kernel T1, one group per head). Output time t reads depthwise
    # outputs at t - (T1 - 1 - j) for tap j, each of which reads inputs at lags (T0 - 1 - i) further back.
    acc_lo = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)  # rotary dims [0, R/2)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)  # rotary dims [R/2, R)
    acc_pass = tl.zeros([BLOCK_M, BLOCK_PASS], dtype=tl.float32)  # dims [R, D), not rotated
    dw_bias = tl.load(dw_bias_ptr + channel0 + in_cols, mask=in_mask, other=0.0).to(tl.float32)
    for j in tl.static_range(T1):
        depthwise_out = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32) + dw_bias[None, :]
        for i in tl.static_range(T0):
            w = tl.load(dw_weight_ptr + (channel0 + in_cols) * T0 + i, mask=in_mask, other=0.0).to(tl.float32)
            x = _conv_input(
                src_ptr, state_ptr, batch, time - ((T0 - 1 - i) + (T1 - 1 - j)), row_mask, in_cols, in_mask,
                channel0, stride_src_b, stride_src_s, stride_state_b, stride_state_c, stride_state_w,
                STATE_SIZE, HAS_STATE,
            )
            depthwise_out += w[None, :] * x
        depthwise_out = _round(depthwise_out, DTYPE)
        acc_lo = _grouped_conv_tap(depthwise_out, gw_weight_ptr, channel0, 0, HALF, j, in_cols, in_mask, acc_lo,
                                   HEAD_DIM, T1, BLOCK_HALF, DOT_DTYPE)
        acc_hi = _grouped_conv_tap(depthwise_out, gw_weight_ptr, channel0, HALF, HALF, j, in_cols, in_mask, acc_hi,
                                   HEAD_DIM, T1, BLOCK_HALF, DOT_DTYPE)
        acc_pass = _grouped_conv_tap(depthwise_out, gw_weight_ptr, channel0, ROTARY_DIM, HEAD_DIM - ROTARY_DIM, j,
                                     in_cols, in_mask, acc_pass, HEAD_DIM, T1, BLOCK_PASS, DOT_DTYPE)

    x_lo = _mixed_head_slice(acc_lo, gw_bias_ptr, q_ptr, k_ptr, batch, time, row_mask, head, channel0, 0, HALF,
                             stride_qb, stride_qs, stride_kb, stride_ks, IS_KEY, GROUP, HEAD_DIM, BLOCK_HALF, DTYPE)
    x_hi = _mixed_head_slice(acc_hi, gw_bias_ptr, q_ptr, k_ptr, batch, time, row_mask, head, channel0, HALF, HALF,
                             stride_qb, stride_qs, stride_kb, stride_ks, IS_KEY, GROUP, HEAD_DIM, BLOCK_HALF, DTYPE)
    x_pass = _mixed_head_slice(acc_pass, gw_bias_ptr, q_ptr, k_ptr, batch, time, row_mask, head, channel0,
                               ROTARY_DIM, HEAD_DIM - ROTARY_DIM, stride_qb, stride_qs, stride_kb, stride_ks,
                               IS_KEY, GROUP, HEAD_DIM, BLOCK_PASS, DTYPE)

    # QK norm: scale each head vector to norm sqrt(D); keys also by their kv head's temperature.
    sum_sq = tl.sum(x_lo * x_lo, 1) + tl.sum(x_hi * x_hi, 1) + tl.sum(x_pass * x_pass, 1)
    inv_norm = _round(norm_scale / tl.maximum(_round(tl.sqrt(sum_sq), DTYPE), eps), DTYPE)[:, None]
    x_lo = _round(x_lo * inv_norm, DTYPE)
    x_hi = _round(x_hi * inv_norm, DTYPE)
    x_pass = _round(x_pass * inv_norm, DTYPE)
    if IS_KEY:
        temperature = tl.load(temp_ptr + head).to(tl.float32)
        x_lo = _round(x_lo * temperature, DTYPE)
        x_hi = _round(x_hi * temperature, DTYPE)
        x_pass = _round(x_pass * temperature, DTYPE)

    # Partial NeoX RoPE: (lo, hi) -> (lo * cos - hi * sin, hi * cos + lo * sin) on the first ROTARY_DIM dims.
    half_cols = tl.arange(0, BLOCK_HALF)
    half_mask = row_mask[:, None] & (half_cols < HALF)[None, :]
    cos_row = cos_ptr + batch[:, None] * stride_cos_b + time[:, None] * stride_cos_s + half_cols[None, :]
    sin_row = sin_ptr + batch[:, None] * stride_sin_b + time[:, None] * stride_sin_s + half_cols[None, :]
    cos_lo = tl.load(cos_row, mask=half_mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_row + HALF, mask=half_mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_row, mask=half_mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_row + HALF, mask=half_mask, other=0.0).to(tl.float32)
    out_lo = _round(x_lo * cos_lo, DTYPE) - _round(x_hi * sin_lo, DTYPE)
    out_hi = _round(x_hi * cos_hi, DTYPE) + _round(x_lo * sin_hi, DTYPE)

    out_row = out_ptr + batch[:, None] * stride_out_b + head * stride_out_h + time[:, None] * stride_out_s
    tl.store(out_row + half_cols[None, :], out_lo.to(DTYPE), mask=half_mask)
    tl.store(out_row + HALF + half_cols[None, :], out_hi.to(DTYPE), mask=half_mask)
    pass_cols = tl.arange(0, BLOCK_PASS)
    pass_mask = row_mask[:, None] & (pass_cols < HEAD_DIM - ROTARY_DIM)[None, :]
    tl.store(out_row + ROTARY_DIM + pass_cols[None, :], x_pass.to(DTYPE), mask=pass_mask)

    if WRITE_WINDOW:
        channels = (channel0 + in_cols)[None, :]
        window_rows = window_ptr + batch[:, None] * stride_window_b + channels * stride_window_c
        mask = row_mask[:, None] & in_mask[None, :]
        current = _conv_input(src_ptr, state_ptr, batch, time, row_mask, in_cols, in_mask, channel0, stride_src_b,
                              stride_src_s, stride_state_b, stride_state_c, stride_state_w, STATE_SIZE, False)
        tl.store(window_rows + (STATE_SIZE + time)[:, None], current.to(DTYPE), mask=mask)
        first = mask & (time == 0)[:, None]  # each row's first token also writes the W state columns
        state_rows = state_ptr + batch[:, None] * stride_state_b + channels * stride_state_c
        for w in tl.static_range(STATE_SIZE):
            if HAS_STATE:
                previous = tl.load(state_rows + w * stride_state_w, mask=first, other=0.0)
            else:
                previous = tl.zeros([BLOCK_M, BLOCK_D], dtype=DTYPE)
            tl.store(window_rows + w, previous, mask=first)


def _cca_launch(query, key, conv_state, dw_weight, dw_bias, gw_weight, gw_bias, key_temperature, cos, sin, return_window):
    batch, seq_len, _ = query.shape
    kv_heads = key_temperature.numel()
    head_dim = key.shape[-1] // kv_heads
    heads = query.shape[-1] // head_dim
    rotary_dim = cos.shape[-1]
    query, key = query.contiguous(), key.contiguous()  # unit-stride features (a no-op for Linear outputs)
    cos, sin = cos.expand(batch, seq_len, rotary_dim), sin.expand(batch, seq_len, rotary_dim)
    dtype, dot_dtype = _tl_dtypes(query.dtype)
    num_rows = batch * seq_len
    block_m = 16 if num_rows <= 16 or INTERPRET else 64
    state = conv_state if conv_state is not None else query  # a dummy pointer when HAS_STATE is False
    state_strides = conv_state.stride() if conv_state is not None else (0, 0, 0)
    t0, t1 = dw_weight.shape[-1], gw_weight.shape[-1]
    state_size = (t0 - 1) + (t1 - 1)
    channels = query.shape[-1] + key.shape[-1]
    # [B, C, W + S], time contiguous; a dummy pointer when WRITE_WINDOW is False
    window = query.new_empty(batch, channels, state_size + seq_len) if return_window else query
    outputs = []
    for is_key, num in ((False, heads), (True, kv_heads)):
        out = query.new_empty(batch, num, seq_len, head_dim)  # [B, heads, S, D]: the layout attention wants
        _cca_qk_mix_kernel[(triton.cdiv(num_rows, block_m), num)](
            query, key, state, dw_weight, dw_bias, gw_weight, gw_bias, key_temperature,
            cos, sin, out, window, seq_len, num_rows, torch.finfo(query.dtype).eps, math.sqrt(head_dim),
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), *state_strides,
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), out.stride(0), out.stride(1), out.stride(2),
            channels * (state_size + seq_len), state_size + seq_len,
            NUM_Q_HEADS=heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
            T0=t0, T1=t1, IS_KEY=is_key,
            HAS_STATE=conv_state is not None, WRITE_WINDOW=return_window, BLOCK_M=block_m,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_HALF=max(16, triton.next_power_of_2(rotary_dim // 2)),
            BLOCK_PASS=max(16, triton.next_power_of_2(max(head_dim - rotary_dim, 1))),
            DTYPE=dtype, DOT_DTYPE=dot_dtype, num_warps=4,
        )
        outputs.append(out.transpose(1, 2))  # [B, S, heads, D] view
    return outputs[0], outputs[1], window if return_window else None


# ---------------------------------------------------------------- top-1 MoE


@_device_function
def _expert_tile(offsets_ptr, tile, NUM_CLASSES: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map a program to (class, first sorted row, end row): each class with n tokens owns cdiv(n, BLOCK_M)
    consecutive tiles, so classes without tokens get none. class == NUM_CLASSES means no work is left."""
    classes = tl.arange(0, BLOCK_CLASSES)
    valid = classes < NUM_CLASSES
    start = tl.load(offsets_ptr + classes, mask=valid, other=0)
    end = tl.load(offsets_ptr + classes + 1, mask=valid, other=0)
    tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    selected = classes == expert
    first_tile = tl.sum(tl.where(selected, tiles_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(selected, start, 0), 0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(selected, end, 0), 0)
    return expert, row_start, row_end


_MOE_CONFIGS = _configs(
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
)


def _fit_moe_tiles(configs, named_args, **kwargs):
    """fp32 operands double the bytes of a tile: drop the widest tiles, which exceed MI300X's 64 KB LDS."""
    if kwargs["DOT_DTYPE"] != tl.float32:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 64]


# Tuned per problem size and per load regime (tokens per expert, bucketed), so decode gets its own choice.
_moe_autotune = triton.autotune(
    configs=_MOE_CONFIGS,
    key=["HIDDEN", "INTERMEDIATE", "rows_bucket"],
    prune_configs_by={"early_config_prune": _fit_moe_tiles},
)


@_moe_autotune
@triton.jit
def _moe_gate_up_kernel(
    x_ptr, order_ptr, offsets_ptr, w_ptr, h_ptr, stride_x, rows_bucket,
    HIDDEN: tl.constexpr, INTERMEDIATE: tl.constexpr, NUM_EXPERTS: tl.constexpr, BLOCK_CLASSES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """h[p] = silu(x W_gate^T) * (x W_up^T) for sorted rows p of one expert; skip-class rows are never read."""
    expert, row_start, row_end = _expert_tile(offsets_ptr, tl.program_id(0), NUM_EXPERTS, BLOCK_CLASSES, BLOCK_M)
    if expert < NUM_EXPERTS:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        tokens = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < INTERMEDIATE
        w_expert = w_ptr + expert.to(tl.int64) * (2 * INTERMEDIATE * HIDDEN)
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < HIDDEN
            x_mask = row_mask[:, None] & k_mask[None, :]
            x = tl.load(x_ptr + tokens[:, None] * stride_x + k[None, :], mask=x_mask, other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
            # [BLOCK_K, BLOCK_N] tiles of the gate rows and of the up rows
            w_gate = tl.load(w_expert + cols[None, :] * HIDDEN + k[:, None], mask=w_mask, other=0.0)
            w_up = tl.load(w_expert + (INTERMEDIATE + cols)[None, :] * HIDDEN + k[:, None], mask=w_mask, other=0.0)
            acc_gate = _mma(x, w_gate, acc_gate, DOT_DTYPE)
            acc_up = _mma(x, w_up, acc_up, DOT_DTYPE)
        gate = _round(acc_gate, DTYPE)
        activated = _round(gate * tl.sigmoid(gate), DTYPE) * _round(acc_up, DTYPE)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * INTERMEDIATE + cols[None, :], activated.to(DTYPE),
                 mask=row_mask[:, None] & col_mask[None, :])


@_moe_autotune
@triton.jit
def _moe_down_kernel(
    h_ptr, order_ptr, offsets_ptr, w_ptr, weight_ptr, out_ptr, stride_out, rows_bucket,
    HIDDEN: tl.constexpr, INTERMEDIATE: tl.constexpr, NUM_EXPERTS: tl.constexpr, BLOCK_CLASSES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """out[token] = router_weight * (h W_down^T) scattered back to token order; the skip class writes zeros."""
    tile = tl.program_id(0)
    expert, row_start, row_end = _expert_tile(offsets_ptr, tile, NUM_EXPERTS + 1, BLOCK_CLASSES, BLOCK_M)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # no rows past the last class
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = row_mask[:, None] & (cols < HIDDEN)[None, :]
    out_rows = out_ptr + tokens[:, None] * stride_out + cols[None, :]
    if expert < NUM_EXPERTS:
        w_expert = w_ptr + expert.to(tl.int64) * (HIDDEN * INTERMEDIATE)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, INTERMEDIATE, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < INTERMEDIATE
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * INTERMEDIATE + k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_expert + cols[None, :] * INTERMEDIATE + k[:, None],
                        mask=k_mask[:, None] & (cols < HIDDEN)[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = _mma(h, w, acc, DOT_DTYPE)
        router_weight = tl.load(weight_ptr + tokens, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_rows, (_round(acc, DTYPE) * router_weight[:, None]).to(DTYPE), mask=out_mask)
    elif expert == NUM_EXPERTS:
        tl.store(out_rows, tl.zeros([BLOCK_M, BLOCK_N], dtype=DTYPE), mask=out_mask)


def _moe_launch(hidden_states, choice, weight, gate_up_proj, down_proj):
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = down_proj.shape[0], down_proj.shape[-1]
    hidden_states = hidden_states.contiguous()
    # Tokens grouped by class (stable: token order within a class); offsets[c] = first sorted row of class c.
    order = torch.argsort(choice, stable=True)
    offsets = F.pad(torch.bincount(choice, minlength=num_experts + 1).cumsum(0), (1, 0)).to(torch.int32)
    dtype, dot_dtype = _tl_dtypes(hidden_states.dtype)
    activated = hidden_states.new_empty(num_tokens, intermediate)  # sorted order
    output = torch.empty_like(hidden_states)
    common = dict(
        rows_bucket=min(128, triton.next_power_of_2(max(1, num_tokens // num_experts))),  # the load regime
        HIDDEN=hidden, INTERMEDIATE=intermediate, NUM_EXPERTS=num_experts,
        BLOCK_CLASSES=triton.next_power_of_2(num_experts + 1), DTYPE=dtype, DOT_DTYPE=dot_dtype,
    )
    def grid(num_classes: int, columns: int):
        """A bound on the row tiles (sum over classes of cdiv(n_c, BLOCK_M)) x the output column blocks."""
        return lambda meta: (
            triton.cdiv(num_tokens, meta["BLOCK_M"]) + num_classes, triton.cdiv(columns, meta["BLOCK_N"])
        )

    _moe_gate_up_kernel[grid(num_experts, intermediate)](
        hidden_states, order, offsets, gate_up_proj.contiguous(), activated, hidden_states.stride(0), **common
    )
    _moe_down_kernel[grid(num_experts + 1, hidden)](
        activated, order, offsets, down_proj.contiguous(), weight.contiguous(), output, output.stride(0), **common
    )
    return output


# ---------------------------------------------------------------- router


@triton.jit
def _router_top1_kernel(
    down_ptr, prev_state_ptr, state_scale_ptr, state_out_ptr, norm_weight_ptr, fc1_w_ptr, fc1_b_ptr, fc2_w_ptr,
    fc2_b_ptr, out_w_ptr, biases_ptr, logits_ptr, weight_ptr, choice_ptr, num_rows, eps,
    ROUTER_DIM: tl.constexpr, NUM_CLASSES: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """BLOCK_M tokens: router state -> RMSNorm -> GELU(fc1) -> GELU(fc2) -> logits -> softmax -> biased top-1.

    fc2 consumes fc1's output chunk by chunk and out_proj consumes fc2's, so the hidden layers never leave
    registers; fc1 chunks are recomputed per fc2 chunk (the router is tiny next to the experts)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    r_cols = tl.arange(0, BLOCK_R)
    r_mask = r_cols < ROUTER_DIM
    mask = row_mask[:, None] & r_mask[None, :]
    offsets = rows[:, None].to(tl.int64) * ROUTER_DIM + r_cols[None, :]
    state = tl.load(down_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_STATE:  # the router state carried from the previous layer
        prev = tl.load(prev_state_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(state_scale_ptr + r_cols, mask=r_mask, other=0.0).to(tl.float32)
        state = _round(state + _round(prev * scale[None, :], DTYPE), DTYPE)
        tl.store(state_out_ptr + offsets, state.to(DTYPE), mask=mask)

    rstd = 1.0 / tl.sqrt(tl.sum(state * state, 1) / ROUTER_DIM + eps)
    norm_weight = tl.load(norm_weight_ptr + r_cols, mask=r_mask, other=0.0).to(tl.float32)
    normed = _round(_round(state * rstd[:, None], DTYPE) * norm_weight[None, :], DTYPE)

    classes = tl.arange(0, BLOCK_C)
    class_mask = classes < NUM_CLASSES
    logits = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, ROUTER_DIM, BLOCK_N):  # fc2 output chunk
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < ROUTER_DIM
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, ROUTER_DIM, BLOCK_N):  # fc1 output chunk = fc2 input chunk
            k = k0 + tl.arange(0, BLOCK_N)
            k_mask = k < ROUTER_DIM
            w1_mask = r_mask[:, None] & k_mask[None, :]
            w1 = tl.load(fc1_w_ptr + k[None, :] * ROUTER_DIM + r_cols[:, None], mask=w1_mask, other=0.0)
            b1 = tl.load(fc1_b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            h1 = _mma(normed, w1, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_DTYPE) + b1[None, :]
            h1 = _round(_gelu(_round(h1, DTYPE)), DTYPE)
            w2_mask = k_mask[:, None] & n_mask[None, :]
            w2 = tl.load(fc2_w_ptr + n[None, :] * ROUTER_DIM + k[:, None], mask=w2_mask, other=0.0)
            acc2 = _mma(h1, w2, acc2, DOT_DTYPE)
        b2 = tl.load(fc2_b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        h2 = _round(_gelu(_round(acc2 + b2[None, :], DTYPE)), DTYPE)
        w3_mask = n_mask[:, None] & class_mask[None, :]
        w3 = tl.load(out_w_ptr + classes[None, :] * ROUTER_DIM + n[:, None], mask=w3_mask, other=0.0)
        logits = _mma(h2, w3, logits, DOT_DTYPE)
    logits = _round(logits, DTYPE)
    out_mask = row_mask[:, None] & class_mask[None, :]
    logits_offsets = rows[:, None].to(tl.int64) * NUM_CLASSES + classes[None, :]
    tl.store(logits_ptr + logits_offsets, logits.to(DTYPE), mask=out_mask)

    logits = tl.where(class_mask[None, :], logits, float("-inf"))
    exp = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = _round(exp / tl.sum(exp, 1)[:, None], DTYPE)
    biases = tl.load(biases_ptr + classes, mask=class_mask, other=0.0).to(tl.float32)
    biased = tl.where(class_mask[None, :], probs + biases[None, :], float("-inf"))
    choice = tl.argmax(biased, 1)  # the biases change the choice only
    weight = tl.sum(tl.where(classes[None, :] == choice[:, None], probs, 0.0), 1)
    tl.store(weight_ptr + rows, weight.to(DTYPE), mask=row_mask)
    tl.store(choice_ptr + rows, choice.to(tl.int64), mask=row_mask)


def _router_launch(router_hidden, router_state, router_states_scale, norm_weight, eps, fc1_weight, fc1_bias,
                   fc2_weight, fc2_bias, out_weight, balancing_biases):
    *lead, router_dim = router_hidden.shape
    num_classes = out_weight.shape[0]
    down = router_hidden.reshape(-1, router_dim).contiguous()
    num_rows = down.shape[0]
    dtype, dot_dtype = _tl_dtypes(down.dtype)
    new_state = torch.empty_like(down) if router_state is not None else down
    prev = router_state.reshape(-1, router_dim).contiguous() if router_state is not None else down
    logits = down.new_empty(num_rows, num_classes)
    weight = down.new_empty(num_rows)
    choice = torch.empty(num_rows, dtype=torch.long, device=down.device)
    block_m = 16 if num_rows <= 16 or INTERPRET else 32
    block_r = max(16, triton.next_power_of_2(router_dim))
    block_n = min(64 if down.element_size() == 2 else 32, block_r)  # fp32 tiles: fit MI300X's 64 KB LDS
    _router_top1_kernel[(triton.cdiv(num_rows, block_m),)](
        down, prev, router_states_scale if router_states_scale is not None else down, new_state,
        norm_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out_weight, balancing_biases, logits, weight,
        choice, num_rows, eps, ROUTER_DIM=router_dim, NUM_CLASSES=num_classes,
        HAS_STATE=router_state is not None, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n,
        BLOCK_C=max(16, triton.next_power_of_2(num_classes)), DTYPE=dtype, DOT_DTYPE=dot_dtype, num_warps=4,
    )
    return logits.view(*lead, num_classes), weight.view(lead), choice.view(lead), new_state.view(*lead, router_dim)


# ---------------------------------------------------------------- residual merge + RMSNorm


@_device_function
def _load_row_params(hs_scale_ptr, hs_bias_ptr, res_scale_ptr, res_bias_ptr, cols, mask):
    """The four residual-scaling vectors as fp32 [1, BLOCK_D] rows."""
    hs_scale = tl.load(hs_scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
    hs_bias = tl.load(hs_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
    res_scale = tl.load(res_scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
    res_bias = tl.load(res_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
    return hs_scale, hs_bias, res_scale, res_bias


@triton.jit
def _residual_norm_fwd_kernel(
    h_ptr, r_ptr, hs_scale_ptr, hs_bias_ptr, res_scale_ptr, res_bias_ptr, norm_weight_ptr, r_out_ptr, u_ptr,
    rstd_ptr, num_rows, eps, HIDDEN: tl.constexpr, HAS_MERGE: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    """BLOCK_ROWS rows: r' = (h + hs_bias) * hs_scale [model dtype] + (r + res_bias) * res_scale [fp32], and
    u = weight * rmsnorm(r'.to(model dtype)). Either half can be switched off."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < HIDDEN
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    offsets = rows[:, None].to(tl.int64) * HIDDEN + cols[None, :]
    residual = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_MERGE:
        hs_scale, hs_bias, res_scale, res_bias = _load_row_params(
            hs_scale_ptr, hs_bias_ptr, res_scale_ptr, res_bias_ptr, cols, col_mask
        )
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        residual = _round(_round(h + hs_bias, DTYPE) * hs_scale, DTYPE) + (residual + res_bias) * res_scale
        tl.store(r_out_ptr + offsets, residual, mask=mask)
    if HAS_NORM:
        x = _round(residual, DTYPE)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HIDDEN + eps)
        norm_weight = tl.load(norm_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(u_ptr + offsets, (_round(x * rstd[:, None], DTYPE) * norm_weight[None, :]).to(DTYPE), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rows < num_rows)


@triton.jit
def _residual_norm_bwd_kernel(
    h_ptr, r_ptr, hs_scale_ptr, hs_bias_ptr, res_scale_ptr, res_bias_ptr, norm_weight_ptr, rstd_ptr,
    grad_r_out_ptr, grad_u_ptr, grad_h_ptr, grad_r_ptr, partial_ptr, num_rows, blocks_per_program,
    HIDDEN: tl.constexpr, HAS_MERGE: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    """Gradients of `_residual_norm_fwd_kernel` for blocks_per_program row blocks; the per-feature parameter
    gradients are summed over this program's rows into partial[param, program] (the host sums the programs)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < HIDDEN
    if HAS_MERGE:
        hs_scale, hs_bias, res_scale, res_bias = _load_row_params(
            hs_scale_ptr, hs_bias_ptr, res_scale_ptr, res_bias_ptr, cols, col_mask
        )
    if HAS_NORM:
        norm_weight = tl.load(norm_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    grad_hs_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    grad_hs_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    grad_res_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    grad_res_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    grad_norm_weight = tl.zeros([BLOCK_D], dtype=tl.float32)
    for block in range(pid * blocks_per_program, (pid + 1) * blocks_per_program):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < num_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows[:, None].to(tl.int64) * HIDDEN + cols[None, :]
        residual = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_MERGE:
            shifted_h = _round(tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + hs_bias, DTYPE)
            shifted_r = residual + res_bias
            merged = _round(shifted_h * hs_scale, DTYPE) + shifted_r * res_scale
            grad = tl.load(grad_r_out_ptr + offsets, mask=mask, other=0.0)
        else:
            merged = residual
            grad = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        if HAS_NORM:
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]
            normalized = _round(merged, DTYPE) * rstd
            grad_u = tl.load(grad_u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad_norm_weight += tl.sum(grad_u * _round(normalized, DTYPE), 0)
            grad_normalized = grad_u * norm_weight
            projection = tl.sum(grad_normalized * normalized, 1) / HIDDEN
            grad += rstd * (grad_normalized - normalized * projection[:, None])
        if HAS_MERGE:
            tl.store(grad_h_ptr + offsets, (grad * hs_scale).to(DTYPE), mask=mask)
            grad_hs_scale += tl.sum(grad * shifted_h, 0)
            grad_hs_bias += tl.sum(grad * hs_scale, 0)
            grad_res_scale += tl.sum(grad * shifted_r, 0)
            grad_res_bias += tl.sum(grad * res_scale, 0)
            grad = grad * res_scale
        tl.store(grad_r_ptr + offsets, grad, mask=mask)
    partial_row = partial_ptr + pid * HIDDEN + cols  # partial is [5, programs, HIDDEN]
    param_stride = tl.num_programs(0) * HIDDEN
    tl.store(partial_row, grad_hs_scale, mask=col_mask)
    tl.store(partial_row + param_stride, grad_hs_bias, mask=col_mask)
    tl.store(partial_row + 2 * param_stride, grad_res_scale, mask=col_mask)
    tl.store(partial_row + 3 * param_stride, grad_res_bias, mask=col_mask)
    tl.store(partial_row + 4 * param_stride, grad_norm_weight, mask=col_mask)


def _residual_norm_blocks(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): about 4096 elements per program on a GPU; 16 rows when interpreting,
    where every program costs the same Python overhead."""
    block_d = triton.next_power_of_2(hidden)
    block_rows = 16 if INTERPRET else max(1, 4096 // block_d)
    return block_rows, block_d, 4 if block_rows * block_d <= 4096 else 8


class _ResidualNormFunction(torch.autograd.Function):
    """Autograd wrapper of the residual/norm kernels. Modes: merge + norm, merge only (norm_weight None), or
    norm only (hidden_states None). Returns the tensors the mode produces: (residual, normed), (residual,)
    or (normed,)."""

    @staticmethod
    def forward(ctx, hidden_states, residual, hs_scale, hs_bias, res_scale, res_bias, norm_weight, eps):
        has_merge, has_norm = hidden_states is not None, norm_weight is not None
        shape, hidden = residual.shape, residual.shape[-1]
        dtype = (norm_weight if has_norm else hidden_states).dtype
        residual = residual.reshape(-1, hidden).contiguous()
        num_rows = residual.shape[0]
        flat_h = hidden_states.reshape(-1, hidden).contiguous() if has_merge else residual
        r_out = torch.empty_like(residual) if has_merge else residual
        u = residual.new_empty(num_rows, hidden, dtype=dtype) if has_norm else residual
        rstd = residual.new_empty(num_rows) if has_norm else residual
        params = (hs_scale, hs_bias, res_scale, res_bias) if has_merge else (residual,) * 4
        block_rows, block_d, num_warps = _residual_norm_blocks(hidden)
        _residual_norm_fwd_kernel[(triton.cdiv(num_rows, block_rows),)](
            flat_h, residual, *params, norm_weight if has_norm else residual, r_out, u, rstd, num_rows, eps,
            HIDDEN=hidden, HAS_MERGE=has_merge, HAS_NORM=has_norm, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            DTYPE=_TL_DTYPES[dtype], num_warps=num_warps,
        )
        ctx.save_for_backward(flat_h if has_merge else None, residual, hs_scale, hs_bias, res_scale, res_bias,
                              norm_weight, rstd if has_norm else None)
        ctx.modes, ctx.dtype, ctx.shape = (has_merge, has_norm), dtype, shape
        return ((r_out.view(shape),) if has_merge else ()) + ((u.view(shape),) if has_norm else ())

    @staticmethod
    def backward(ctx, *grads):
        flat_h, residual, hs_scale, hs_bias, res_scale, res_bias, norm_weight, rstd = ctx.saved_tensors
        has_merge, has_norm = ctx.modes
        num_rows, hidden = residual.shape
        grad_r_out = grads[0].reshape(num_rows, hidden).float().contiguous() if has_merge else residual
        grad_u = grads[-1].reshape(num_rows, hidden).contiguous() if has_norm else residual
        grad_h = torch.empty_like(flat_h) if has_merge else residual
        grad_r = torch.empty_like(residual)
        block_rows, block_d, num_warps = _residual_norm_blocks(hidden)
        num_blocks = triton.cdiv(num_rows, block_rows)
        num_programs = min(num_blocks, 256)
        partial = residual.new_empty(5, num_programs, hidden)
        params = (hs_scale, hs_bias, res_scale, res_bias) if has_merge else (residual,) * 4
        _residual_norm_bwd_kernel[(num_programs,)](
            flat_h if has_merge else residual, residual, *params, norm_weight if has_norm else residual,
            rstd if has_norm else residual, grad_r_out, grad_u, grad_h, grad_r, partial, num_rows,
            triton.cdiv(num_blocks, num_programs), HIDDEN=hidden, HAS_MERGE=has_merge, HAS_NORM=has_norm,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, DTYPE=_TL_DTYPES[ctx.dtype], num_warps=num_warps,
        )
        sums = partial.sum(dim=1)  # [5, hidden]
        if has_merge:
            param_grads = tuple(sums[i].to(p.dtype) for i, p in enumerate((hs_scale, hs_bias, res_scale, res_bias)))
            grad_h = grad_h.view(ctx.shape)
        else:
            param_grads, grad_h = (None,) * 4, None
        grad_norm_weight = sums[4].to(norm_weight.dtype) if has_norm else None
        return (grad_h, grad_r.view(ctx.shape), *param_grads, grad_norm_weight, None)


# --------------------------------------------------------------------------------------------------------------------
# The kernels' API: tensors in, tensors out
# --------------------------------------------------------------------------------------------------------------------


def cca_qk_mix(
    query: torch.Tensor,
    key: torch.Tensor,
    conv_state: torch.Tensor | None,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    gw_weight: torch.Tensor,
    gw_bias: torch.Tensor,
    key_temperature: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    return_window: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused CCA projection tail, for prefill and decode steps alike.

    Args:
        query, key: the pre-conv projections `q_proj(h)` [B, S, H*D] and `k_proj(h)` [B, S, K*D].
        conv_state: the last W = (t0-1)+(t1-1) pre-conv columns [B, (H+K)*D, W] (any strides), or None (zeros).
        dw_weight, dw_bias, gw_weight, gw_bias: the depthwise [C, 1, t0] and grouped [C, C/(H+K), t1] conv weights.
        key_temperature: the QK-norm temperature per kv head [K].
        cos, sin: RoPE tables [B or 1, S, R] (R = rotary dims, the first R of each head).
        return_window: also return the conv window (the state, or zeros, then the step's pre-conv columns).

    Returns:
        `(query [B, S, H, D], key [B, S, K, D], window [B, (H+K)*D, W + S] or None)`: q/k after the convs, the
        residual terms, QK norm and partial RoPE.
    """
    return _cca_launch(query, key, conv_state, dw_weight, dw_bias, gw_weight, gw_bias, key_temperature, cos, sin,
                       return_window)


def moe_top1(
    hidden_states: torch.Tensor, choice: torch.Tensor, weight: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Top-1 SwiGLU MoE: `hidden_states` [N, d], `choice` [N] in 0..E (E = skip: exactly zero), `weight` [N]
    -> [N, d]; `gate_up_proj` [E, 2I, d] (rows 0:I gate), `down_proj` [E, d, I]."""
    if hidden_states.shape[0] == 0:
        return torch.empty_like(hidden_states)
    return _moe_launch(hidden_states, choice, weight, gate_up_proj, down_proj)


def router_top1(
    router_hidden: torch.Tensor,
    router_state: torch.Tensor | None,
    router_states_scale: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    out_weight: torch.Tensor,
    balancing_biases: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZAYA's router after its `down_proj`: `router_hidden` [..., r] (+ `router_state * router_states_scale`) ->
    RMSNorm -> GELU(fc1) -> GELU(fc2) -> out_proj -> softmax -> top-1 of `probs + balancing_biases`.
    Returns `(logits [..., E+1], weight [...], choice [...], router_state [..., r])`."""
    return _router_launch(router_hidden, router_state, router_states_scale, norm_weight, eps, fc1_weight, fc1_bias,
                          fc2_weight, fc2_bias, out_weight, balancing_biases)


def residual_merge_rmsnorm(
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    hs_scale: torch.Tensor,
    hs_bias: torch.Tensor,
    res_scale: torch.Tensor,
    res_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ZAYA's residual merge `(h + hs_bias) * hs_scale + (r + res_bias) * res_scale` (fp32 residual), optionally
    followed by the next RMSNorm of the new residual in the model dtype, in one pass. Differentiable."""
    outputs = _ResidualNormFunction.apply(hidden_states, residual, hs_scale, hs_bias, res_scale, res_bias, norm_weight, eps)
    return outputs[0], outputs[1] if norm_weight is not None else None


def residual_rmsnorm(residual: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the fp32 residual cast to the model dtype (`norm_weight`'s), in one pass. Differentiable."""
    (normed,) = _ResidualNormFunction.apply(None, residual, None, None, None, None, norm_weight, eps)
    return normed
