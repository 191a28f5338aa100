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
    R_STAGES,          /* the launch's pipeline: 3 or 4 (xy_unsplit_launch_sums: its own) */
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
static void prefill_row(const double *rc, double stages, double keys, double q_rows,
                        double tile_rows, double hbm_fraction, double *t, int64_t n, int64_t i) {
    const double d = rc[R_HEAD_DIM], dp = rc[R_PADDED_DIM], b = rc[R_BYTES];
    const double l2r = rc[R_MTE2_L2], sync = rc[R_SYNC], aivs = rc[R_AIVS];
    const double accum = rc[R_ACCUM_BYTES];
    const int upd = stages == 4.0;
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
 * a launch of num_rows attention rows whose terms are t[k * num_rows + i] (term k of row i),
 * each standing for `weight` tasks; keys: each row's keys (int64: the launch's K/V bytes); its
 * tasks in dealt order are order[j] repeated `repeat` times, for j in [0, num_order); busy:
 * scratch of num_cube doubles. */
static void launch_row(const double *t, int64_t num_rows, const int64_t *keys,
                       const int64_t *order, int64_t num_order, int64_t repeat,
                       const double *consts, int64_t num_cube, int64_t num_vector, double *busy,
                       double *row) {
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
    /* Each row's tasks are a run of places in the round robin's period (cores 0..block-1,
     * then block-1..0): walked as ascending and descending stretches of cores, no test per
     * task (a launch of decodes: rows x KV heads, thousands of tasks); the same cores in the
     * same order, hence the same sums. */
    const int64_t period = 2 * block;
    int64_t p = 0;  /* task i's place in the period: i % (2 block) */
    for (int64_t j = 0; j < num_order; j++) {
        double cycles = t[order[j]];
        for (int64_t r = repeat; r > 0;) {
            int64_t end = p + r < period ? p + r : period;  /* this stretch's places */
            for (int64_t q = p; q < end && q < block; q++) busy[q] += cycles;
            for (int64_t q = p > block ? p : block; q < end; q++) busy[period - 1 - q] += cycles;
            r -= end - p;
            p = end == period ? 0 : end;
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
}

/* t[k * n + i] = term k of a decode-like row of keys[i] keys: column keys[i] of the memo's
 * table (NUM_TERMS rows of `stride` columns), each term's row contiguous, as numpy sums it. */
static void table_rows(const double *table, int64_t stride, const int64_t *keys, int64_t n,
                       double *t) {
    for (int k = 0; k < NUM_TERMS; k++)
        for (int64_t i = 0; i < n; i++) t[k * n + i] = table[k * stride + keys[i]];
}

/* launch_row of a launch of num_rows attention rows of keys[i] keys, each's terms the memo
 * table's column (table_rows) but for the num_prefill rows prefill_at[p], priced by
 * prefill_row from their keys and prefill[3 p .. 3 p + 3) = (q_rows, tile_rows, hbm_fraction)
 * and the row constants row_consts (NULL without prefill rows). Returns 0, or -1 where the
 * scratch could not be allocated. */
int xy_launch_sums(const double *table, int64_t stride, int64_t num_rows, const int64_t *keys,
                   const int64_t *prefill_at, const double *prefill, int64_t num_prefill,
                   const double *row_consts, const int64_t *order, int64_t num_order,
                   int64_t repeat, const double *consts, int64_t num_cube, int64_t num_vector,
                   double *row) {
    double *t = malloc(sizeof(double) * (size_t)(NUM_TERMS * num_rows + num_cube));
    if (!t) return -1;
    table_rows(table, stride, keys, num_rows, t);
    for (int64_t p = 0; p < num_prefill; p++) {
        int64_t i = prefill_at[p];
        prefill_row(row_consts, row_consts[R_STAGES], (double)keys[i], prefill[3 * p],
                    prefill[3 * p + 1], prefill[3 * p + 2], t, num_rows, i);
    }
    launch_row(t, num_rows, keys, order, num_order, repeat, consts, num_cube, num_vector,
               t + NUM_TERMS * num_rows, row);
    free(t);
    return 0;
}

/* ------------------------------------------------------------- a launch from its lengths
 *
 * xy_unsplit_launch_sums: what a timing-only step with prefill chunks asks of its attention
 * launch, from the chunks' lengths alone: the meta-kernel's Q tiles and their KV blocks
 * (engine.lowering_unsplit.lower_unsplit: its tiles, split test and dealt order), the launch's
 * pipeline (cost_attention_launch.attention_stages), its rows (unsplit_rows: decode tiles from
 * the memo's table, prefill tiles priced here with their sequence's HBM fraction) and its sums
 * (launch_row). Integers where the Python has integers; its float operations in its order.
 */

/* The lowering's constants (npu_sim.launch_sums packs them in this order). */
enum {
    L_GROUP,           /* query heads per KV head */
    L_KV_HEADS,
    L_HEAD_DIM,
    L_BLOCK_SIZE,      /* tokens per KV block */
    L_SPAN_BLOCKS,     /* KV blocks of the shortest span a tile is split into */
    L_NUM_CUBE,        /* the chip's AICs */
    L_BYTES,           /* operand bytes */
    L_MENU_LEN,        /* Q tile rows on the menu (npu_sim.tiling.ATTN_Q_TILE_ROWS), then them */
    L_MENU
};

/* Python's min(a, b) of two floats: a unless b is smaller. */
static inline double py_min(double a, double b) { return b < a ? b : a; }

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* attention_q_tile(q_len, g): the tile's stacked rows; *tokens its query tokens. */
static int64_t q_tile(const int64_t *lc, int64_t q_len, int64_t *tokens) {
    const int64_t g = lc[L_GROUP], n = lc[L_MENU_LEN];
    for (int64_t i = 0; i < n; i++)
        if (q_len * g <= lc[L_MENU + i]) {
            *tokens = q_len;
            return lc[L_MENU + i];
        }
    int64_t largest = lc[L_MENU + n - 1];
    *tokens = largest / g > 1 ? largest / g : 1;
    return largest;
}

/* order[0 .. n): 0 .. n - 1 sorted by work, heaviest first, ties in index order (numpy's stable
 * argsort of -work); tmp: n scratch indices. A bottom-up merge sort: stable. */
static void heaviest_first(const int64_t *work, int64_t n, int64_t *order, int64_t *tmp) {
    for (int64_t i = 0; i < n; i++) order[i] = i;
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi) tmp[k++] = work[order[b]] > work[order[a]] ? order[b++]
                                                                                : order[a++];
            while (a < mid) tmp[k++] = order[a++];
            while (b < hi) tmp[k++] = order[b++];
        }
        for (int64_t i = 0; i < n; i++) order[i] = tmp[i];
    }
}

