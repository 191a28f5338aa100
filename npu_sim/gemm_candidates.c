/* The tiling search's candidate pricing, in C (npu_sim.gemm_cycles.CostedCandidates._price:
 * what its numpy does, bit for bit).
 *
 * Every new token count of a simulation searches the tilings of its GEMMs: ~35 candidates of
 * ~120 distinct rows and ~7,500 tasks, priced in ~40 numpy calls (~190 us, most of it the
 * calls' own cost). Here it is one call. Every float operation is numpy's, in its order, on the
 * same operands:
 *   - elementwise terms are npu_sim.cost_gemm.gemm_terms' expressions, evaluated left to right
 *     (-ffp-contract=off: no fused multiply-adds where numpy rounds twice);
 *   - a sum over rows or tasks is np.bincount's: the weights added in index order from 0;
 *   - a maximum (np.maximum, reduceat, max) is exact whatever its order;
 *   - the L2 blocking (cost_gemm.gemm_hbm_traffic) is whole numbers, with Python's float floor
 *     division where it has one.
 */
#include <math.h>
#include <stdint.h>

/* The constants (npu_sim.gemm_cycles packs them in this order). */
enum {
    K_BYTES,           /* operand bytes */
    K_CUBE_K,          /* cube fractal K */
    K_MTE1_L0A,        /* L1 -> L0A bytes per cycle */
    K_MTE1_L0B,        /* L1 -> L0B bytes per cycle */
    K_MACS,            /* the cost model's cube MACs per cycle */
    K_FIXPIPE,         /* fixpipe bytes per cycle */
    K_L0C_BYTES,
    K_ACCUM_BYTES,     /* a split-K partial's element */
    K_DISPATCH,        /* cycles to dispatch a task */
    K_GM_LATENCY,      /* cycles each core of the block pays once */
    K_MTE2_HBM,        /* MTE2 bytes per cycle from HBM */
    K_MTE2_L2,         /* MTE2 bytes per cycle from L2 */
    K_HBM_PER_CYCLE,   /* chip.hbm_bytes_per_s / chip.clock_hz */
    K_L2_PER_CYCLE,    /* chip.l2_bytes_per_s / chip.clock_hz */
    K_LAUNCH_CYCLES,   /* chip.cube_launch_s * chip.clock_hz */
    NUM_K
};

/* The static rows' fields (CandidateLayout.static, one row of R values each). */
enum { S_TM, S_TN, S_TK, S_FIT, S_COLS, S_K_LEN, S_COUNT, NUM_S };

static double maxd(double a, double b) { return a >= b ? a : b; }
static double mind(double a, double b) { return a <= b ? a : b; }

/* Python's float floor division, x // y (CPython's float_floor_div). */
static double py_floordiv(double x, double y)
{
    double mod = fmod(x, y), div = (x - mod) / y;
    if (mod && (y < 0) != (mod < 0))
        div -= 1.0;
    if (!div)
        return copysign(0.0, x / y);
    double floordiv = floor(div);
    return div - floordiv > 0.5 ? floordiv + 1.0 : floordiv;
}

/* npu_sim.cost_gemm.gemm_hbm_traffic of an (m, n, k) GEMM of N tile tn, `bytes`-byte operands,
 * an L2 share of l2_cap bytes (rows_fit = l2_cap // (k bytes)): its L2 blocks (cost_gemm's
 * l2_blocks: num_blocks pairs of Mb and reads of A, Mb ascending) given. Whole numbers in
 * int64 (below 2^53: exact as doubles too), Python's float expressions where it has them. */
