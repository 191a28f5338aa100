/* How the panel GEMM (gemm.c) reads each weight format: the packed layouts and, for each, a
 * walker that turns k = k0 .. k1 - 1 of one panel into fp32 weights, 16 columns per k as two
 * 8-lane vectors, and hands them to a sink (multiply into a row tile's accumulators, or store
 * into an L1 scratch panel). Everything is inlined into one copy per format and row count.
 *
 * Panels are 16 output columns of w (N, K) (columns past N are zero); panel p starts at
 * p * panel_bytes(fmt, k), 64-byte aligned. Per panel:
 *   XY_F32   float[k][16]                       64 B per k
 *   XY_BF16  uint32[ceil(k / 2)][16]            64 B per 2 k: lane j = bf16 w[j][2i] in the low
 *            half, w[j][2i + 1] in the high half (an fp32 is its bf16 shifted up 16 bits, so
 *            either half is one shift or one mask from fp32; AVX512_BF16's vdpbf16ps reads
 *            the same pairs)
 *   XY_Q4_1  per 32 k: fp16 d[16], fp16 m[16], then uint8[32][8]: byte i of row kk holds
 *            the 4-bit q of column i (low nibble) and of column i + 8 (high nibble) at k = kk;
 *            w = d * q + m                     320 B per 32 k (GGUF's 20 B per 32 weights)
 *   XY_Q8_0  per 32 k: fp16 d[16], then int8[32][16] (row kk: q of the 16 columns); w = d * q
 *                                              544 B per 32 k (GGUF's 34 B per 32 weights)
 * d * q is exact in fp32 (an 11-bit by a 4- or 8-bit significand), so a weight here is the
 * same float that gguf's dequantize gives (d * q + m, rounded once): a GEMM on these panels
 * differs from one on the dequantized fp32 weights by accumulation order alone.
 */
#ifndef XY_GEMM_FORMATS_H
#define XY_GEMM_FORMATS_H
#include <stdint.h>

#include "simd.h"

enum { XY_F32 = 0, XY_BF16 = 1, XY_Q4_1 = 2, XY_Q8_0 = 3 };
/* Q4_1 / Q8_0 panels read as the XY_BF16 panels of the same weights (each decoded weight
 * rounded to bf16, activations in bf16: gemm_amx.h, on AMX alone) */
enum { XY_Q4_1_BF16 = 4, XY_Q8_0_BF16 = 5 };

#define NR 16      /* panel width: output columns per tile (two 8-lane vectors) */
#define QK 32      /* weights per Q4_1 / Q8_0 block along k */
#define PREFETCH_BYTES 8192  /* how far ahead in the panel stream lines are fetched into L2 */
#define Q4_1_BLOCK_BYTES (4 * NR + QK * NR / 2)  /* a panel's 32 k of Q4_1: d, m, nibbles */
#define Q8_0_BLOCK_BYTES (2 * NR + QK * NR)      /* a panel's 32 k of Q8_0: d, bytes */
/* Every 4-bit q as a float, for a permute by a lane's low 4 bits (vpermps reads no more): a
 * nibble widened to fp32 without a mask and a conversion, off the port the conversions and
 * multiply-adds queue on (AVX-512 walkers: gemm_row1_zmm.h, gemm_amx.h) */
#define NIBBLE_VALUES _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

/* Bytes of one panel of k rows in format fmt (each format's k-group is whole: quantized
 * formats take k % 32 == 0). */
static inline int64_t panel_bytes(int fmt, int64_t k) {
    switch (fmt) {
    case XY_F32: return k * NR * 4;
    case XY_BF16: return (k + 1) / 2 * NR * 4;
    case XY_Q4_1: case XY_Q4_1_BF16: return k / QK * Q4_1_BLOCK_BYTES;
    default: return k / QK * Q8_0_BLOCK_BYTES;
    }
}

static inline AI void prefetch_lines(const uint8_t *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + PREFETCH_BYTES + i, 0, 2);
}

/* ------------------------------------------------------------------------------------ sinks */

/* Accumulator sets of an mr-row tile: consecutive k go to different sets (summed at the end),
 * so that at least 8 multiply-add chains are in flight. One row alone would otherwise wait on
 * the FMA latency (5 cycles) at every k: the Q4_1 GEMV ran 1.6x slower. */
#define SETS(mr) ((mr) == 1 ? 4 : (mr) <= 3 ? 2 : 1)
#define UNROLL 4  /* k per walker step (a multiple of every SETS) */

/* Where a walker's weights go: `mr` rows of x (row stride xs, element k at x[m * xs + k]) into
 * acc[set * mr + m][0..1] (columns 0-7, 8-15), or, with mr == 0, row k - k0 of the fp32
 * scratch panel. u is the step's unrolled index (a constant): it picks the set. */
typedef struct {
    const float *x;
    int64_t xs, k0;
    v8 (*acc)[2];
    float *scratch;
} sink_t;

static inline AI void sink(const sink_t *s, int mr, int64_t k, int u, v8 w0, v8 w1) {
    if (mr == 0) {
        *(v8 *)(s->scratch + (k - s->k0) * NR) = w0;
        *(v8 *)(s->scratch + (k - s->k0) * NR + 8) = w1;
        return;
    }
    v8 (*acc)[2] = s->acc + u % SETS(mr) * mr;
#pragma GCC unroll 16
    for (int m = 0; m < mr; m++) {
        v8 xb = bcast8(s->x[m * s->xs + k]);
        acc[m][0] += xb * w0;
        acc[m][1] += xb * w1;
    }
}

