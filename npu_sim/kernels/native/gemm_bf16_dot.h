/* The bf16 panel GEMM on AVX512_BF16 (Cooper Lake, Zen 4 and later): vdpbf16ps multiplies
 * pairs of bf16 and adds both products into an fp32 lane, 32 multiply-adds an instruction, so
 * the activations are rounded to bf16 too (as oneDNN's bf16 matmul does): not the same numbers
 * as the fp32-activation path of gemm.c, which every CPU runs and the tests hold to fp32
 * rounding. Used only where the caller allows it (XY_GEMM_BF16_ACTIVATIONS).
 *
 * The panels are gemm_formats.h's XY_BF16 layout as they are: lane j of a 64-byte pair row is
 * (w[j][2i], w[j][2i + 1]), what vdpbf16ps pairs with a broadcast (x[2i], x[2i + 1]). x is
 * first rounded to bf16 (an odd K padded with one zero) so each pair is one 32-bit broadcast.
 * A tile is DOT_MR rows x 16 columns, one zmm accumulator a row; K is walked in chunks of
 * DOT_KC pairs so that a panel chunk stays in L1 for every row tile.
 *
 * Compiled where -march=native has AVX512_BF16; elsewhere gemm_bf16_dot returns -2 and the
 * caller takes the fp32-activation path. Not run on the AVX2 machine this was written on: it
 * builds there with -mavx512f -mavx512bf16 (see tests/npu_sim/test_native_gemm.py).
 */
#ifndef XY_GEMM_BF16_DOT_H
#define XY_GEMM_BF16_DOT_H
#include <stdint.h>
#include <stdlib.h>

#define XY_GEMM_BF16_ACTIVATIONS 1  /* xy_gemm_packed flag: bf16 x allowed (vdpbf16ps) */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#define DOT_MR 16   /* rows per tile: 16 zmm accumulators */
#define DOT_KC 128  /* pairs per chunk: 128 x 64 B = 8 KiB of panel */

