/* The bf16 panel GEMM on AMX (Sapphire Rapids and later): tile matrix multiply-adds, a 16 x 32
 * bf16 A tile times a 32 x 16 bf16 B tile into a 16 x 16 fp32 C tile per instruction (8,192
 * multiply-adds; vdpbf16ps does 32). Measured on a 2-core Xeon with AMX, one thread, the
 * default model's layer GEMMs at M = 16 to 64 rows: 540-980 GFLOP/s, level with oneDNN's AMX
 * matmul and 5-10x the fp32 panels; at M = 1, 52 us for 1728 x 576 against 75 on vdpbf16ps. It
 * runs inside the C replay of the decoder layers, where oneDNN cannot be called.
 *
 * Layouts, as they are: an XY_BF16 panel is (ceil(k / 2), 16) 32-bit pairs, row i holding
 * (w[j][2i], w[j][2i + 1]) for its 16 columns j: 16 such rows, 64 bytes each, are exactly a B
 * tile (AMX's "VNNI" pairs along K), read in place with a 64-byte stride. The activations are
 * rounded to bf16 pairs as gemm_bf16_dot.h rounds them (the same numbers), in a buffer of whole
 * 16-row A tiles of 16 pairs (the rows past M are whatever the scratch held: a C row depends on
 * its A row alone, and those rows never reach out). Every C tile holds its
 * 16 x 16 sums over the whole of K; stored to a scratch tile, the valid rows and columns go to
 * out with the bias.
 *
 * Blocking: 2 x 2 C tiles (32 rows x 2 panels) take all 8 tile registers (4 C, 2 A, 2 B): each
 * A and B tile loaded feeds two multiplies. A thread takes a run of panels in pairs; rows in
 * blocks of 32, and 16 where fewer are left. A product of at most 16 rows (decode batches) takes
 * four panels at a time instead, four C tiles accumulating side by side (measured 3-5% more
 * decode throughput at 16 streams than two). Needs K in whole A tiles (ceil(k / 2) a multiple of 16 pairs, k a
 * multiple of 32: every layer of the models served), else gemm_bf16_dot takes the product.
 *
 * Blocks as bf16 (XY_Q4_1_BF16, XY_Q8_0_BF16): a gguf+bf16 weight's bf16 panels are its GGUF
 * blocks decoded and rounded, so each B tile can be built from the blocks instead, into an L1
 * scratch tile: the same tiles, the same products bit for bit, from a third (Q4_1) or half
 * (Q8_0) of the bytes. A decode batch of 16 rows then runs ~20% faster on the 2-core Xeon, bound
 * by the decoding (~130 cycles a tile) where the bf16 panels were bound by memory. Each 32-row
 * pass decodes the blocks again, so products of more rows keep the bf16 panels (gemm.py's
 * BLOCKS_AS_BF16_ROWS).
 *
 * The tiles, their configuration and the permission to use them: amx.h.
 */
#ifndef XY_GEMM_AMX_H
#define XY_GEMM_AMX_H

#include "amx.h"
#if XY_HAVE_AMX
#include <omp.h>

/* A C tile stored to c into out's rows from r (up to 16, within m) and panel p's columns
 * (within n), plus the bias. */
static inline AI void amx_write(const gemm_job *j, const float *c, int64_t r, int64_t p) {
    int64_t mr = j->m - r < AMX_ROWS ? j->m - r : AMX_ROWS;
    int64_t ncols = j->n - p * NR < NR ? j->n - p * NR : NR;
    __mmask16 cols = (__mmask16)((1u << ncols) - 1);
    __m512 b = j->bias ? _mm512_maskz_loadu_ps(cols, j->bias + p * NR) : _mm512_setzero_ps();
    for (int64_t i = 0; i < mr; i++)
        _mm512_mask_storeu_ps(j->out + (r + i) * j->os + p * NR, cols,
                              _mm512_add_ps(_mm512_load_ps(c + i * NR), b));
}

#define B_STRIDE (NR * 4)  /* bytes between a panel's pair rows */
/* C tile `tile` (a constant: the intrinsics take immediates) into out through the scratch c */
#define AMX_OUT(tile, r, p)              \
    do {                                 \
        _tile_stored(tile, c, B_STRIDE); \
        amx_write(j, c, r, p);           \
    } while (0)

