/* The timing-only simulator's costliest per-step sum, in C: a meta-attention launch without
 * combine tasks, from its rows' cost terms to the row it adds to its step's sums
 * (npu_sim.launch_sums: what cost_attention_launch.launch_costs and
 * npu_sim.launch_sums.mix_launch_sums compute in numpy, bit for bit).
 *
 * A simulated step of decodes prices ~50-250 attention tiles; in numpy that is ~25 calls of
 * ~1 us on arrays that small, the largest single piece of a decode step's timing. Here it is
 * one call. A step with prefill chunks has a few tiles more, each a row of its own: priced
 * here too (prefill_row: npu_sim.cost_attention.attention_rows of such a row), where Python
 * priced each new one through the row memo (~4 us a row, ~30 us a step with all the lookups).
 * Every float operation is numpy's (or Python's, on floats), in their order, on the same
 * operands:
 *   - a term's sum over the rows is numpy's float64 add.reduce of a contiguous row: pairwise
 *     summation (pairwise_sum below, numpy 2.x's loop, blocks of 8 lanes up to 128 elements);
 *   - a core's busy cycles are np.bincount's: its tasks' cycles added in task order from 0;
 *   - the scalars are Python's expressions, evaluated left to right (-ffp-contract=off: no
 *     fused multiply-adds where numpy rounds twice).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The terms of an attention row (npu_sim.cost_attention.AttentionRows), in its field order. */
enum {
    T_CYCLES, T_KV_HBM, T_CUBE, T_VECTOR, T_S, T_PARTIAL, T_OUT, T_Q, T_VISIBLE, T_ISSUED,
    T_USEFUL, NUM_TERMS
};

/* The launch's constants (npu_sim.launch_sums packs them in this order). */
enum {
    C_CORE_OVERHEAD,   /* cycles each core of the block pays once (chip.gm_latency_cycles) */
    C_LAUNCH_CYCLES,   /* chip.cube_launch_s * chip.clock_hz */
    C_HBM_PER_CYCLE,   /* chip.hbm_bytes_per_s / chip.clock_hz */
    C_L2_PER_CYCLE,    /* chip.l2_bytes_per_s / chip.clock_hz */
    C_WEIGHT,          /* tasks a row stands for (the KV heads) */
    C_HEAD_DIM,
    C_BYTES,           /* operand bytes */
    C_AIVS,            /* AIVs per AIC */
    C_CUBE_MULT,       /* 1 for the 2-stage pipeline (PV on the cube), else 2 (QK and PV) */
    NUM_CONSTS
};

/* The row constants of prefill_row (npu_sim.launch_sums packs them in this order). */
enum {
    R_STAGES,          /* the launch's pipeline: 3 or 4 (cost_attention_launch.attention_stages) */
    R_GROUP,           /* query heads per KV head (a task's heads) */
    R_HEAD_DIM,
    R_PADDED_DIM,      /* head_dim rounded up to the cube's K: ceil(d / cube_k) * cube_k */
    R_BYTES,           /* operand bytes */
    R_KV_CHUNK,        /* keys per cube->vector handoff (tiling.attention_kv_chunk) */
    R_CUBE_N,
    R_MTE2_HBM,        /* chip.mte2_hbm_bytes_per_cycle */
    R_MTE2_L2,         /* chip.mte2_l2_bytes_per_cycle */
    R_MTE1_L0A,
    R_MTE1_L0B,
    R_MTE3,
    R_FIXPIPE,
    R_MACS,            /* the cost model's cube MACs per cycle */
    R_LANES32,         /* fp32 vector lanes per cycle */
    R_AIVS,            /* AIVs per AIC */
    R_SYNC,            /* chip.cross_core_sync_cycles */
    R_DISPATCH,        /* chip.task_dispatch_cycles */
    R_ACCUM_BYTES,     /* npu_sim.tiling.ACCUM_BYTES */
    R_SOFTMAX_OPS,     /* npu_sim.cost_attention's vector passes per score */
    R_UPDATE_OPS,      /* and per output element of the online-softmax update */
    NUM_ROW_CONSTS
};

/* Python's max(a, b) of two floats: a unless b is greater (ScalarOps.maximum). */
static inline double py_max(double a, double b) { return b > a ? b : a; }

/* attention_rows(cm, stages, keys, q_rows, g, tile_rows, final=True, horizon_reached=True,
 * hbm_fraction, d) of one row of a 3- or 4-stage launch (a prefill tile over every key it
 * sees: its sequence's final output), written to t[k * n + i] for each term k: the operations
 * of attention_rows' Python, one by one, left to right. */