/* npu_sim.step_sums.step_sums' sums of a step whose template's rows from its own kernel on are
 * rest (rest_rows x size), that own kernel's row own_row, there `launches` launches whose row
 * is `row`, and whose rows before it add up to prefix (NULL: none): the rows in order, the own
 * one multiplied by its count, the prefix added to the first, then added up row after row (as
 * np.add.accumulate adds them), into out. */
static void step_row(const double *rest, int64_t rest_rows, int64_t own_row, const double *row,
                     int64_t launches, const double *prefix, int64_t size, double *out) {
    const double n = (double)launches;
    for (int64_t c = 0; c < size; c++) {
        double sum = own_row == 0 ? row[c] * n : rest[c];
        if (prefix) sum = sum + prefix[c];
        for (int64_t r = 1; r < rest_rows; r++)
            sum = sum + (r == own_row ? row[c] * n : rest[r * size + c]);
        out[c] = sum;
    }
}

/* What xy_unsplit_launch_sums reads besides the batch, the same for every launch of a model
 * shape (npu_sim.launch_sums packs it once). */
typedef struct {
    const int64_t *lc;        /* the lowering's constants (L_*) */
    const double *table[3];   /* the memo's decode tables of the 2-, 3- and 4-stage pipelines
                               * (NULL where the launch cannot be on it) */
    int64_t stride[3];        /* their columns */
    int64_t priced;           /* contexts below this the tables are priced for */
    const double *rc;         /* prefill_row's constants (R_*; R_STAGES set per launch) */
    double l2_bytes;          /* the chip's L2 (attention_stages) */
    double l2_cap;            /* the cost model's L2 share (attention_hbm_fraction) */
    double alpha;             /* ATTN_L2_ALPHA */
    const double *consts;     /* launch_row's (C_*), for the launch's pipeline */
    int64_t num_cube, num_vector;
} unsplit_args;