/* ---------------------------------------------------------------------------------- walkers */

/* panel points at row `base` of an fp32 panel (the panel itself, or a scratch chunk). */
static inline AI void walk_f32(const float *panel, int64_t base, int64_t k0, int64_t k1,
                               const sink_t *s, int mr) {
    int64_t k = k0;
    for (; k + UNROLL <= k1; k += UNROLL) {
        prefetch_lines((const uint8_t *)(panel + (k - base) * NR), UNROLL * 64);
#pragma GCC unroll 4
        for (int u = 0; u < UNROLL; u++) {
            const float *row = panel + (k + u - base) * NR;
            sink(s, mr, k + u, u, load8(row), load8(row + 8));
        }
    }
    for (; k < k1; k++)
        sink(s, mr, k, 0, load8(panel + (k - base) * NR), load8(panel + (k - base) * NR + 8));
}

/* Pair i of a bf16 panel: k = 2i (low halves) and, if below k1, 2i + 1 (high halves). */
static inline AI void bf16_pair(const uint32_t *panel, int64_t k, int64_t k1, const sink_t *s,
                                int mr, int u) {
    const v8u hi = (v8u){0} + 0xFFFF0000u;
    const uint32_t *pair = panel + k / 2 * NR;
    v8u a = *(const v8u *)pair, b = *(const v8u *)(pair + 8);
    sink(s, mr, k, u, (v8)(a << 16), (v8)(b << 16));
    if (k + 1 < k1) sink(s, mr, k + 1, u + 1, (v8)(a & hi), (v8)(b & hi));
}

/* k0 is even; an odd k1 (odd K) ends with the low halves of a pair. */
static inline AI void walk_bf16(const uint32_t *panel, int64_t k0, int64_t k1, const sink_t *s,
                                int mr) {
    int64_t k = k0;
    for (; k + UNROLL <= k1; k += UNROLL) {
        prefetch_lines((const uint8_t *)(panel + k / 2 * NR), UNROLL / 2 * 64);
        bf16_pair(panel, k, k1, s, mr, 0);
        bf16_pair(panel, k + 2, k1, s, mr, 2);
    }
    for (; k < k1; k += 2) bf16_pair(panel, k, k1, s, mr, 0);
}

/* k0 and k1 are multiples of 32. */
static inline AI void walk_q4_1(const uint8_t *panel, int64_t k0, int64_t k1, const sink_t *s,
                                int mr) {
    for (int64_t k = k0; k < k1; k += QK) {
        const uint8_t *blk = panel + k / QK * Q4_1_BLOCK_BYTES;
        prefetch_lines(blk, Q4_1_BLOCK_BYTES);
        const uint16_t *dm = (const uint16_t *)blk;
        v8 d0 = halves8(dm), d1 = halves8(dm + 8), m0 = halves8(dm + 16), m1 = halves8(dm + 24);
        const uint8_t *q = blk + 4 * NR;
        for (int kk = 0; kk < QK; kk += UNROLL)
#pragma GCC unroll 4
            for (int u = 0; u < UNROLL; u++) {
                v8i b = u8x8(q + (kk + u) * 8);
                sink(s, mr, k + kk + u, u, to_float(b & 15) * d0 + m0,
                     to_float(b >> 4) * d1 + m1);
            }
    }
}

/* k0 and k1 are multiples of 32. */
static inline AI void walk_q8_0(const uint8_t *panel, int64_t k0, int64_t k1, const sink_t *s,
                                int mr) {
    for (int64_t k = k0; k < k1; k += QK) {
        const uint8_t *blk = panel + k / QK * Q8_0_BLOCK_BYTES;
        prefetch_lines(blk, Q8_0_BLOCK_BYTES);
        v8 d0 = halves8((const uint16_t *)blk), d1 = halves8((const uint16_t *)blk + 8);
        const int8_t *q = (const int8_t *)(blk + 2 * NR);
        for (int kk = 0; kk < QK; kk += UNROLL)
#pragma GCC unroll 4
            for (int u = 0; u < UNROLL; u++) {
                const int8_t *row = q + (kk + u) * NR;
                sink(s, mr, k + kk + u, u, to_float(i8x8(row)) * d0, to_float(i8x8(row + 8)) * d1);
            }
    }
}

/* Weights k0 .. k1 - 1 of a panel in format fmt to the sink; an fp32 panel may be a chunk
 * whose first row is k = base (the others start at 0). */
static inline AI void walk(int fmt, const void *panel, int64_t base, int64_t k0, int64_t k1,
                           const sink_t *s, int mr) {
    switch (fmt) {
    case XY_F32: walk_f32(panel, base, k0, k1, s, mr); break;
    case XY_BF16: walk_bf16(panel, k0, k1, s, mr); break;
    case XY_Q4_1: walk_q4_1(panel, k0, k1, s, mr); break;
    default: walk_q8_0(panel, k0, k1, s, mr); break;
    }
}

#endif
