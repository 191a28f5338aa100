/* GEMM for few rows (decode batches): out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), x and out
 * fp32, w packed once into 16-column panels of one of the formats of gemm_formats.h (fp32,
 * bf16, GGUF Q4_1 or Q8_0, weight-only: decoded to fp32 in registers, fp32 accumulation).
 *
 * Why: with M = batch size the product is bound by streaming the weights (a decode step of the
 * default model reads 538 MB of fp32 weights), and the CPU libraries' blocking does not overlap
 * that stream with the arithmetic at small M; 16-bit and 4-bit weights cut the stream 2x and
 * ~6x. A thread walks its run of panels front to back. Up to MR rows, one register tile per
 * panel holds the accumulators for the whole of K and decodes each weight once (the single-
 * stream case). With more rows, each KC-deep chunk of the panel is decoded once into an fp32
 * scratch panel in L1 (fp32 panels are read in place) and every MR-row tile multiplies it,
 * its partial sums kept in out between chunks.
 *
 * Register tile on AVX2: MR = 6 rows x 16 columns = 12 accumulators of 8 lanes, two weight
 * vectors and a broadcast: 15 of the 16 ymm registers, all of them live across k (no spills:
 * the fp32 kernel before this one indexed an accumulator array by a loop variable and kept it
 * on the stack: ~3x slower at M = 1 on a Zen 2).
 *
 * Threads: the panels are split evenly among the threads of an OpenMP parallel region, one
 * contiguous run each (the hardware prefetchers follow it; dynamic chunks measured ~7% slower).
 * Linked against libgomp.so.1, the library shares the runtime torch has already loaded (torch's
 * CPU wheels bundle that soname), so these are torch's own intra-op threads: no second pool
 * spinning against it. Every output column is computed by one thread in one order, so the
 * result does not depend on the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_formats.h"
#include "gemm_row1_zmm.h"

#define MR 6     /* rows per register tile */
#define KC 256   /* k per scratch chunk: 256 x 16 fp32 = 16 KiB, half of L1 */

typedef struct {
    int fmt;
    const uint8_t *panels;  /* ceil(n / 16) panels of panel_bytes(fmt, k) */
    int64_t panel_bytes;
    const float *x;         /* (m, k), row stride xs */
    int64_t xs;
    const float *bias;      /* (n,) or NULL */
    int64_t n, k, m;
    float *out;             /* (m, n), row stride os */
    int64_t os;
} gemm_job;

#include "gemm_bf16_dot.h"

/* One tile: rows [0, mr) of x times weights k0 .. k1 - 1 of src (a panel in format fmt, or an
 * fp32 chunk whose first row is k = base) into out (mr, ncols): starting from zero when
 * `first`, else from the partial sums in out; adding the bias when `last`. */
static inline AI void row_tile(int fmt, int mr, const void *src, int64_t base, int64_t k0,
                               int64_t k1, const float *x, int64_t xs, float *out, int64_t os,
                               int64_t ncols, const float *bias, int first, int last) {
    v8 acc[4 * MR][2];  /* SETS(mr) sets of mr rows */
    float tmp[NR] __attribute__((aligned(32)));
    for (int i = 0; i < SETS(mr) * mr; i++) acc[i][0] = acc[i][1] = (v8){0};
    if (!first)
        for (int m = 0; m < mr; m++) {
            const float *partial = out + m * os;
            if (ncols < NR) {  /* the last panel's columns only (no call on full panels) */
                memcpy(tmp, partial, sizeof(float) * (size_t)ncols);
                partial = tmp;
            }
            acc[m][0] = load8(partial), acc[m][1] = load8(partial + 8);
        }
    sink_t s = {x, xs, k0, acc, NULL};
    walk(fmt, src, base, k0, k1, &s, mr);
    for (int m = 0; m < mr; m++) {
        for (int set = 1; set < SETS(mr); set++)
            acc[m][0] += acc[set * mr + m][0], acc[m][1] += acc[set * mr + m][1];
        if (last && bias) {
            *(v8 *)tmp = (v8){0}, *(v8 *)(tmp + 8) = (v8){0};
            memcpy(tmp, bias, sizeof(float) * (size_t)ncols);
            acc[m][0] += load8(tmp), acc[m][1] += load8(tmp + 8);
        }
        if (ncols == NR) {
            *(v8_u *)(out + m * os) = acc[m][0], *(v8_u *)(out + m * os + 8) = acc[m][1];
        } else {
            *(v8 *)tmp = acc[m][0], *(v8 *)(tmp + 8) = acc[m][1];
            memcpy(out + m * os, tmp, sizeof(float) * (size_t)ncols);
        }
    }
}

