/* The timing-only simulator's costliest per-step sum, in C: a meta-attention launch without
 * combine tasks, from its rows' cost terms to the row it adds to its step's sums
 * (npu_sim.launch_sums: what cost_attention_launch.launch_costs and
 * npu_sim.launch_sums.mix_launch_sums compute in numpy, bit for bit).
 *
 * A simulated step of decodes prices ~50-250 attention tiles; in numpy that is ~25 calls of
 * ~1 us on arrays that small, the largest single piece of a decode step's timing. Here it is
 * one call.
 * Every float operation is numpy's, in numpy's order, on the same operands:
 *   - a term's sum over the rows is numpy's float64 add.reduce of a contiguous row: pairwise
 *     summation (pairwise_sum below, numpy 2.x's loop, blocks of 8 lanes up to 128 elements);
 *   - a core's busy cycles are np.bincount's: its tasks' cycles added in task order from 0;
 *   - the scalars are Python's expressions, evaluated left to right (-ffp-contract=off: no
 *     fused multiply-adds where numpy rounds twice).
 */
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
 * NULL: i), each standing for `weight` tasks; keys: each row's keys (int64, num_rows: the
 * launch's K/V bytes); its tasks in dealt order are order[j] repeated `repeat` times, for j in
 * [0, num_order). Returns 0, or -1 where the scratch could not be allocated. */
int xy_launch_sums(const double *terms, int64_t stride, const int64_t *gather, int64_t num_rows,
                   const int64_t *keys, const int64_t *order, int64_t num_order, int64_t repeat,
                   const double *consts, int64_t num_cube, int64_t num_vector, double *row) {
    double *t = malloc(sizeof(double) * (size_t)(NUM_TERMS * num_rows + num_cube));
    if (!t) return -1;
    double *busy = t + NUM_TERMS * num_rows;
    for (int k = 0; k < NUM_TERMS; k++) {  /* each term's row contiguous, as numpy sums it */
        const double *src = terms + k * stride;
        double *dst = t + k * num_rows;
        for (int64_t i = 0; i < num_rows; i++) dst[i] = src[gather ? gather[i] : i];
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
