/* Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
 *
 * zaya_hf's decode products: a few rows of input times one large weight, each weight row read from memory once for
 * all the rows and accumulated in fp32 in registers, the output rows split across OpenMP threads.
 *
 * One thread's product is bound by instructions and by the latency of each accumulation chain more than by memory,
 * so every loop below keeps several independent partial sums per output: with AVX-512, one weight row at a time into
 * 8 (int8) or 4 (bf16) of them read a large weight about twice as fast as torch's kernels do
 * (benchmarks/results/bench_quant_kernels.jsonl: "int8-native" and "dense-native").
 *
 * - zaya_int8_matvec: weight-only int8, out[m, n] = scale[n] * sum_k x[m, k] * q[n, k], on the operands of torch's
 *   `_weight_int8pack_mm` (x [M, K] fp32 or bf16, q int8 [N, K] row-major, scale [N] in x's dtype; out [M, N] in x's
 *   dtype), so it reads zaya_hf's kernel-layout weights as they are.
 * - zaya_bf16_matvec: bf16, out[m, n] = sum_k x[m, k] * w[n, k] (x [M, K], w [N, K] row-major, out [M, N]), as
 *   `F.linear` without bias; bf16 widens to fp32 by a 16-bit shift, so this needs no AVX512-BF16.
 *
 * Built at import by `zaya_hf.ops.native` with -march=native, so the AVX-512 or AVX2 loops below are the ones the
 * machine has; other machines get the portable loops.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };
/* int8: with AVX-512, one weight row at a time summed into 8 independent accumulators read the LM head 1.8x as fast as
 * 4 weight rows with one accumulator each (bench_quant_kernels.jsonl, `--rows 1 2 4 16` runs). The AVX2 loop keeps 4
 * weight rows, one accumulator each (not re-measured). */
#if defined(__AVX512F__)
#define ROW_BLOCK 2    /* input rows accumulated together */
#define WEIGHT_BLOCK 1 /* weight rows multiplied by each loaded slice of x */
#define UNROLL 8       /* independent 16-wide partial sums per (input row, weight row) */
#else
#define ROW_BLOCK 4
#define WEIGHT_BLOCK 4
#define UNROLL 1
#endif

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof(result));
    return result;
}

static inline uint16_t float_to_bf16(float value) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float load_value(const void *data, int dtype, int64_t index) {
    return dtype == DTYPE_BFLOAT16 ? bf16_to_float(((const uint16_t *)data)[index]) : ((const float *)data)[index];
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
static inline float sum_lanes_256(__m256 v) { /* the 8 lanes' sum */
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
}
#endif

/* dots[r][c] = x[r, :] . w[c, :] for `rows` (<= ROW_BLOCK) fp32 rows of x and `cols` (<= WEIGHT_BLOCK) int8 rows
 * of w, both with row stride k. Called with constant rows and cols, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void block_dots(const float *x, int rows, const int8_t *w, int cols,
                                                             int64_t k, float dots[ROW_BLOCK][WEIGHT_BLOCK]) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc[ROW_BLOCK][WEIGHT_BLOCK][UNROLL];
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c)
            for (int u = 0; u < UNROLL; ++u) acc[r][c][u] = _mm512_setzero_ps();
    for (; i + 16 * UNROLL <= k; i += 16 * UNROLL) /* UNROLL x 16 weights of each row, one partial sum each */
        for (int u = 0; u < UNROLL; ++u) {
            __m512 wv[WEIGHT_BLOCK];
            for (int c = 0; c < cols; ++c)
                wv[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + c * k + i + 16 * u))));
            for (int r = 0; r < rows; ++r) {
                const __m512 xv = _mm512_loadu_ps(x + r * k + i + 16 * u);
                for (int c = 0; c < cols; ++c) acc[r][c][u] = _mm512_fmadd_ps(xv, wv[c], acc[r][c][u]);
            }
        }
    for (; i + 16 <= k; i += 16) /* the rest of the whole vectors, into the first partial sum */
        for (int c = 0; c < cols; ++c) {
            const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + c * k + i))));
            for (int r = 0; r < rows; ++r) acc[r][c][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i), wv, acc[r][c][0]);
        }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
            __m512 total = acc[r][c][0];
            for (int u = 1; u < UNROLL; ++u) total = _mm512_add_ps(total, acc[r][c][u]);
            dots[r][c] = _mm512_reduce_add_ps(total);
        }
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ROW_BLOCK][WEIGHT_BLOCK];
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) acc[r][c] = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) { /* 8 weights of each row, widened to one fp32 vector */
        __m256 wv[WEIGHT_BLOCK];
        for (int c = 0; c < cols; ++c)
            wv[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + c * k + i))));
        for (int r = 0; r < rows; ++r) {
            const __m256 xv = _mm256_loadu_ps(x + r * k + i);
            for (int c = 0; c < cols; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
            dots[r][c] = sum_lanes_256(acc[r][c]);
        }
#else
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) dots[r][c] = 0.0f;
#endif
    for (; i < k; ++i) /* the tail (all of it on the portable path) */
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < cols; ++c) dots[r][c] += x[r * k + i] * (float)w[c * k + i];
}