static double hbm_traffic(int64_t m, int64_t n, int64_t k, int64_t tn, int64_t bytes,
                          double l2_cap, double rows_fit, const int64_t *blocks,
                          int64_t num_blocks)
{
    int64_t a_bytes = m * k * bytes, b_bytes = n * k * bytes;
    if ((double)(a_bytes + b_bytes) <= l2_cap)
        return (double)(a_bytes + b_bytes);
    int found = 0;
    int64_t best = 0;
    for (int64_t i = 0; i < num_blocks; i++) {
        int64_t mb = blocks[2 * i], a_reads = blocks[2 * i + 1];
        if (mb >= m)
            break;
        int64_t bytes_read = a_bytes * a_reads + b_bytes * (int64_t)ceil((double)m / mb);
        if (!found || bytes_read < best)
            best = bytes_read;
        found = 1;
    }
    double nb = py_floordiv(rows_fit - (double)m, (double)tn) * tn;
    if (nb >= tn) {
        int64_t bytes_read = a_bytes * (int64_t)ceil((double)n / nb) + b_bytes;
        if (!found || bytes_read < best)
            best = bytes_read;
        found = 1;
    }
    return found ? (double)best : INFINITY;  /* none: K so deep that no block fits */
}

/* The distinct (n, k, N tile) whose HBM traffic a layout's candidates read (CandidateLayout.
 * traffic), each with its L2 blocks. */
struct traffic_args {
    int64_t num;              /* distinct (n, k, N tile) */
    const int64_t *shape;     /* num x 4: n, k, tn, the first of its blocks in `blocks` */
    const double *rows_fit;   /* num: l2_cap // (k bytes) */
    const int64_t *blocks;    /* (Mb, reads of A) pairs, each shape's from its first to the
                                 next one's (the last's: to num_blocks) */
    int64_t num_blocks;
    const int64_t *of;        /* per candidate: its index among the num */
    int64_t bytes;            /* operand bytes */
    double l2_cap;            /* the cost model's L2 share */
};

/* CostedCandidates._price of an m-row layout of R rows, C candidates, T tasks on `cores` cube
 * cores. In: static_ (NUM_S x R), partial (R), row_entry (R) into entry_rows, candidate (R,
 * rows of a candidate contiguous from first_row[c]), task_row and task_bin (T), dealt
 * (C x cores), tr (their HBM traffic), phase (C x 3: each split-K reduce phase's makespan, HBM
 * bytes written and L2 bytes read, or NULL where no candidate splits K), k. Out (5 x R, then
 * 5 x C): per row m_rows, cycles, active (cube * chunks), macs (tm tn kc chunks), useful
 * (valid MACs of its tasks); per candidate total (MTE2 bytes), hbm_read, written, overhead
 * (the overlapped fixpipe cycles) and launch (its launch cycles). traffic (tr->num) and busy
 * (C x cores): scratch. */
