/* fp32 GEMM for few rows (decode batches): out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]).
 *
 * Why: with M = batch size the product is too small for the CPU libraries' blocking to overlap
 * the weight stream with the arithmetic (oneDNN reaches about half of either bound at M = 16).
 * Here w is packed once into 16-column panels (ceil(N / 16), K, 16): the kernel walks a panel
 * front to back, one 64-byte line of weights per k, multiplying it into up to 16 rows of
 * accumulators (the fixed 16 x 16 tile of the NPU's menu, ragged edges masked at the store), and
 * prefetches the line 8 KiB ahead into L2 so DRAM keeps up (into L1 it measured ~10% slower:
 * L2 has more misses in flight). Panels are split evenly across the threads of an OpenMP
 * parallel region. Linked against libgomp.so.1, the library shares the runtime torch has already
 * loaded (torch's CPU wheels bundle that soname), so these are torch's own intra-op threads: no
 * second pool competing for the cores.
 */
#include <stdint.h>
#include <stdlib.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16_u __attribute__((vector_size(64), aligned(4)));
#define NR 16              /* panel width: output columns per tile */
#define MR 16              /* rows per tile */
#define PREFETCH 2048      /* floats ahead in the panel (8 KiB), fetched into L2 */

/* Pack w (n, k) into panels (ceil(n / 16), k, 16); columns past n are zero. */
void xy_pack_panels(const float *w, int64_t n, int64_t k, float *panels) {
    for (int64_t p = 0; p * NR < n; p++)
        for (int64_t kk = 0; kk < k; kk++)
            for (int64_t j = 0; j < NR; j++) {
                int64_t col = p * NR + j;
                panels[(p * k + kk) * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            }
}

/* One tile: rows [0, mr) of xt (k, 16) times a panel (k, 16) into out (mr, ncols). */
static inline __attribute__((always_inline)) void tile(const float *xt, const float *panel,
                                                      const float *bias, int64_t k, float *out,
                                                      int64_t o_stride, int64_t ncols, int mr) {
    v16 acc[MR];
    for (int m = 0; m < mr; m++) acc[m] = (v16){0};
    for (int64_t kk = 0; kk < k; kk++) {
        v16 w = *(const v16 *)(panel + kk * NR);
        __builtin_prefetch(panel + kk * NR + PREFETCH, 0, 2);
        for (int m = 0; m < mr; m++) acc[m] += xt[kk * MR + m] * w;
    }
    v16 b = {0};
    if (bias)
        for (int j = 0; j < ncols; j++) b[j] = bias[j];
    for (int m = 0; m < mr; m++) {
        v16 r = acc[m] + b;
        if (ncols == NR) {
            *(v16_u *)(out + m * o_stride) = r;
        } else {
            for (int j = 0; j < ncols; j++) out[m * o_stride + j] = r[j];
        }
    }
}

typedef struct {
    const float *xt;      /* x transposed per 16-row block: (ceil(m / 16), k, 16) */
    const float *panels;  /* (ceil(n / 16), k, 16) */
    const float *bias;    /* (n,) or NULL */
    int64_t n, k, m;
    float *out;
    int64_t o_stride;
} gemm_job;

/* Panel p times every 16-row block of x: the panel is read from DRAM once and stays in L1/L2
 * for the later blocks. */
__attribute__((optimize("fp-contract=fast")))
static void run_panel(const gemm_job *j, int64_t p) {
    int64_t ncols = j->n - p * NR < NR ? j->n - p * NR : NR;
    const float *panel = j->panels + p * j->k * NR;
    const float *bias = j->bias ? j->bias + p * NR : NULL;
    for (int64_t r = 0; r < j->m; r += MR) {
        int mr = j->m - r < MR ? (int)(j->m - r) : MR;
        const float *xt = j->xt + r * j->k;
        float *out = j->out + r * j->o_stride + p * NR;
        switch (mr) {  /* a copy of the tile per row count: accumulators stay in registers */
#define TILE(R) case R: tile(xt, panel, bias, j->k, out, j->o_stride, ncols, R); break;
            TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
            TILE(9) TILE(10) TILE(11) TILE(12) TILE(13) TILE(14) TILE(15) TILE(16)
#undef TILE
        }
    }
}

/* out (m, n), row stride o_stride = x (m, k), row stride x_stride, times the packed w, plus
 * bias (or NULL), on up to num_threads threads. Returns 0, or -1 when out of memory. */
int xy_gemm(const float *x, int64_t x_stride, const float *panels, const float *bias,
            int64_t n, int64_t k, float *out, int64_t o_stride, int64_t m, int num_threads) {
    int64_t blocks = (m + MR - 1) / MR;
    float *xt = aligned_alloc(64, sizeof(float) * (size_t)((blocks * k * MR + 15) & ~15));
    if (!xt) return -1;
    for (int64_t r = 0; r < m; r++)  /* (m, k) -> blocks of (k, 16) */
        for (int64_t kk = 0; kk < k; kk++)
            xt[((r / MR) * k + kk) * MR + r % MR] = x[r * x_stride + kk];
    int64_t num_panels = (n + NR - 1) / NR;
    if (num_threads > num_panels / 4) num_threads = (int)(num_panels / 4);  /* >= 4 panels each */
    if (num_threads < 1) num_threads = 1;
    gemm_job job = {xt, panels, bias, n, k, m, out, o_stride};
    /* One contiguous run of panels per thread: each streams its weights front to back, which
     * the hardware prefetchers follow best (handing out chunks dynamically measured ~7% slower,
     * even with other load on the cores). */
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < num_panels; p++) run_panel(&job, p);
    free(xt);
    return 0;
}
