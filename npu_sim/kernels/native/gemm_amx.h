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
 * rounded to bf16 pairs as gemm_bf16_dot.h rounds them (the same numbers), into a buffer padded
 * with zero rows to a multiple of 16: an A tile is 16 rows of 16 pairs. Every C tile holds its
 * 16 x 16 sums over the whole of K; stored to a scratch tile, the valid rows and columns go to
 * out with the bias.
 *
 * Blocking: 2 x 2 C tiles (32 rows x 2 panels) take all 8 tile registers (4 C, 2 A, 2 B): each
 * A and B tile loaded feeds two multiplies. A thread takes panel pairs; rows in blocks of 32, or
 * 16 where fewer are left. A product of at most 16 rows (decode batches) takes four panels at a
 * time instead, four C tiles accumulating side by side (measured 3-5% more decode throughput
 * at 16 streams than two). Needs K in whole A tiles (ceil(k / 2) a multiple of 16 pairs, k a
 * multiple of 32: every layer of the models served), else gemm_bf16_dot takes the product.
 *
 * Linux hands AMX's tile state to a process only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM);
 * where it refuses (older kernels, VMs that list the flag without the state), amx_ready() says
 * no and gemm_bf16_dot's vdpbf16ps path runs. Tile configuration is per thread: each parallel
 * region's threads load it and release the tiles when done.
 */
#ifndef XY_GEMM_AMX_H
#define XY_GEMM_AMX_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 16        /* rows of an A or C tile */
#define AMX_PAIRS 16       /* bf16 pairs along K in an A tile row (64 bytes) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether this process may use AMX tiles: asked of the kernel once (torch's oneDNN asks the
 * same; a second request succeeds too). */
static int amx_ready(void) {
    static atomic_int state;  /* 0 not asked yet, 1 granted, -1 refused */
    int s = atomic_load(&state);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        atomic_store(&state, s);
    }
    return s > 0;
}

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];  /* bytes per row of each tile */
    uint8_t rows[16];
} __attribute__((aligned(64))) amx_config;

/* Tiles 0-3: C (16 x 16 fp32), 4-5: A (16 rows x 16 pairs), 6-7: B (16 pair rows x 16 columns):
 * every tile 16 rows of 64 bytes. */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = AMX_ROWS;
    }
    _tile_loadconfig(&cfg);
}

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