void xy_price_candidates(int64_t m, const double *static_, const uint8_t *partial,
                         const int64_t *row_entry, const double *entry_rows,
                         const int64_t *candidate, int64_t R, const int64_t *first_row,
                         int64_t C, const int64_t *task_row, const int64_t *task_bin, int64_t T,
                         const uint8_t *dealt, int64_t cores, const struct traffic_args *tr,
                         const double *phase, const double *k, double *out, double *traffic,
                         double *busy)
{
    double *m_rows = out, *cycles = out + R, *active = out + 2 * R, *macs = out + 3 * R,
           *useful = out + 4 * R, *total = out + 5 * R, *hbm_read = total + C,
           *written = total + 2 * C, *overhead = total + 3 * C, *launch = total + 4 * C;
    for (int64_t t = 0; t < tr->num; t++) {
        const int64_t *s = tr->shape + 4 * t;
        int64_t end = t + 1 < tr->num ? s[7] : tr->num_blocks;
        traffic[t] = hbm_traffic(m, s[0], s[1], s[2], tr->bytes, tr->l2_cap, tr->rows_fit[t],
                                 tr->blocks + 2 * s[3], end - s[3]);
    }
    const double *tm = static_ + S_TM * R, *tn = static_ + S_TN * R, *tk = static_ + S_TK * R,
                 *fit = static_ + S_FIT * R, *cols = static_ + S_COLS * R,
                 *k_len = static_ + S_K_LEN * R, *count = static_ + S_COUNT * R;
    const double b = k[K_BYTES];
    for (int64_t c = 0; c < C; c++)
        total[c] = written[c] = 0.0;
    for (int64_t r = 0; r < R; r++) {  /* the MTE2 bytes, summed per candidate */
        m_rows[r] = entry_rows[row_entry[r]];
        total[candidate[r]] += (m_rows[r] + cols[r]) * k_len[r] * b * count[r];
    }
    for (int64_t c = 0; c < C; c++)
        hbm_read[c] = mind(total[c], traffic[tr->of[c]]);
    for (int64_t r = 0; r < R; r++) {  /* gemm_terms */
        int64_t c = candidate[r];
        double f = hbm_read[c] / total[c];
        double inv_rate = f / k[K_MTE2_HBM] + (1.0 - f) / k[K_MTE2_L2];
        double mte2_bytes = (m_rows[r] + cols[r]) * k_len[r] * b;
        double depth = mind(fit[r], ceil(k_len[r] / tk[r]) * tk[r]);
        double chunks = ceil(k_len[r] / depth);
        double kc = ceil(k_len[r] / chunks / k[K_CUBE_K]) * k[K_CUBE_K];
        double mte2 = mte2_bytes / chunks * inv_rate;
        double mte1 = tm[r] * kc * b / k[K_MTE1_L0A] + kc * tn[r] * b / k[K_MTE1_L0B];
        double cube = tm[r] * tn[r] * kc / k[K_MACS];
        double steps = kc / tk[r];
        double l0 = maxd(mte1, cube) + mind(mte1, cube) / steps;
        double body = mte2 + l0 + (chunks - 1) * maxd(mte2, l0);
        double out_bytes = m_rows[r] * cols[r] * (partial[r] ? k[K_ACCUM_BYTES] : b);
        double fix = out_bytes / k[K_FIXPIPE];
        int l0c_double = 2 * tm[r] * tn[r] * k[K_ACCUM_BYTES] <= k[K_L0C_BYTES];
        cycles[r] = k[K_DISPATCH] + (l0c_double ? maxd(body, fix) : body + fix);
        double fixed = l0c_double ? fix : 0.0;
        overhead[c] = r == first_row[c] ? fixed : maxd(overhead[c], fixed);
        written[c] += out_bytes * count[r];
        active[r] = cube * chunks;
        macs[r] = tm[r] * tn[r] * kc * chunks;
        useful[r] = m_rows[r] * cols[r] * k_len[r] * count[r];
    }
    /* the cube phase: each candidate's tasks dealt onto its own bins of the cores */
    for (int64_t i = 0; i < C * cores; i++)
        busy[i] = 0.0;
    for (int64_t t = 0; t < T; t++)
        busy[task_bin[t]] += cycles[task_row[t]];
    for (int64_t c = 0; c < C; c++) {
        double offset = 0.0, *core = busy + c * cores;
        for (int64_t j = 0; j < cores; j++) {
            core[j] += dealt[c * cores + j] ? k[K_GM_LATENCY] + overhead[c] : 0.0;
            offset = j ? maxd(offset, core[j]) : core[j];
        }
        int split = partial[first_row[c]];  /* (a candidate's rows all split K, or none) */
        double hbm_write = split ? 0.0 : written[c];
        double l2_bytes = total[c] - hbm_read[c] + (split ? written[c] : 0.0);
        if (phase) {
            offset = offset + phase[3 * c];
            hbm_write = hbm_write + phase[3 * c + 1];
            l2_bytes = l2_bytes + phase[3 * c + 2];
        }
        double hbm_bound = (hbm_read[c] + hbm_write) / k[K_HBM_PER_CYCLE];
        double l2_bound = l2_bytes / k[K_L2_PER_CYCLE];
        launch[c] = k[K_LAUNCH_CYCLES] + maxd(maxd(offset, hbm_bound), l2_bound);
    }
}
