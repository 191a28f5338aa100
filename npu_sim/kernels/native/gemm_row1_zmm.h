/* One row (a lone stream's decode step) times a Q4_1 or Q8_0 panel on 512-bit vectors, where
 * the build has AVX-512: what row_tile does at mr = 1 (gemm.c), each weight the same float
 * (d * q + m in one rounding for Q4_1, d * q, exact, for Q8_0), only the sums grouped otherwise.
 *
 * Why: one row has no reuse of a weight across rows, so the walker's instructions per weight
 * bound it, not the bytes (the default model's 4-bit layers at one row ran at ~half this 2-core
 * Xeon's memory bandwidth on 8-lane vectors). A panel is 16 columns: one zmm per k for Q8_0
 * (16 int8 widened at once), and for Q4_1 one zmm per *pair* of k (rows kk and kk + 1 hold 8
 * bytes each, contiguous: widened together, lanes 0-7 are row kk's and lanes 8-15 row kk + 1's;
 * the low nibbles are columns 0-7 and the high nibbles columns 8-15), multiplied by x_kk in
 * lanes 0-7 and x_kk+1 in lanes 8-15 (one permute of 16 x's). The two halves of each Q4_1
 * accumulator are added at the end; every set of accumulators covers its own k (four or eight
 * multiply-add chains in flight, as row_tile's sets), summed in order at the end.
 */
#ifndef XY_GEMM_ROW1_ZMM_H
#define XY_GEMM_ROW1_ZMM_H

#if defined(__AVX512F__)
#include <immintrin.h>

#define XY_HAVE_ROW1_ZMM 1

/* permutexvar indices: pair j of 16 x's, x[2j] in lanes 0-7 and x[2j + 1] in lanes 8-15 */
static const int32_t ROW1_PAIR_IDX[8][16] __attribute__((aligned(64))) = {
#define PAIR(j) {2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, \
                 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1}
    PAIR(0), PAIR(1), PAIR(2), PAIR(3), PAIR(4), PAIR(5), PAIR(6), PAIR(7)
#undef PAIR
};

/* Columns 0-7 of a 16-lane vector in both halves (`lo`), or columns 8-15 (`hi`). */
static inline AI __m512 cols_lo(__m512 v) { return _mm512_shuffle_f32x4(v, v, 0x44); }
static inline AI __m512 cols_hi(__m512 v) { return _mm512_shuffle_f32x4(v, v, 0xEE); }

/* Lanes 8-15 (AVX-512F alone: extractf32x8 is AVX512DQ's). */
static inline AI __m256 upper_half(__m512 v) {
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* Sum of the sets, in set order (row_tile's order of adding them). */
static inline AI __m512 sets_sum(const __m512 *acc, int n) {
    __m512 s = acc[0];
    for (int i = 1; i < n; i++) s = _mm512_add_ps(s, acc[i]);
    return s;
}

/* The row's 16 sums of a Q4_1 panel of k weights (k % 32 == 0) into out16. */
static inline AI void row1_q4_1(const uint8_t *panel, int64_t k, const float *x, float *out16) {
    const __m512 nibbles = NIBBLE_VALUES;
    __m512 lo[4], hi[4];
    for (int s = 0; s < 4; s++) lo[s] = hi[s] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < k; k0 += QK) {
        const uint8_t *blk = panel + k0 / QK * Q4_1_BLOCK_BYTES;
        prefetch_lines(blk, Q4_1_BLOCK_BYTES);
        const uint16_t *dm = (const uint16_t *)blk;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dm));
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + 16)));
        __m512 d_lo = cols_lo(d), d_hi = cols_hi(d), m_lo = cols_lo(m), m_hi = cols_hi(m);
        const uint8_t *q = blk + 4 * NR;
        for (int half = 0; half < 2; half++) {  /* 16 k at a time: one load of x */
            __m512 xv = _mm512_loadu_ps(x + k0 + 16 * half);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {  /* rows 2j and 2j + 1 of this half */
                __m512i b = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(q + (16 * half + 2 * j) * 8)));
                __m512 w_lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, nibbles), d_lo, m_lo);
                __m512 w_hi = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), nibbles), d_hi, m_hi);
                __m512 xx = _mm512_permutexvar_ps(
                    _mm512_load_si512((const void *)ROW1_PAIR_IDX[j]), xv);
                lo[j % 4] = _mm512_fmadd_ps(xx, w_lo, lo[j % 4]);
                hi[j % 4] = _mm512_fmadd_ps(xx, w_hi, hi[j % 4]);
            }
        }
    }
    __m512 l = sets_sum(lo, 4), h = sets_sum(hi, 4);  /* halves: even k, odd k */
    _mm256_storeu_ps(out16, _mm256_add_ps(_mm512_castps512_ps256(l), upper_half(l)));
    _mm256_storeu_ps(out16 + 8, _mm256_add_ps(_mm512_castps512_ps256(h), upper_half(h)));
}

/* The row's 16 sums of a Q8_0 panel of k weights (k % 32 == 0) into out16. */
static inline AI void row1_q8_0(const uint8_t *panel, int64_t k, const float *x, float *out16) {
    __m512 acc[8];
    for (int s = 0; s < 8; s++) acc[s] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < k; k0 += QK) {
        const uint8_t *blk = panel + k0 / QK * Q8_0_BLOCK_BYTES;
        prefetch_lines(blk, Q8_0_BLOCK_BYTES);
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        const int8_t *q = (const int8_t *)(blk + 2 * NR);
#pragma GCC unroll 32
        for (int kk = 0; kk < QK; kk++) {
            __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(q + kk * NR)))), d);
            acc[kk % 8] = _mm512_fmadd_ps(_mm512_set1_ps(x[k0 + kk]), w, acc[kk % 8]);
        }
    }
    _mm512_storeu_ps(out16, sets_sum(acc, 8));
}

/* Panel `panel` (format fmt: Q4_1 or Q8_0) times the row x into out's ncols columns, plus the
 * bias (or NULL). */
static inline AI void row1_zmm(int fmt, const uint8_t *panel, int64_t k, const float *x,
                               float *out, int64_t ncols, const float *bias) {
    float sums[NR] __attribute__((aligned(64)));
    if (fmt == XY_Q4_1)
        row1_q4_1(panel, k, x, sums);
    else
        row1_q8_0(panel, k, x, sums);
    __mmask16 cols = (__mmask16)((1u << ncols) - 1);
    __m512 r = _mm512_load_ps(sums);
    if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(cols, bias));
    _mm512_mask_storeu_ps(out, cols, r);
}
#else
#define XY_HAVE_ROW1_ZMM 0
#endif

#endif