/* block_dots with its row count made a constant. */
static inline __attribute__((always_inline)) void weight_block_dots(const float *x, int rows, const int8_t *w,
                                                                    int cols, int64_t k,
                                                                    float dots[ROW_BLOCK][WEIGHT_BLOCK]) {
    switch (rows) {
        case 1: block_dots(x, 1, w, cols, k, dots); break;
#if ROW_BLOCK == 4
        case 2: block_dots(x, 2, w, cols, k, dots); break;
        case 3: block_dots(x, 3, w, cols, k, dots); break;
#endif
        default: block_dots(x, ROW_BLOCK, w, cols, k, dots); break;
    }
}

/* Returns 0, or -1 when the fp32 copy of x cannot be allocated. */
int zaya_int8_matvec(const void *x, int x_dtype, const int8_t *q, const void *scale, int scale_dtype, void *out,
                     int64_t m, int64_t n, int64_t k, int threads) {
    const float *x32 = (const float *)x;
    float *converted = NULL;
    if (x_dtype == DTYPE_BFLOAT16) { /* a few rows: widened once, then read from cache by every weight row */
        converted = (float *)malloc((size_t)(m * k) * sizeof(float));
        if (converted == NULL) return -1;
        for (int64_t i = 0; i < m * k; ++i) converted[i] = bf16_to_float(((const uint16_t *)x)[i]);
        x32 = converted;
    }
    const int64_t blocks = (n + WEIGHT_BLOCK - 1) / WEIGHT_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t j0 = b * WEIGHT_BLOCK;
        const int cols = (int)(n - j0 < WEIGHT_BLOCK ? n - j0 : WEIGHT_BLOCK);
        float dots[ROW_BLOCK][WEIGHT_BLOCK];
        for (int64_t r0 = 0; r0 < m; r0 += ROW_BLOCK) {
            const int rows = (int)(m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK);
            if (cols == WEIGHT_BLOCK) weight_block_dots(x32 + r0 * k, rows, q + j0 * k, WEIGHT_BLOCK, k, dots);
            else weight_block_dots(x32 + r0 * k, rows, q + j0 * k, cols, k, dots); /* the last, partial block */
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c) {
                    const float value = dots[r][c] * load_value(scale, scale_dtype, j0 + c);
                    if (x_dtype == DTYPE_BFLOAT16) ((uint16_t *)out)[(r0 + r) * n + j0 + c] = float_to_bf16(value);
                    else ((float *)out)[(r0 + r) * n + j0 + c] = value;
                }
        }
    }
    free(converted);
    return 0;
}

/* bf16: each input row against one weight row at a time, BF16_UNROLL independent partial sums per pair. Products of
 * more rows reuse each loaded weight vector for more multiply-adds than these loops keep up with, so they stay with
 * torch's GEMM (`BF16_NATIVE_MAX_ROWS` in ops/thresholds.py). */
