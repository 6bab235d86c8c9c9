/* Copyright 2026 The zaya_hf authors. Licensed under the Apache License, Version 2.0.
 *
 * Weight-only int8 products for decode: out[m, n] = scale[n] * sum_k x[m, k] * q[n, k].
 *
 * The operands are those of torch's `_weight_int8pack_mm` (x [M, K] fp32 or bf16, q int8 [N, K] row-major,
 * scale [N] in x's dtype; out [M, N] in x's dtype), so the kernel reads zaya_hf's kernel-layout weights as they
 * are. Decode multiplies a few rows by a large weight: each weight row is read from memory once for all M rows,
 * widened int8 -> int32 -> fp32 in registers and accumulated in fp32, and the output rows are split across OpenMP
 * threads. Built at import by `zaya_hf.ops.native` with -march=native, so the
 * AVX-512 or AVX2 loop below is the one the machine has; other machines get the portable loop.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };
/* One thread's product is bound by instructions and by the latency of each accumulation chain more than by memory:
 * with AVX-512, one weight row at a time summed into 8 independent accumulators read the LM head 1.8x as fast as 4
 * weight rows with one accumulator each (benchmarks/results/bench_quant_kernels.jsonl, `--rows 1 2 4 16` runs).
 * The AVX2 loop keeps 4 weight rows, one accumulator each (not re-measured). */
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
            __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc[r][c]), _mm256_extractf128_ps(acc[r][c], 1));
            half = _mm_add_ps(half, _mm_movehl_ps(half, half));
            half = _mm_add_ss(half, _mm_movehdup_ps(half));
            dots[r][c] = _mm_cvtss_f32(half);
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