/* row_tile with mr a constant (the accumulators then live in registers), 1 <= mr <= MR. */
#define ROW_TILE(fmt, mr, ...)                                                                \
    switch (mr) {                                                                             \
    case 1: row_tile(fmt, 1, __VA_ARGS__); break;                                             \
    case 2: row_tile(fmt, 2, __VA_ARGS__); break;                                             \
    case 3: row_tile(fmt, 3, __VA_ARGS__); break;                                             \
    case 4: row_tile(fmt, 4, __VA_ARGS__); break;                                             \
    case 5: row_tile(fmt, 5, __VA_ARGS__); break;                                             \
    default: row_tile(fmt, 6, __VA_ARGS__); break;                                            \
    }

/* Panel p of the job, its weights in format fmt (a constant after inlining). */
static inline AI void run_panel(const gemm_job *j, int64_t p, int fmt) {
    const uint8_t *panel = j->panels + p * j->panel_bytes;
    int64_t ncols = j->n - p * NR < NR ? j->n - p * NR : NR;
    const float *bias = j->bias ? j->bias + p * NR : NULL;
    float *out = j->out + p * NR;
#if XY_HAVE_ROW1_ZMM
    if (j->m == 1 && (fmt == XY_Q4_1 || fmt == XY_Q8_0)) {  /* a lone stream: gemm_row1_zmm.h */
        row1_zmm(fmt, panel, j->k, j->x, out, ncols, bias);
        return;
    }
#endif
    if (j->m <= MR) {  /* one tile: each weight decoded straight into registers, once */
        ROW_TILE(fmt, j->m, panel, 0, 0, j->k, j->x, j->xs, out, j->os, ncols, bias, 1, 1)
        return;
    }
    float scratch[KC * NR] __attribute__((aligned(64)));
    for (int64_t k0 = 0; k0 < j->k; k0 += KC) {
        int64_t k1 = j->k - k0 < KC ? j->k : k0 + KC;
        const float *src = (const float *)panel + k0 * NR;  /* fp32: the panel itself */
        if (fmt != XY_F32) {  /* decode the chunk once for all row tiles */
            sink_t s = {NULL, 0, k0, NULL, scratch};
            walk(fmt, panel, 0, k0, k1, &s, 0);
            src = scratch;
        }
        /* tiles of ceil(m / MR) near-equal row counts (7 rows: 4 + 3, not 6 + 1) */
        int64_t tiles = (j->m + MR - 1) / MR;
        for (int64_t t = 0, r = 0; t < tiles; t++) {
            int64_t mr = (j->m - r) / (tiles - t);
            ROW_TILE(XY_F32, mr, src, k0, k0, k1, j->x + r * j->xs, j->xs, out + r * j->os,
                     j->os, ncols, bias, k0 == 0, k1 == j->k)
            r += mr;
        }
    }
}

/* One copy of the panel loop per format (fp-contract on here: an inlined callee's optimize
 * attribute gives way to its caller's). */
#define PANEL_FN(name, fmt) \
    __attribute__((optimize("fp-contract=fast"))) \
    static void name(const gemm_job *j, int64_t p) { run_panel(j, p, fmt); }
PANEL_FN(panel_f32, XY_F32)
PANEL_FN(panel_bf16, XY_BF16)
PANEL_FN(panel_q4_1, XY_Q4_1)
PANEL_FN(panel_q8_0, XY_Q8_0)
#undef PANEL_FN
static void (*const panel_fns[])(const gemm_job *, int64_t) = {panel_f32, panel_bf16, panel_q4_1,
                                                               panel_q8_0};