/* Rows [r, r + 16 * nr) of xp (nr 1 or 2 row blocks) times panels p .. p + np - 1 (np 1 or 2). */
static void amx_block(const gemm_job *j, const uint32_t *xp, int64_t kp, int64_t r, int nr,
                      int64_t p, int np) {
    float c[AMX_ROWS * NR] __attribute__((aligned(64)));
    const uint32_t *b0 = (const uint32_t *)(j->panels + p * j->panel_bytes);
    const uint32_t *b1 = (const uint32_t *)(j->panels + (p + np - 1) * j->panel_bytes);
    const uint32_t *a0 = xp + r * kp, *a1 = xp + (r + AMX_ROWS * (nr - 1)) * kp;
    const int64_t a_stride = kp * 4, b_stride = NR * 4;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < kp; i += AMX_PAIRS) {
        _tile_loadd(4, a0 + i, a_stride);
        _tile_loadd(6, b0 + i * NR, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        if (np == 2) {
            _tile_loadd(7, b1 + i * NR, b_stride);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (nr == 2) {
            _tile_loadd(5, a1 + i, a_stride);
            _tile_dpbf16ps(2, 5, 6);
            if (np == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, b_stride);
    amx_write(j, c, r, p);
    if (np == 2) {
        _tile_stored(1, c, b_stride);
        amx_write(j, c, r, p + 1);
    }
    if (nr == 2) {
        _tile_stored(2, c, b_stride);
        amx_write(j, c, r + AMX_ROWS, p);
        if (np == 2) {
            _tile_stored(3, c, b_stride);
            amx_write(j, c, r + AMX_ROWS, p + 1);
        }
    }
}

/* Rows [0, 16) of xp (one row block: a batch of decodes) times panels p .. p + np - 1 (np 1 to
 * 4): four C tiles in flight (tile 5 takes the fourth panel's B once the first multiply has
 * read it), where 2 x 2 blocking would leave two. The same sums, tile by tile. */
static void amx_row_block(const gemm_job *j, const uint32_t *xp, int64_t kp, int64_t p, int np) {
    float c[AMX_ROWS * NR] __attribute__((aligned(64)));
    const uint32_t *b[4];
    for (int q = 0; q < 4; q++)
        b[q] = (const uint32_t *)(j->panels + (p + (q < np ? q : 0)) * j->panel_bytes);
    const int64_t a_stride = kp * 4, b_stride = NR * 4;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < kp; i += AMX_PAIRS) {
        _tile_loadd(4, xp + i, a_stride);
        _tile_loadd(5, b[0] + i * NR, b_stride);
        _tile_dpbf16ps(0, 4, 5);
        if (np > 1) {
            _tile_loadd(6, b[1] + i * NR, b_stride);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (np > 2) {
            _tile_loadd(7, b[2] + i * NR, b_stride);
            _tile_dpbf16ps(2, 4, 7);
        }
        if (np > 3) {
            _tile_loadd(5, b[3] + i * NR, b_stride);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, c, b_stride);
    amx_write(j, c, 0, p);
    if (np > 1) {
        _tile_stored(1, c, b_stride);
        amx_write(j, c, 0, p + 1);
    }
    if (np > 2) {
        _tile_stored(2, c, b_stride);
        amx_write(j, c, 0, p + 2);
    }
    if (np > 3) {
        _tile_stored(3, c, b_stride);
        amx_write(j, c, 0, p + 3);
    }
}

/* Whether gemm_amx takes the job: AMX granted and K in whole tiles (from one row on: the tiles
 * beat vdpbf16ps at every M measured). */
static int amx_takes(const gemm_job *j) {
    return ((j->k + 1) / 2) % AMX_PAIRS == 0 && amx_ready();
}

/* x rounded to bf16 pairs as gemm_bf16_dot rounds it, zero rows padding it to whole A tiles
 * (m_pad rows, kp pairs each), in the calling thread's scratch; NULL when out of memory. */
static uint32_t *amx_rows(const gemm_job *j, int64_t kp, int64_t m_pad) {
    uint32_t *xp = thread_scratch(sizeof(uint32_t) * (size_t)(m_pad * kp));
    if (!xp) return NULL;
    bf16_pairs(j->x, j->xs, j->m, j->k, xp, kp);
    memset(xp + j->m * kp, 0, sizeof(uint32_t) * (size_t)((m_pad - j->m) * kp));
    return xp;
}

/* Panels [p0, p1) in pairs (the last one alone where the run is odd), every row, on the
 * calling thread, its tile configuration loaded. A column's sums do not depend on the pairing
 * (each C tile adds the same products in the same K order). */
static void amx_run(const gemm_job *j, const uint32_t *xp, int64_t kp, int64_t m_pad, int64_t p0,
                    int64_t p1) {
    if (m_pad == AMX_ROWS) {  /* one row block: four panels at a time */
        for (int64_t p = p0; p < p1; p += 4)
            amx_row_block(j, xp, kp, p, p1 - p < 4 ? (int)(p1 - p) : 4);
        return;
    }
    for (int64_t p = p0; p < p1; p += 2)
        for (int64_t r = 0; r < m_pad; r += 2 * AMX_ROWS)
            amx_block(j, xp, kp, r, r + AMX_ROWS < m_pad ? 2 : 1, p, p + 1 < p1 ? 2 : 1);
}

/* The job's product on AMX on num_threads threads, each a run of panel groups. */
static int gemm_amx(const gemm_job *j, int num_threads) {
    int64_t kp = (j->k + 1) / 2, num_panels = (j->n + NR - 1) / NR;
    int64_t m_pad = (j->m + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
    int64_t group = m_pad == AMX_ROWS ? 4 : 2;  /* panels amx_run takes at a time */
    int64_t num_groups = (num_panels + group - 1) / group;
    uint32_t *xp = amx_rows(j, kp, m_pad);
    if (!xp) return -1;
#pragma omp parallel num_threads(num_threads)
    {
        amx_configure();
#pragma omp for schedule(static)
        for (int64_t q = 0; q < num_groups; q++)
            amx_run(j, xp, kp, m_pad, group * q,
                    group * q + group < num_panels ? group * q + group : num_panels);
        _tile_release();
    }
    return 0;
}

/* Panels [p0, p1) of the job's product on the calling thread alone (its share of a parallel
 * region the caller runs: decoder.c), from its own rounded copy of x (a few KiB at decode
 * batch sizes): the same numbers as gemm_amx. */
static int amx_panels(const gemm_job *j, int64_t p0, int64_t p1) {
    int64_t kp = (j->k + 1) / 2, m_pad = (j->m + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
    uint32_t *xp = amx_rows(j, kp, m_pad);
    if (!xp) return -1;
    amx_configure();
    amx_run(j, xp, kp, m_pad, p0, p1);
    _tile_release();
    return 0;
}
#define XY_HAVE_AMX 1
#else
#define XY_HAVE_AMX 0
#endif

#endif