static inline AI const uint8_t *panel(const gemm_job *j, int64_t p) {
    return j->panels + p * j->panel_bytes;
}

/* A Q8_0 pair row's words: vcvtne2ps2bf16 packs k = 2i of the 16 columns into words 0-15 and
 * k = 2i + 1 into words 16-31; the tile wants (k = 2i, k = 2i + 1) of column c in 2c, 2c + 1. */
static const int16_t Q8_PAIR_WORDS[32] __attribute__((aligned(64))) = {
    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* One Q4_1 block of a panel (32 k x 16 columns) as the XY_BF16 panel's B tile holds the same
 * weights: each d * q + m (one rounding, as gemm_formats.h decodes it) rounded to the nearest
 * bf16, even on ties (vcvtne2ps2bf16, as the bf16 panels were rounded), in pairs along k. The
 * bytes of rows 2i and 2i + 1 are interleaved first (one byte shuffle), so that the low nibbles
 * widen to (k = 2i, k = 2i + 1) of columns 0-7 in lane order and the high nibbles to those of
 * columns 8-15: packed to bf16 side by side, they are the tile's pair row as it is. */
static inline AI void q4_1_tile(const uint8_t *blk, uint32_t *tile) {
    const uint16_t *dm = (const uint16_t *)blk;
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dm));
    __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + 16)));
    /* lanes 2j and 2j + 1: column j's (low nibbles), or column 8 + j's (high nibbles) */
    const __m512i low_cols = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i high_cols = _mm512_add_epi32(low_cols, _mm512_set1_epi32(8));
    __m512 d_lo = _mm512_permutexvar_ps(low_cols, d), d_hi = _mm512_permutexvar_ps(high_cols, d);
    __m512 m_lo = _mm512_permutexvar_ps(low_cols, m), m_hi = _mm512_permutexvar_ps(high_cols, m);
    const __m128i rows_interleaved = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14,
                                                   7, 15);
    const __m512 nibbles = NIBBLE_VALUES;
    const uint8_t *q = blk + 4 * NR;
#pragma GCC unroll 16
    for (int i = 0; i < AMX_ROWS; i++) {  /* rows 2i, 2i + 1: 8 bytes each, contiguous */
        __m512i b = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(
            _mm_loadu_si128((const __m128i *)(q + 16 * i)), rows_interleaved));
        __m512 lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, nibbles), d_lo, m_lo);
        __m512 hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), nibbles),
                                    d_hi, m_hi);
        _mm512_store_si512((void *)(tile + i * NR), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* One Q8_0 block of a panel as the XY_BF16 panel's B tile holds it (q4_1_tile's rounding; d * q
 * is exact in fp32). */
static inline AI void q8_0_tile(const uint8_t *blk, uint32_t *tile) {
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    const __m512i words = _mm512_load_si512((const void *)Q8_PAIR_WORDS);
    const int8_t *q = (const int8_t *)(blk + 2 * NR);
#pragma GCC unroll 16
    for (int i = 0; i < AMX_ROWS; i++) {  /* rows 2i, 2i + 1: 16 bytes each */
        __m512 even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)(q + 32 * i)))), d);
        __m512 odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)(q + 32 * i + 16)))), d);
        __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
        _mm512_store_si512((void *)(tile + i * NR), _mm512_permutexvar_epi16(words, packed));
    }
}

/* The B tile of pairs [i, i + 16) of a panel in format fmt (a constant after inlining): an
 * XY_BF16 panel's in place, a block format's decoded and rounded to bf16 pairs into `scratch`.
 * (Decoding the next K step's tiles ahead into a second buffer measured 7% slower.) */
static inline AI const uint32_t *b_tile(int fmt, const uint8_t *panel, int64_t i,
                                        uint32_t *scratch) {
    if (fmt == XY_BF16) return (const uint32_t *)panel + i * NR;
    int64_t block_bytes = fmt == XY_Q4_1_BF16 ? Q4_1_BLOCK_BYTES : Q8_0_BLOCK_BYTES;
    const uint8_t *blk = panel + i / AMX_PAIRS * block_bytes;
    prefetch_lines(blk, block_bytes);
    if (fmt == XY_Q4_1_BF16)
        q4_1_tile(blk, scratch);
    else
        q8_0_tile(blk, scratch);
    return scratch;
}

/* Rows [r, r + 32) of xp (two row blocks) times panels p .. p + np - 1 (np 1 or 2): 2 x 2 C
 * tiles, each A and B tile loaded feeding two multiplies. */