#define BF16_ROW_BLOCK 2
#define BF16_UNROLL 4

/* dots[r] = x[r, :] . w for `rows` (<= BF16_ROW_BLOCK) bf16 rows of x, row stride k, and one bf16 weight row w.
 * A vector of bf16 pairs read as 32-bit lanes holds each even element in the low half, each odd one in the high
 * half: shifted left by 16 bits (even) or with the low half cleared (odd), the lanes are those elements in fp32. */
static inline __attribute__((always_inline)) void bf16_row_dots(const uint16_t *x, int rows, const uint16_t *w,
                                                                int64_t k, float dots[BF16_ROW_BLOCK]) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[BF16_ROW_BLOCK][BF16_UNROLL];
    for (int r = 0; r < rows; ++r)
        for (int u = 0; u < BF16_UNROLL; ++u) acc[r][u] = _mm512_setzero_ps();
    for (; i + 32 * BF16_UNROLL <= k; i += 32 * BF16_UNROLL) /* BF16_UNROLL x 32 weights, one partial sum each */
        for (int u = 0; u < BF16_UNROLL; ++u) {
            const __m512i wv = _mm512_loadu_si512((const void *)(w + i + 32 * u));
            const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
            const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
            for (int r = 0; r < rows; ++r) {
                const __m512i xv = _mm512_loadu_si512((const void *)(x + r * k + i + 32 * u));
                acc[r][u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(xv, 16)), w_even, acc[r][u]);
                acc[r][u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(xv, high)), w_odd, acc[r][u]);
            }
        }
    for (int r = 0; r < rows; ++r) {
        __m512 total = acc[r][0];
        for (int u = 1; u < BF16_UNROLL; ++u) total = _mm512_add_ps(total, acc[r][u]);
        dots[r] = _mm512_reduce_add_ps(total);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[BF16_ROW_BLOCK][BF16_UNROLL];
    for (int r = 0; r < rows; ++r)
        for (int u = 0; u < BF16_UNROLL; ++u) acc[r][u] = _mm256_setzero_ps();
    for (; i + 16 * BF16_UNROLL <= k; i += 16 * BF16_UNROLL) /* BF16_UNROLL x 16 weights, one partial sum each */
        for (int u = 0; u < BF16_UNROLL; ++u) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + i + 16 * u));
            const __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
            const __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
            for (int r = 0; r < rows; ++r) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + r * k + i + 16 * u));
                acc[r][u] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(xv, 16)), w_even, acc[r][u]);
                acc[r][u] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(xv, high)), w_odd, acc[r][u]);
            }
        }
    for (int r = 0; r < rows; ++r) {
        __m256 total = acc[r][0];
        for (int u = 1; u < BF16_UNROLL; ++u) total = _mm256_add_ps(total, acc[r][u]);
        dots[r] = sum_lanes_256(total);
    }
#else
    for (int r = 0; r < rows; ++r) dots[r] = 0.0f;
#endif
    for (; i < k; ++i) /* the tail (all of it on the portable path) */
        for (int r = 0; r < rows; ++r) dots[r] += bf16_to_float(x[r * k + i]) * bf16_to_float(w[i]);
}

void zaya_bf16_matvec(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t m, int64_t n, int64_t k,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t j = 0; j < n; ++j) {
        float dots[BF16_ROW_BLOCK];
        for (int64_t r0 = 0; r0 < m; r0 += BF16_ROW_BLOCK) {
            const int rows = (int)(m - r0 < BF16_ROW_BLOCK ? m - r0 : BF16_ROW_BLOCK);
            if (rows == BF16_ROW_BLOCK) bf16_row_dots(x + r0 * k, BF16_ROW_BLOCK, w + j * k, k, dots);
            else bf16_row_dots(x + r0 * k, 1, w + j * k, k, dots); /* the last, single row */
            for (int r = 0; r < rows; ++r) out[(r0 + r) * n + j] = float_to_bf16(dots[r]);
        }
    }
}