static void prefill_row(const double *rc, double keys, double q_rows, double tile_rows,
                        double hbm_fraction, double *t, int64_t n, int64_t i) {
    const double d = rc[R_HEAD_DIM], dp = rc[R_PADDED_DIM], b = rc[R_BYTES];
    const double l2r = rc[R_MTE2_L2], sync = rc[R_SYNC], aivs = rc[R_AIVS];
    const double accum = rc[R_ACCUM_BYTES];
    const int upd = rc[R_STAGES] == 4.0;
    double r = q_rows * rc[R_GROUP], big_r = tile_rows;
    double chunks = py_max(ceil(keys / rc[R_KV_CHUNK]), 1.0);
    double kl = keys / chunks;
    double kl_pad = ceil(kl / rc[R_CUBE_N]) * rc[R_CUBE_N];
    double r_kl = r * kl;
    double r_kl_b = r_kl * b;
    double big_r_kl_pad = big_r * kl_pad;
    double r_d = r * d;
    double q_bytes = r_d * b;
    double inv_kv = hbm_fraction / rc[R_MTE2_HBM] + (1.0 - hbm_fraction) / l2r;
    double cube_in = 2.0 * kl * d * b * inv_kv + r_kl_b / l2r;
    double mte1 = (big_r * dp + big_r_kl_pad) * b / rc[R_MTE1_L0A]
                  + kl_pad * (2.0 * dp * b) / rc[R_MTE1_L0B];
    double cube = big_r_kl_pad * (2.0 * dp) / rc[R_MACS];
    double s_in = r_kl * accum, vec_ops = r_kl * rc[R_SOFTMAX_OPS], p_out = r_kl_b;
    if (upd) {
        double o_bytes = r * (dp * accum);
        s_in = s_in + o_bytes;
        vec_ops = vec_ops + r_d * rc[R_UPDATE_OPS];
        p_out = p_out + o_bytes;
    }
    double fix = s_in / rc[R_FIXPIPE];
    double vec_in = s_in / l2r / aivs;
    double vec = vec_ops / rc[R_LANES32] / aivs;
    double vec_out = p_out / rc[R_MTE3] / aivs;
    double chain = cube_in + mte1 + cube + fix + 2.0 * sync + vec_in + vec + vec_out;
    if (upd) chain = chain + sync;
    double s_bytes = r_kl * (accum + b);
    double steady = py_max(py_max(py_max(cube_in, mte1), py_max(cube, fix)),
                           py_max(py_max(vec_in, vec), vec_out));
    double q_load = q_bytes / rc[R_MTE2_HBM];
    double body = chain + (chunks - 1.0) * steady;
    double r_keys = r * keys;
    double visible = r_keys - r * (q_rows - 1.0) / 2.0;
    double row[NUM_TERMS] = {
        [T_CYCLES] = rc[R_DISPATCH] + q_load + (keys > 0.0 ? body : 0.0)
                     + q_bytes / rc[R_FIXPIPE],
        [T_KV_HBM] = keys * (2.0 * d * b) * hbm_fraction,
        [T_CUBE] = cube * chunks,
        [T_VECTOR] = vec * chunks,
        [T_S] = s_bytes * chunks,
        [T_PARTIAL] = 0.0,
        [T_OUT] = q_bytes,
        [T_Q] = q_bytes,
        [T_VISIBLE] = py_max(visible, 0.0),
        [T_ISSUED] = big_r_kl_pad * (2.0 * dp) * chunks,
        [T_USEFUL] = r_keys,
    };
    for (int k = 0; k < NUM_TERMS; k++) t[k * n + i] = row[k];
}