static inline AI void amx_block(int fmt, const gemm_job *j, const uint32_t *xp, int64_t kp,
                                int64_t r, int64_t p, int np) {
    float c[AMX_ROWS * NR] __attribute__((aligned(64)));
    uint32_t scratch[2][AMX_ROWS * NR] __attribute__((aligned(64)));  /* block formats' B */
    const uint8_t *b0 = panel(j, p), *b1 = panel(j, p + np - 1);
    const uint32_t *a0 = xp + r * kp, *a1 = xp + (r + AMX_ROWS) * kp;
    const int64_t a_stride = kp * 4;
    amx_zero_c();
    for (int64_t i = 0; i < kp; i += AMX_PAIRS) {
        _tile_loadd(4, a0 + i, a_stride);
        _tile_loadd(5, a1 + i, a_stride);
        _tile_loadd(6, b_tile(fmt, b0, i, scratch[0]), B_STRIDE);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (np == 2) {
            _tile_loadd(7, b_tile(fmt, b1, i, scratch[1]), B_STRIDE);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    AMX_OUT(0, r, p);
    AMX_OUT(2, r + AMX_ROWS, p);
    if (np == 2) {
        AMX_OUT(1, r, p + 1);
        AMX_OUT(3, r + AMX_ROWS, p + 1);
    }
}

/* Rows [r, r + 16) of xp (one row block) times panels p .. p + np - 1 (np 1 to 4): four C
 * tiles in flight where one row block alone would leave 2 x 2 blocking two (tile 5 takes the
 * fourth panel's B once the first multiply has read it). */
static inline AI void amx_row_block(int fmt, const gemm_job *j, const uint32_t *xp,
                                    int64_t kp, int64_t r, int64_t p, int np) {
    float c[AMX_ROWS * NR] __attribute__((aligned(64)));
    uint32_t scratch[4][AMX_ROWS * NR] __attribute__((aligned(64)));  /* block formats' B */
    const uint32_t *a = xp + r * kp;
    const uint8_t *b[4];
    for (int q = 0; q < 4; q++) b[q] = panel(j, p + (q < np ? q : 0));
    const int64_t a_stride = kp * 4;
    amx_zero_c();
    for (int64_t i = 0; i < kp; i += AMX_PAIRS) {
        _tile_loadd(4, a + i, a_stride);
        _tile_loadd(5, b_tile(fmt, b[0], i, scratch[0]), B_STRIDE);
        _tile_dpbf16ps(0, 4, 5);
        if (np > 1) {
            _tile_loadd(6, b_tile(fmt, b[1], i, scratch[1]), B_STRIDE);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (np > 2) {
            _tile_loadd(7, b_tile(fmt, b[2], i, scratch[2]), B_STRIDE);
            _tile_dpbf16ps(2, 4, 7);
        }
        if (np > 3) {
            _tile_loadd(5, b_tile(fmt, b[3], i, scratch[3]), B_STRIDE);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    AMX_OUT(0, r, p);
    if (np > 1) AMX_OUT(1, r, p + 1);
    if (np > 2) AMX_OUT(2, r, p + 2);
    if (np > 3) AMX_OUT(3, r, p + 3);
}

#undef AMX_OUT

/* Whether gemm_amx takes the job: AMX granted and K in whole tiles (from one row on: the tiles
 * beat vdpbf16ps at every M measured). */
static int amx_takes(const gemm_job *j) {
    return ((j->k + 1) / 2) % AMX_PAIRS == 0 && amx_ready();
}

/* Bytes of rounded activations a thread's pass over its panels keeps in L2 (a row chunk, below):
 * half of the smallest L2 of the CPUs served (2 MiB a core), the panels streaming past it. */
#define AMX_CHUNK_BYTES (1 << 20)

/* Panels [p0, p1), every row of xp (m_pad: m in whole row blocks), on the calling thread with
 * its tile configuration loaded: in pairs, each through every pair of row blocks and a last
 * lone block; one row block alone (a decode batch), four panels at a time. The pairs of row
 * blocks go in chunks of about AMX_CHUNK_BYTES of xp, each chunk through every panel pair
 * before the next: a prefill chunk's activations (2,000 rows of 576 or 1,536 k: 2.3-6 MB) would
 * otherwise stream from beyond L2 once per panel pair (per thread, 600 GFLOP/s at 2,000 rows
 * against 950 at 240). A column's sums do not depend on the grouping (each C tile adds the same
 * products in the same K order). */
static inline AI void amx_run_fmt(int fmt, const gemm_job *j, const uint32_t *xp, int64_t kp,
                                  int64_t m_pad, int64_t p0, int64_t p1) {
    int64_t paired = m_pad / (2 * AMX_ROWS) * (2 * AMX_ROWS);  /* rows in pairs of blocks */
    if (!paired) {  /* one row block alone */
        for (int64_t p = p0; p < p1; p += 4)
            amx_row_block(fmt, j, xp, kp, 0, p, p1 - p < 4 ? (int)(p1 - p) : 4);
        return;
    }
    int64_t chunk = AMX_CHUNK_BYTES / (kp * 4) / (2 * AMX_ROWS) * (2 * AMX_ROWS);
    if (chunk < 2 * AMX_ROWS) chunk = 2 * AMX_ROWS;
    for (int64_t r0 = 0; r0 < paired; r0 += chunk) {
        int64_t r1 = paired - r0 < chunk ? paired : r0 + chunk;
        for (int64_t p = p0; p < p1; p += 2) {
            int np = p1 - p < 2 ? (int)(p1 - p) : 2;
            for (int64_t r = r0; r < r1; r += 2 * AMX_ROWS) amx_block(fmt, j, xp, kp, r, p, np);
            if (r1 == paired && paired < m_pad)  /* the last lone block, its panels still hot */
                amx_row_block(fmt, j, xp, kp, paired, p, np);
        }
    }
}

/* amx_run_fmt with the job's format a constant: bf16 panels, or Q4_1 / Q8_0 blocks read as
 * the bf16 panels of the same weights (XY_Q4_1_BF16, XY_Q8_0_BF16: the same tiles, the same
 * sums, a third or half of the bytes). */
static void amx_run(const gemm_job *j, const uint32_t *xp, int64_t kp, int64_t m_pad, int64_t p0,
                    int64_t p1) {
    switch (j->fmt) {
    case XY_Q4_1_BF16: amx_run_fmt(XY_Q4_1_BF16, j, xp, kp, m_pad, p0, p1); break;
    case XY_Q8_0_BF16: amx_run_fmt(XY_Q8_0_BF16, j, xp, kp, m_pad, p0, p1); break;
    default: amx_run_fmt(XY_BF16, j, xp, kp, m_pad, p0, p1); break;
    }
}

static inline int64_t amx_padded_rows(const gemm_job *j) {
    return (j->m + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
}

/* The job's product on AMX on num_threads threads, each a contiguous run of panels, after
 * each has rounded its share of x's rows into the calling thread's scratch (rounded all on the
 * calling thread before the region, they kept the other threads waiting). */
static int gemm_amx(const gemm_job *j, int num_threads) {
    int64_t kp = (j->k + 1) / 2, num_panels = (j->n + NR - 1) / NR, m_pad = amx_padded_rows(j);
    uint32_t *xp = thread_scratch(sizeof(uint32_t) * (size_t)(m_pad * kp));
    if (!xp) return -1;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t r0 = j->m * t / nt, r1 = j->m * (t + 1) / nt;
        bf16_pairs(j->x + r0 * j->xs, j->xs, r1 - r0, j->k, xp + r0 * kp, kp);
#pragma omp barrier
        _tile_loadconfig(&AMX_CONFIG);
        amx_run(j, xp, kp, m_pad, num_panels * t / nt, num_panels * (t + 1) / nt);
        _tile_release();
    }
    return 0;
}

/* Panels [p0, p1) of the job's product on the calling thread alone (its share of a parallel
 * region the caller runs: decoder.c), from its own rounded copy of x (a few KiB at decode
 * batch sizes, in its scratch): the same numbers as gemm_amx. */
static int amx_panels(const gemm_job *j, int64_t p0, int64_t p1) {
    int64_t kp = (j->k + 1) / 2, m_pad = amx_padded_rows(j);
    uint32_t *xp = rounded_rows(j, kp, m_pad);
    if (!xp) return -1;
    _tile_loadconfig(&AMX_CONFIG);
    amx_run(j, xp, kp, m_pad, p0, p1);
    _tile_release();
    return 0;
}
#endif

#endif