/* Whether a product of this format and shape is one the entry points below compute: blocks
 * whole along k; blocks read as bf16 only where AMX multiplies them (gemm_amx.h). */
static int takes(int fmt, int64_t m, int64_t k, int64_t n) {
    if (fmt < XY_F32 || fmt > XY_Q8_0_BF16 || m < 1 || k < 1 || n < 1) return 0;
    if (fmt >= XY_Q4_1 && k % QK) return 0;
#if XY_HAVE_AMX
    return fmt < XY_Q4_1_BF16 || amx_ready();
#else
    return fmt < XY_Q4_1_BF16;
#endif
}

/* Whether gemm_bf16_dot.h takes the product: blocks read as bf16 always, bf16 panels where
 * the caller allows bf16 activations and the library multiplies them natively. */
static int on_bf16_dot(int fmt, int flags) {
    return fmt >= XY_Q4_1_BF16 || (fmt == XY_BF16 && (flags & XY_GEMM_BF16_ACTIVATIONS)
                                   && XY_HAVE_BF16_DOT);
}

/* out (m, n), row stride os = x (m, k), row stride xs, times w packed in format fmt (see
 * gemm_formats.h; k % 32 == 0 for the quantized ones; XY_Q4_1_BF16 / XY_Q8_0_BF16, blocks read
 * as bf16 with bf16 x, on AMX alone), plus bias (or NULL), on up to
 * num_threads threads; flags: XY_GEMM_BF16_ACTIVATIONS lets bf16 panels take vdpbf16ps where
 * the library has it. Returns 0, -1 when out of memory, -2 for a format or shape it does not
 * take (nothing written). */
int xy_gemm_packed(int fmt, const float *x, int64_t xs, const void *panels, const float *bias,
                   int64_t n, int64_t k, float *out, int64_t os, int64_t m, int num_threads,
                   int flags) {
    if (!takes(fmt, m, k, n)) return -2;
    int64_t num_panels = (n + NR - 1) / NR;
    if (num_threads > num_panels / 4) num_threads = (int)(num_panels / 4);  /* >= 4 panels each */
    if (num_threads < 1) num_threads = 1;
    gemm_job job = {fmt, panels, panel_bytes(fmt, k), x, xs, bias, n, k, m, out, os};
    if (on_bf16_dot(fmt, flags)) return gemm_bf16_dot(&job, num_threads);
    void (*fn)(const gemm_job *, int64_t) = panel_fns[fmt];
    if (num_threads == 1) {  /* no parallel region: a small product on one thread */
        for (int64_t p = 0; p < num_panels; p++) fn(&job, p);
        return 0;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < num_panels; p++) fn(&job, p);
    return 0;
}

/* The fp32 entry point of before (weights from xy_pack_panels). */
int xy_gemm(const float *x, int64_t x_stride, const float *panels, const float *bias,
            int64_t n, int64_t k, float *out, int64_t o_stride, int64_t m, int num_threads) {
    return xy_gemm_packed(XY_F32, x, x_stride, panels, bias, n, k, out, o_stride, m,
                          num_threads, 0);
}

/* Panels [p0, p1) of the product xy_gemm_packed computes, on the calling thread alone: one
 * thread's share where the caller runs the parallel region itself (decoder.c). Every column
 * comes out as xy_gemm_packed computes it (bf16 panels with bf16 activations round x into a
 * copy of their own). Returns -2 for what it does not take, -1 when out of memory. */
int xy_gemm_panels(int fmt, const float *x, int64_t xs, const void *panels, const float *bias,
                   int64_t n, int64_t k, float *out, int64_t os, int64_t m, int flags,
                   int64_t p0, int64_t p1) {
    if (!takes(fmt, m, k, n)) return -2;
    gemm_job job = {fmt, panels, panel_bytes(fmt, k), x, xs, bias, n, k, m, out, os};
    if (on_bf16_dot(fmt, flags)) return gemm_bf16_dot_panels(&job, p0, p1);
    for (int64_t p = p0; p < p1; p++) panel_fns[fmt](&job, p);
    return 0;
}