/* launch_row of the meta-attention launch of num_seqs sequences of num_tokens[s] query tokens
 * from start_pos[s] (num_tokens NULL: a token each; no verify), its rows' terms read from the
 * memo's decode table of its pipeline (a->table: 2 stages for decodes only, else 3 or 4 by the
 * L2 test) but for its prefill tiles', priced by prefill_row. *num_tasks: the launch's tasks.
 * step (NULL: not wanted): step_row's sums of the step the launch is the one own kernel of, its
 * template's rest, rest_rows, own_row, prefix (NULL: none) and the launch's count in it,
 * `launches`. Returns 0; 1 where a tile is to be split into KV spans, 2 where a chunk has no
 * token or there is no sequence (the general lowering takes both); 3 where a context is not
 * below a->priced (the caller prices the tables further and calls again); -1 without memory. */
int xy_unsplit_launch_sums(const int64_t *start_pos, const int64_t *num_tokens, int64_t num_seqs,
                           const unsplit_args *a, double *row, int64_t *num_tasks,
                           const double *rest, int64_t rest_rows, int64_t own_row,
                           int64_t launches, const double *prefix, double *step) {
    const int64_t *lc = a->lc;
    const double *rc = a->rc, *consts = a->consts;
    const int64_t num_cube = a->num_cube, num_vector = a->num_vector;
    const int64_t g = lc[L_GROUP], kv = lc[L_KV_HEADS], bs = lc[L_BLOCK_SIZE];
    int64_t one, decode_rows = q_tile(lc, 1, &one);
    int64_t num_tiles = 0;
    int prefill = 0;  /* some sequence has more than one query token */
    if (num_seqs <= 0) return 2;  /* (no launch to time: the general path's) */
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t n = num_tokens ? num_tokens[s] : 1, tokens;
        if (n <= 0) return 2;
        if (start_pos[s] + n >= a->priced) return 3;  /* a context the tables do not reach */
        q_tile(lc, n, &tokens);
        num_tiles += n > 1 ? ceil_div(n, tokens) : 1;
        prefill |= n > 1;
    }
    /* per tile: keys, blocks, work (query tokens x blocks), rows, query tokens, its sequence;
     * then the order and its scratch */
    int64_t *ints = malloc(sizeof(int64_t) * (size_t)(8 * num_tiles));
    double *t = malloc(sizeof(double) * (size_t)(NUM_TERMS * num_tiles + num_cube));
    int rc_out = 0;
    if (!ints || !t) {
        rc_out = -1;
        goto done;
    }
    int64_t *keys = ints, *blocks = keys + num_tiles, *work = blocks + num_tiles;
    int64_t *rows = work + num_tiles, *q_rows = rows + num_tiles, *seq = q_rows + num_tiles;
    int64_t *order = seq + num_tiles, *tmp = order + num_tiles;

    /* _prefill_tiles and _unsplit_blocks: every sequence's decode-like blocks summed, a
     * prefill chunk's tiles' work instead of its own */
    int64_t i = 0, total_work = 0, heaviest = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t start = start_pos[s], n = num_tokens ? num_tokens[s] : 1, context = start + n;
        int64_t context_blocks = ceil_div(context, bs);
        if (context_blocks > heaviest) heaviest = context_blocks;
        if (n == 1) {
            keys[i] = context, blocks[i] = context_blocks, rows[i] = decode_rows;
            work[i] = context_blocks, q_rows[i] = 1, seq[i++] = s;
            total_work += context_blocks;
            continue;
        }
        int64_t tokens, tile_rows = q_tile(lc, n, &tokens), count = ceil_div(n, tokens);
        for (int64_t c = 0; c < count; c++, i++) {
            q_rows[i] = c + 1 < count ? tokens : n - (count - 1) * tokens;
            keys[i] = c + 1 < count ? start + tokens * (c + 1) : context;
            blocks[i] = ceil_div(keys[i], bs);
            rows[i] = tile_rows;
            work[i] = q_rows[i] * blocks[i];
            seq[i] = s;
            total_work += work[i];
            if (work[i] > heaviest) heaviest = work[i];
        }
    }
    /* the split test (_unsplit_blocks, _any_split): core_share's float, compared exactly. A
     * decode's blocks and a prefill tile's work are its tile's test (work[j]); a prefill
     * sequence's own blocks, which _any_split tests as a decode's, are its last tile's blocks,
     * whose work is as large or larger: that tile's test already says so. */
    const int64_t block_work = g * bs;
    double share = (double)(total_work * block_work) * (double)kv / (double)lc[L_NUM_CUBE];
    if (share != 0.0 && (double)(total_work * block_work) > share
        && (double)(heaviest * block_work) > share) {
        for (int64_t j = 0; j < num_tiles; j++)
            if ((double)(work[j] * block_work) > share && blocks[j] / lc[L_SPAN_BLOCKS] >= 2) {
                rc_out = 1;
                goto done;
            }
    }
    /* tile_order: heaviest (tile rows x blocks) first; attention_stages: the first AICs'
     * tasks' keys x rows in flight against L2 */
    for (int64_t j = 0; j < num_tiles; j++) work[j] = rows[j] * blocks[j];
    heaviest_first(work, num_tiles, order, tmp);
    int64_t keys_x_rows = 0;
    for (int64_t task = 0; task < num_cube && task < num_tiles * kv; task++)
        keys_x_rows += work[order[task / kv]];
    keys_x_rows *= bs;
    /* (decodes only: the 2-stage pipeline, QK on the vector cores) */
    const int stages = !prefill ? 2 : a->l2_bytes > (double)keys_x_rows * a->alpha ? 3 : 4;
    if (!a->table[stages - 2]) {  /* (the caller said the launch cannot be on this pipeline) */
        rc_out = 2;
        goto done;
    }

    /* the rows: a decode table's column of each tile's keys, a prefill tile's priced here */
    table_rows(a->table[stages - 2], a->stride[stages - 2], keys, num_tiles, t);
    for (int64_t j = 0; j < num_tiles;) {
        int64_t s = seq[j];
        if (!num_tokens || num_tokens[s] == 1) {
            j++;
            continue;
        }
        int64_t first = j, key_sum = 0;
        for (; j < num_tiles && seq[j] == s; j++) key_sum += keys[j];
        double fraction = 1.0;  /* attention_hbm_fraction's: exactly 1.0 for one tile */
        if (j - first > 1) {
            double total = (double)(2 * key_sum * lc[L_HEAD_DIM] * lc[L_BYTES] * kv);
            double unique = (double)((start_pos[s] + num_tokens[s]) * kv * lc[L_HEAD_DIM]
                                     * lc[L_BYTES] * 2);
            unique = py_min(total, unique);
            double hit = py_min(1.0, a->l2_cap / py_max(unique, 1.0));
            fraction = (unique + (total - unique) * (1.0 - hit)) / py_max(total, 1.0);
        }
        for (int64_t p = first; p < j; p++)
            prefill_row(rc, (double)stages, (double)keys[p], (double)q_rows[p], (double)rows[p],
                        fraction, t, num_tiles, p);
    }
    launch_row(t, num_tiles, keys, order, num_tiles, kv, consts, num_cube, num_vector,
               t + NUM_TERMS * num_tiles, row);
    *num_tasks = num_tiles * kv;
    if (step) step_row(rest, rest_rows, own_row, row, launches, prefix,
                       7 + num_cube + num_vector, step);