/* numpy's float64 add.reduce of a[0 .. n): pairwise, as numpy 2.x sums a contiguous run. */
static double pairwise_sum(const double *a, int64_t n) {
    if (n < 8) {
        double res = 0.0;
        for (int64_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; j++) r[j] = a[j];
        int64_t i;
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* row (7 scalars, num_cube AIC busy cycles, num_vector AIV busy cycles): the LaunchSums row of
 * a launch of num_rows attention rows whose terms are terms[t * stride + gather[i]] (gather
 * NULL: i), but for the num_prefill rows prefill_at[p], priced by prefill_row from keys and
 * prefill[3 p .. 3 p + 3) = (q_rows, tile_rows, hbm_fraction) and the row constants
 * row_consts (NULL without prefill rows); each row stands for `weight` tasks; keys: each
 * row's keys (int64, num_rows: the launch's K/V bytes); its tasks in dealt order are order[j]
 * repeated `repeat` times, for j in [0, num_order). Returns 0, or -1 where the scratch could
 * not be allocated. */
int xy_launch_sums(const double *terms, int64_t stride, const int64_t *gather, int64_t num_rows,
                   const int64_t *keys, const int64_t *prefill_at, const double *prefill,
                   int64_t num_prefill, const double *row_consts, const int64_t *order,
                   int64_t num_order, int64_t repeat, const double *consts, int64_t num_cube,
                   int64_t num_vector, double *row) {
    double *t = malloc(sizeof(double) * (size_t)(NUM_TERMS * num_rows + num_cube));
    if (!t) return -1;
    double *busy = t + NUM_TERMS * num_rows;
    for (int k = 0; k < NUM_TERMS; k++) {  /* each term's row contiguous, as numpy sums it */
        const double *src = terms + k * stride;
        double *dst = t + k * num_rows;
        for (int64_t i = 0; i < num_rows; i++) dst[i] = src[gather ? gather[i] : i];
    }
    for (int64_t p = 0; p < num_prefill; p++) {
        int64_t i = prefill_at[p];
        prefill_row(row_consts, (double)keys[i], prefill[3 * p], prefill[3 * p + 1],
                    prefill[3 * p + 2], t, num_rows, i);
    }
    double s[NUM_TERMS];
    for (int k = 0; k < NUM_TERMS; k++) s[k] = pairwise_sum(t + k * num_rows, num_rows);
    int64_t key_sum = 0;  /* whole numbers: exact in any order */
    for (int64_t i = 0; i < num_rows; i++) key_sum += keys[i];

    /* _attention_costs (no mask: its bytes are 0.0) */
    const double w = consts[C_WEIGHT], d = consts[C_HEAD_DIM];
    double total_kv = w * (((2.0 * (double)key_sum) * d) * consts[C_BYTES]);
    double hbm_kv = w * s[T_KV_HBM];
    double vector_active = (w * s[T_VECTOR]) * consts[C_AIVS];
    double q_bytes = w * s[T_Q];
    double cube_active = w * s[T_CUBE];
    double hbm_read = (hbm_kv + q_bytes) + 0.0;
    double hbm_write = w * s[T_OUT];
    double l2 = ((total_kv - hbm_kv) + w * (s[T_S] * 2.0 + s[T_PARTIAL])) + 0.0;
    double flops = ((w * 4.0) * s[T_VISIBLE]) * d;
    double cube_macs = w * s[T_ISSUED];
    double useful = ((w * consts[C_CUBE_MULT]) * s[T_USEFUL]) * d;

    /* mix_launch_sums: the tasks dealt in the symmetric round robin, each core's busy cycles
     * its tasks' in task order (np.bincount), the block's cores paying their overhead */
    int64_t num_tasks = num_order * repeat;
    int64_t block = num_tasks < num_cube ? num_tasks : num_cube;
    for (int64_t c = 0; c < num_cube; c++) busy[c] = 0.0;
    int64_t p = 0;  /* task i's place in the round robin's period: i % (2 block) */
    for (int64_t j = 0; j < num_order; j++) {
        double cycles = t[order[j]];
        for (int64_t r = 0; r < repeat; r++) {
            busy[p < block ? p : 2 * block - 1 - p] += cycles;
            if (++p == 2 * block) p = 0;
        }
    }
    double top = 0.0;
    for (int64_t c = 0; c < num_cube; c++) {
        if (c < block) busy[c] += consts[C_CORE_OVERHEAD];
        if (c == 0 || busy[c] > top) top = busy[c];
    }
    /* dealing.makespan: the longest of the cores and the HBM and L2 bandwidth bounds */
    double hbm_bytes = hbm_read + hbm_write;
    double span = top;
    double hbm_bound = hbm_bytes / consts[C_HBM_PER_CYCLE];
    double l2_bound = l2 / consts[C_L2_PER_CYCLE];
    if (hbm_bound > span) span = hbm_bound;
    if (l2_bound > span) span = l2_bound;
    double stretch = top != 0.0 ? span / top : 1.0;

    double scalars[7] = {consts[C_LAUNCH_CYCLES] + span, cube_active, vector_active, hbm_bytes,
                         flops, cube_macs, useful};
    for (int k = 0; k < 7; k++) row[k] = scalars[k];
    for (int64_t c = 0; c < num_cube; c++)
        row[7 + c] = stretch != 1.0 ? busy[c] * stretch : busy[c];
    int64_t aivs = (int64_t)consts[C_AIVS];
    for (int64_t v = 0; v < num_vector; v++) row[7 + num_cube + v] = row[7 + v / aivs];
    free(t);
    return 0;
}