/* x (m, k) rounded to bf16 into xp (m, kp) pairs, kp = ceil(k / 2), an odd k padded with 0. */
static void bf16_pairs(const float *x, int64_t xs, int64_t m, int64_t k, uint32_t *xp,
                       int64_t kp) {
    for (int64_t r = 0; r < m; r++) {
        uint16_t *dst = (uint16_t *)(xp + r * kp);
        const float *src = x + r * xs;
        int64_t i = 0;
        for (; i + 16 <= k; i += 16)
            _mm256_storeu_si256((__m256i *)(dst + i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
        for (; i < k; i++) dst[i] = float_to_bf16(src[i]);
        if (k % 2) dst[k] = 0;
    }
}

/* rows [0, mr) of xp times pairs [p0, p1) of a panel into acc. */
static inline AI void dot_tile(const uint32_t *panel, const uint32_t *xp, int64_t kp,
                               int64_t p0, int64_t p1, int mr, __m512 *acc) {
    for (int64_t i = p0; i < p1; i++) {
        __m512bh w = (__m512bh)_mm512_load_si512(panel + i * NR);
        __builtin_prefetch((const char *)(panel + i * NR) + PREFETCH_BYTES, 0, 2);
#pragma GCC unroll 16
        for (int m = 0; m < mr; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_set1_epi32((int)xp[m * kp + i]));
    }
}

static inline AI void dot_rows(const uint32_t *panel, const uint32_t *xp, int64_t kp, int mr,
                               int64_t p0, int64_t p1, float *out, int64_t os, int64_t ncols,
                               const float *bias, int first, int last) {
    __m512 acc[DOT_MR];
    __mmask16 cols = (__mmask16)((1u << ncols) - 1);
    for (int m = 0; m < mr; m++)
        acc[m] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(cols, out + m * os);
    dot_tile(panel, xp, kp, p0, p1, mr, acc);
    __m512 b = last && bias ? _mm512_maskz_loadu_ps(cols, bias) : _mm512_setzero_ps();
    for (int m = 0; m < mr; m++) _mm512_mask_storeu_ps(out + m * os, cols, acc[m] + b);
}

__attribute__((optimize("fp-contract=fast")))
static void dot_panel(const gemm_job *j, const uint32_t *xp, int64_t p) {
    const uint32_t *panel = (const uint32_t *)(j->panels + p * j->panel_bytes);
    int64_t kp = (j->k + 1) / 2, ncols = j->n - p * NR < NR ? j->n - p * NR : NR;
    const float *bias = j->bias ? j->bias + p * NR : NULL;
    for (int64_t p0 = 0; p0 < kp; p0 += DOT_KC) {
        int64_t p1 = kp - p0 < DOT_KC ? kp : p0 + DOT_KC;
        for (int64_t r = 0; r < j->m; r += DOT_MR) {
            int mr = j->m - r < DOT_MR ? (int)(j->m - r) : DOT_MR;
            const uint32_t *xr = xp + r * kp;
            float *out = j->out + r * j->os + p * NR;
            switch (mr) {  /* a copy per row count: the accumulators stay in registers */
#define DOT(R) case R: dot_rows(panel, xr, kp, R, p0, p1, out, j->os, ncols, bias, p0 == 0, \
                               p1 == kp); break;
                DOT(1) DOT(2) DOT(3) DOT(4) DOT(5) DOT(6) DOT(7) DOT(8)
                DOT(9) DOT(10) DOT(11) DOT(12) DOT(13) DOT(14) DOT(15) DOT(16)
#undef DOT
            }
        }
    }
}

/* x rounded to bf16 pairs (bf16_pairs) in the calling thread's scratch, room for `rows` rows
 * (at least m: AMX reads whole 16-row tiles, the rows past m never reaching out); NULL when out
 * of memory. */
static uint32_t *rounded_rows(const gemm_job *j, int64_t kp, int64_t rows) {
    uint32_t *xp = thread_scratch(sizeof(uint32_t) * (size_t)(rows * kp));
    if (xp) bf16_pairs(j->x, j->xs, j->m, j->k, xp, kp);
    return xp;
}

#include "gemm_amx.h"

/* The job's product with bf16 activations on num_threads threads (gemm.c's split), on AMX
 * tiles where gemm_amx.h takes it. */
static int gemm_bf16_dot(const gemm_job *j, int num_threads) {
#if XY_HAVE_AMX
    if (amx_takes(j)) return gemm_amx(j, num_threads);
#endif
    if (j->fmt != XY_BF16) return -2;  /* blocks as bf16: AMX's alone */
    int64_t kp = (j->k + 1) / 2, num_panels = (j->n + NR - 1) / NR;
    uint32_t *xp = rounded_rows(j, kp, j->m);
    if (!xp) return -1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < num_panels; p++) dot_panel(j, xp, p);
    return 0;
}

/* Panels [p0, p1) of gemm_bf16_dot's product on the calling thread alone, x rounded into a
 * copy of its own: the same numbers. */
static int gemm_bf16_dot_panels(const gemm_job *j, int64_t p0, int64_t p1) {
#if XY_HAVE_AMX
    if (amx_takes(j)) return amx_panels(j, p0, p1);
#endif
    if (j->fmt != XY_BF16) return -2;
    uint32_t *xp = rounded_rows(j, (j->k + 1) / 2, j->m);
    if (!xp) return -1;
    for (int64_t p = p0; p < p1; p++) dot_panel(j, xp, p);
    return 0;
}
#define XY_HAVE_BF16_DOT 1
#else
#define XY_HAVE_BF16_DOT 0
static inline int gemm_bf16_dot(const gemm_job *j, int num_threads) {
    (void)j, (void)num_threads;
    return -2;
}
static inline int gemm_bf16_dot_panels(const gemm_job *j, int64_t p0, int64_t p1) {
    (void)j, (void)p0, (void)p1;
    return -2;
}
#endif

#endif