done:
    free(ints);
    free(t);
    return rc_out;
}

/* ------------------------------------------------------------- a vector launch
 *
 * xy_vector_launch_sums: the LaunchSums row of a vector launch whose tasks are the lowering's
 * table (npu_sim.tiling.vector_tasks: every task of its first task's rows but the last), what
 * npu_sim.dealing.dealt and Device._shared_sums make of cost_vector.vector's TaskCosts: a new
 * token count's norms, RoPE, SiLU and KV writes, the first time each is timed.
 */

/* The terms of a vector task (cost_vector._vector_terms), in its order. */
enum { V_CYCLES, V_COMP, V_IN, V_OUT, V_OPS, V_FILL, NUM_V };

/* The vector launch's constants (npu_sim.launch_sums packs them in this order). */
enum {
    VC_CORE_OVERHEAD,  /* chip.gm_latency_cycles + the first task's fill and drain */
    VC_LAUNCH_CYCLES,  /* chip.vector_launch_s * chip.clock_hz */
    VC_HBM_PER_CYCLE,  /* chip.hbm_bytes_per_s / chip.clock_hz */
    VC_L2_PER_CYCLE,   /* chip.l2_bytes_per_s / chip.clock_hz */
    NUM_VC
};

/* row (7 scalars, num_cube AIC busy cycles, num_vector AIV busy cycles) of a launch of n >= 1
 * vector tasks, the first n - 1 of terms `first`, the last of terms `last` (args: first, last,
 * NUM_V each, then the NUM_VC constants), its tasks dealt round robin over min(n, num_vector)
 * AIVs. Returns 0, or -1 where the scratch could not be allocated. */
int xy_vector_launch_sums(const double *args, int64_t n, int64_t num_cube, int64_t num_vector,
                          double *row) {
    const double *first = args, *last = args + NUM_V, *k = args + 2 * NUM_V;
    double *terms = malloc(sizeof(double) * (size_t)n);
    if (!terms) return -1;
    double sums[NUM_V];  /* vector(): each term's add.reduce over the tasks (pairwise) */
    for (int v = V_COMP; v <= V_OPS; v++) {
        for (int64_t i = 0; i + 1 < n; i++) terms[i] = first[v];
        terms[n - 1] = last[v];
        sums[v] = pairwise_sum(terms, n);
    }
    free(terms);
    /* dealt(): the tasks' cycles onto their cores in task order from 0, the block's overhead,
     * the busiest core */
    const int64_t block = n < num_vector ? n : num_vector;
    double *cube_busy = row + 7, *vector_busy = row + 7 + num_cube;
    for (int64_t j = 0; j < num_cube; j++) cube_busy[j] = 0.0;
    for (int64_t j = 0; j < num_vector; j++) vector_busy[j] = 0.0;
    for (int64_t i = 0; i < n; i++)
        vector_busy[i % block] += i + 1 < n ? first[V_CYCLES] : last[V_CYCLES];
    double busiest = 0.0;
    for (int64_t j = 0; j < num_vector; j++) {
        if (j < block) vector_busy[j] += k[VC_CORE_OVERHEAD];
        if (j == 0 || vector_busy[j] > busiest) busiest = vector_busy[j];
    }
    const double offset = 0.0 + busiest;
    const double hbm_read = 0.0 + sums[V_IN], hbm_write = 0.0 + sums[V_OUT];
    /* makespan(): the first of equals among the cores, HBM and L2 (no L2 bytes) */
    const double hbm_bound = (hbm_read + hbm_write) / k[VC_HBM_PER_CYCLE];
    const double l2_bound = (0.0 + 0.0) / k[VC_L2_PER_CYCLE];
    double span = offset;
    if (hbm_bound > span) span = hbm_bound;
    if (l2_bound > span) span = l2_bound;
    const double stretch = offset ? span / offset : 1.0;
    if (stretch != 1.0) {
        for (int64_t j = 0; j < num_cube; j++) cube_busy[j] *= stretch;
        for (int64_t j = 0; j < num_vector; j++) vector_busy[j] *= stretch;
    }
    row[0] = k[VC_LAUNCH_CYCLES] + span;
    row[1] = 0.0 + 0.0;               /* cube active */
    row[2] = 0.0 + sums[V_COMP];      /* vector active */
    row[3] = hbm_read + hbm_write;
    row[4] = 0.0 + sums[V_OPS];       /* flops */
    row[5] = 0.0 + 0.0;               /* cube MACs */
    row[6] = 0.0 + 0.0;               /* useful cube MACs */
    return 0;
}
