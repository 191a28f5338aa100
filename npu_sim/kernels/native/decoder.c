/* A step's decoder layers in one call: the launch sequence of every layer (QKV GEMM, RoPE, KV
 * write, attention, O GEMM, add + RMSNorm, gate/up GEMM, SiLU-mul, down GEMM, add + RMSNorm of
 * the next layer's input) replayed from a table prepared once per model (xy_layer: weights and
 * caches) and once per step (xy_step: buffers, RoPE tables, slots, attention rows).
 *
 * Why: at batch 1 the kernels of a small model's layer take ~100 us and the Python that walks a
 * layer's ten launches (operand checks, output allocation, ctypes marshalling, the device's
 * bookkeeping) took as long again: a decode step of the default model paid ~8 ms of it. Here the
 * walk costs nothing. Each launch calls the C function the launch-by-launch path calls, with the
 * same operands and thread count, its row-wise launches split by rows over the threads where
 * the step has rows enough (that path runs them on one thread); a step of decodes alone runs all
 * of them in one parallel region instead (below), each output element still computed by one
 * thread as its kernel computes it. Either way the numbers are bit-for-bit those of the
 * launch-by-launch path.
 *
 * The caller (npu_sim/kernels/replay.py) checks that every operand is what these functions take
 * (fp32 rows, panel weights, a paged cache, attention as C decodes and C chunks only) before it
 * builds an xy_step; the functions' own return codes are passed back.
 */
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

/* the kernels this sequence calls (cpu_kernels.c, attention.c, attention_chunk.c, gemm.c) */
void xy_add_rmsnorm(const float *x, int64_t x_stride, float *residual, int64_t r_stride,
                    const float *weight, float *out, int64_t o_stride, int64_t rows,
                    int64_t hidden, float eps);
void xy_silu_mul(const float *gate_up, int64_t g_stride, float *out, int64_t o_stride,
                 int64_t rows, int64_t inter);
void xy_rope(float *t, int64_t row_stride, int64_t head_stride, int64_t num_heads,
             const float *cos_, const float *sin_, int64_t cs_stride, int64_t rows, int64_t d);
int xy_kv_write(const float *k, const float *v, int64_t kv_stride, void *k_cache, void *v_cache,
                int64_t num_slots, const int64_t *slots, int64_t rows, int64_t row_len,
                int kv_dtype);
int xy_decode_attention(const float *q, int64_t q_stride, const void *k_cache,
                        const void *v_cache, const int64_t *block_tables, int64_t bt_stride,
                        const int64_t *context_lens, const int64_t *q_rows, float *out,
                        int64_t o_stride, int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t d, int64_t num_blocks, int64_t block_size,
                        float scale, int num_threads, int kv_dtype, int flags);
int64_t xy_decode_parts(int64_t ctx, int flags, int kv_dtype, int64_t d, int64_t block_size,
                        int64_t num_heads, int64_t num_kv_heads);
int xy_decode_part(const float *qrow, const void *k_cache, const void *v_cache,
                   const int64_t *table, int64_t bt_len, int64_t ctx, int64_t c, float *partial,
                   int64_t num_heads, int64_t num_kv_heads, int64_t d, int64_t num_blocks,
                   int64_t block_size, float scale, int kv_dtype, int flags);
void xy_decode_merge(const float *partials, int64_t num_parts, int64_t num_heads, int64_t d,
                     float *orow);
int xy_chunk_attention(const float *q, int64_t q_stride, const void *k_cache,
                       const void *v_cache, const int64_t *table, int64_t bt_len,
                       int64_t start_pos, int64_t q_len, float *out, int64_t o_stride,
                       int64_t num_heads, int64_t num_kv_heads, int64_t d, int64_t num_blocks,
                       int64_t block_size, float scale, int num_threads, int kv_dtype,
                       int flags);
int xy_gemm_packed(int fmt, const float *x, int64_t xs, const void *panels, const float *bias,
                   int64_t n, int64_t k, float *out, int64_t os, int64_t m, int num_threads,
                   int flags);
int xy_gemm_panels(int fmt, const float *x, int64_t xs, const void *panels, const float *bias,
                   int64_t n, int64_t k, float *out, int64_t os, int64_t m, int flags,
                   int64_t p0, int64_t p1);

typedef struct {
    int64_t fmt;         /* gemm_formats.h's XY_* code */
    const void *panels;  /* the packed weight (N, K) */
    const float *bias;   /* (N,) or NULL */
    int64_t n, k;
    /* the same weight in another format for steps of at most small_rows rows (a lone stream
     * reads fewer bytes of 4-bit blocks), or small_panels NULL */
    int64_t small_fmt;
    const void *small_panels;
    int64_t small_rows;
    /* and for steps of small_rows + 1 to mid_rows rows, small_panels read in format mid_fmt
     * (blocks as the bf16 panels' weights: gemm_amx.h), or mid_fmt 0 */
    int64_t mid_fmt;
    int64_t mid_rows;
} xy_weight;

/* The format and panels a step of m rows reads. */
static inline const void *pick(const xy_weight *w, int64_t m, int *fmt) {
    if (w->small_panels && m <= w->small_rows) {
        *fmt = (int)w->small_fmt;
        return w->small_panels;
    }
    if (w->mid_fmt && m <= w->mid_rows) {
        *fmt = (int)w->mid_fmt;
        return w->small_panels;
    }
    *fmt = (int)w->fmt;
    return w->panels;
}

typedef struct {
    const float *post_attn_norm;  /* (H,) */
    const float *next_norm;       /* (H,) the next layer's input norm; NULL on the last layer */
    xy_weight qkv, o, gate_up, down;
    void *k_cache, *v_cache;      /* (NB, BS, Hkv, D) of kv_dtype */
} xy_layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, inter;
    int64_t num_blocks, block_size, kv_dtype;
    float eps, scale;
} xy_dims;

typedef struct {
    int64_t num_tokens;                /* T */
    float *residual;                   /* (T, H): updated in place */
    float *x;                          /* (T, H): the first layer's normed input; overwritten */
    float *qkv, *attn, *o, *gate_up, *act, *down;  /* (T, N) scratch of each launch's output */
    const float *cos, *sin;            /* (T, D) */
    const int64_t *slots;              /* (T,) flat cache slots */
    int64_t num_decodes;               /* single-query sequences, one C decode call */
    const int64_t *decode_rows, *decode_tables, *decode_context_lens;
    int64_t decode_table_stride;
    int64_t num_chunks;                /* prefill chunks, one C chunk call each */
    const int64_t *chunks;             /* (num_chunks, 3): first row, rows, start position */
    const int64_t *chunk_tables;       /* (num_chunks, chunk_table_len) */
    int64_t chunk_table_len;
    int64_t num_threads, gemm_flags, attention_flags;  /* gemm.c's, attention_amx.h's */
} xy_step;

static int gemm(const xy_weight *w, const float *x, float *out, const xy_step *s) {
    int fmt;
    const void *panels = pick(w, s->num_tokens, &fmt);
    return xy_gemm_packed(fmt, x, w->k, panels, w->bias, w->n, w->k, out, w->n, s->num_tokens,
                          (int)s->num_threads, (int)s->gemm_flags);
}

/* Attention of one layer: q (T, Hq, D) rows of the qkv buffer into attn (T, Hq, D). */
static int attention(const xy_dims *m, const xy_layer *l, const xy_step *s) {
    int64_t q_stride = l->qkv.n, o_stride = m->num_heads * m->head_dim;
    int rc = 0;
    if (s->num_decodes)
        rc = xy_decode_attention(s->qkv, q_stride, l->k_cache, l->v_cache, s->decode_tables,
                                 s->decode_table_stride, s->decode_context_lens, s->decode_rows,
                                 s->attn, o_stride, s->num_decodes, m->num_heads,
                                 m->num_kv_heads, m->head_dim, m->num_blocks, m->block_size,
                                 m->scale, (int)s->num_threads, (int)m->kv_dtype,
                                 (int)s->attention_flags);
    for (int64_t c = 0; c < s->num_chunks && rc == 0; c++) {
        const int64_t *chunk = s->chunks + 3 * c;
        rc = xy_chunk_attention(s->qkv + chunk[0] * q_stride, q_stride, l->k_cache, l->v_cache,
                                s->chunk_tables + c * s->chunk_table_len, s->chunk_table_len,
                                chunk[2], chunk[1], s->attn + chunk[0] * o_stride, o_stride,
                                m->num_heads, m->num_kv_heads, m->head_dim, m->num_blocks,
                                m->block_size, m->scale, (int)s->num_threads, (int)m->kv_dtype,
                                (int)s->attention_flags);
    }
    return rc;
}

/* This thread's share [*b, *e) of `total` items. */
static void share(int64_t total, int tid, int nth, int64_t *b, int64_t *e) {
    *b = total * tid / nth;
    *e = total * (tid + 1) / nth;
}

/* Rows per thread from which a step's row-wise kernels (RoPE, KV write, add + RMSNorm,
 * SiLU-mul) split their rows over the threads: one kernel of 16 rows takes ~10-100 us, a
 * region's fork and join a few. */
#define MIN_ROWS_PER_THREAD 8

/* The threads a row-wise kernel of the step splits its rows over (1: the calling thread). */
static int row_threads(const xy_step *s) {
    int64_t nth = s->num_tokens / MIN_ROWS_PER_THREAD;
    return nth < 2 ? 1 : nth < s->num_threads ? (int)nth : (int)s->num_threads;
}

/* One of a layer's row-wise launches between two GEMMs (`op`) on rows [b, e), each row
 * computed as the kernel computes it: the same numbers however the rows are split. Returns the
 * KV write's code (0 for the others). */
enum { ROW_ROPE_KV, ROW_POST_ATTN_NORM, ROW_SILU, ROW_NEXT_NORM };

static int row_kernels(int op, const xy_dims *m, const xy_layer *l, const xy_step *s,
                       int64_t b, int64_t e) {
    int64_t h = m->hidden, d = m->head_dim, n = e - b, qkv_n = l->qkv.n, inter = m->inter;
    int64_t q_cols = m->num_heads * d, kv_cols = m->num_kv_heads * d;
    if (n <= 0) return 0;
    switch (op) {
    case ROW_ROPE_KV: {
        float *qkv = s->qkv + b * qkv_n;
        /* q's and k's heads are adjacent in each qkv row: one rotation over Hq + Hkv heads */
        xy_rope(qkv, qkv_n, d, m->num_heads + m->num_kv_heads, s->cos + b * d, s->sin + b * d,
                d, n, d);
        return xy_kv_write(qkv + q_cols, qkv + q_cols + kv_cols, qkv_n, l->k_cache, l->v_cache,
                           m->num_blocks * m->block_size, s->slots + b, n, kv_cols,
                           (int)m->kv_dtype);
    }
    case ROW_POST_ATTN_NORM:
        xy_add_rmsnorm(s->o + b * h, h, s->residual + b * h, h, l->post_attn_norm,
                       s->x + b * h, h, n, h, m->eps);
        return 0;
    case ROW_SILU:
        xy_silu_mul(s->gate_up + b * 2 * inter, 2 * inter, s->act + b * inter, inter, n, inter);
        return 0;
    default:
        xy_add_rmsnorm(s->down + b * h, h, s->residual + b * h, h, l->next_norm, s->x + b * h,
                       h, n, h, m->eps);
        return 0;
    }
}

/* row_kernels over every row of the step, split over row_threads(s) threads. */
static int rows_split(int op, const xy_dims *m, const xy_layer *l, const xy_step *s) {
    int nth = row_threads(s);
    if (nth == 1) return row_kernels(op, m, l, s, 0, s->num_tokens);
    int rc = 0;
#pragma omp parallel num_threads(nth) reduction(min : rc)
    {
        int64_t b, e;
        share(s->num_tokens, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        rc = row_kernels(op, m, l, s, b, e);
    }
    return rc;
}

/* The layers as the launch-by-launch path runs them: each kernel with its own parallel region
 * (the row-wise kernels too, where the step has rows enough: a prefill chunk's). */
static int layers_by_kernel(const xy_dims *m, const xy_layer *layers, const xy_step *s) {
    int rc;
    for (int64_t i = 0; i < m->num_layers; i++) {
        const xy_layer *l = layers + i;
        if ((rc = gemm(&l->qkv, s->x, s->qkv, s))) return rc - 100;
        if ((rc = rows_split(ROW_ROPE_KV, m, l, s))) return rc - 200;
        if ((rc = attention(m, l, s))) return rc - 300;
        if ((rc = gemm(&l->o, s->attn, s->o, s))) return rc - 400;
        rows_split(ROW_POST_ATTN_NORM, m, l, s);
        if ((rc = gemm(&l->gate_up, s->x, s->gate_up, s))) return rc - 500;
        rows_split(ROW_SILU, m, l, s);
        if ((rc = gemm(&l->down, s->act, s->down, s))) return rc - 600;
        if (l->next_norm) rows_split(ROW_NEXT_NORM, m, l, s);
    }
    return 0;
}

/* ------------------------------------------------------------------ one parallel region
 *
 * A decode step's kernels are short (a GEMM of the default model's layer ~30-150 us), and with
 * OMP_WAIT_POLICY=PASSIVE (what a shared machine wants) each kernel's parallel region wakes its
 * sleeping threads through the kernel: ~150 regions a step. Here the threads enter one region
 * for the whole stack and meet at barriers that spin briefly (then yield the core). Each
 * kernel's work is split so that every output element is computed by one thread exactly as
 * the kernel computes it: GEMM panels (gemm.c's columns), vector ops by rows, the attention by
 * sequence, each sequence's row rotated and written to the cache by the thread that then
 * attends with it. Only steps of single-query sequences (decodes) run here.
 */

#define SPINS_BEFORE_YIELD 4096

typedef struct {
    atomic_int arrived;
    atomic_int phase;
    int num_threads;
} spin_barrier;

static void barrier_wait(spin_barrier *b) {
    int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == b->num_threads - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase;)
        if (++spins >= SPINS_BEFORE_YIELD) {
            spins = 0;
            sched_yield();  /* the other thread may be off its core: give it the core */
        }
}

/* The decodes attended in parts (attention.c's xy_decode_parts: long contexts), so that a lone
 * stream's long context runs on every thread. Decode q takes parts[q] parts (1: in one piece,
 * claimed with its sequence), their partial sums from partials + first[q] * part_len; item i
 * of the num_items parts is part i - item_first[i] of decode item_decode[i]. */
typedef struct {
    int64_t num_items, part_len;
    int64_t *parts, *first, *item_decode, *item_first;
    float *partials;
} split_plan;

typedef struct {
    const xy_dims *m;
    const xy_step *s;
    const split_plan *split;  /* NULL: every decode in one piece */
    spin_barrier barrier;
    atomic_long next_seq;  /* the attention's next unclaimed sequence */
    atomic_long next_part;  /* ... and part of a split one */
    atomic_int failed;     /* the first failure's return code, 0 while none */
} region;

static void fail(region *r, int rc) {
    int none = 0;
    atomic_compare_exchange_strong(&r->failed, &none, rc);
}

static void gemm_share(region *r, const xy_weight *w, const float *x, float *out, int tid,
                       int nth, int launch) {
    int64_t p0, p1;
    share((w->n + 15) / 16, tid, nth, &p0, &p1);
    if (p0 < p1 && !atomic_load(&r->failed)) {
        int fmt;
        const void *panels = pick(w, r->s->num_tokens, &fmt);
        int rc = xy_gemm_panels(fmt, x, w->k, panels, w->bias, w->n, w->k, out, w->n,
                                r->s->num_tokens, (int)r->s->gemm_flags, p0, p1);
        if (rc) fail(r, rc - 100 * launch);
    }
    barrier_wait(&r->barrier);
}

/* Rows [b, e) of out = norm(residual += x). */
static void norm_rows(region *r, const float *x, const float *weight, int64_t b, int64_t e) {
    int64_t h = r->m->hidden;
    if (b < e)
        xy_add_rmsnorm(x + b * h, h, r->s->residual + b * h, h, weight, r->s->x + b * h, h, e - b,
                       h, r->m->eps);
    barrier_wait(&r->barrier);
}

/* Sequences claimed one at a time: rotate the row, write its K/V, attend (a split decode: its
 * parts claimed once every row is in the cache, then merged). */
static void decode_share(region *r, const xy_layer *l, int tid, int nth) {
    const xy_dims *m = r->m;
    const xy_step *s = r->s;
    const split_plan *split = r->split;
    int64_t d = m->head_dim, q_cols = m->num_heads * d, kv_cols = m->num_kv_heads * d;
    int64_t qkv_n = l->qkv.n;
    for (int64_t q = atomic_fetch_add(&r->next_seq, 1); q < s->num_decodes;
         q = atomic_fetch_add(&r->next_seq, 1)) {
        if (atomic_load(&r->failed)) continue;
        int64_t row = s->decode_rows[q];
        float *qkv = s->qkv + row * qkv_n;
        xy_rope(qkv, qkv_n, d, m->num_heads + m->num_kv_heads, s->cos + row * d,
                s->sin + row * d, d, 1, d);
        int rc = xy_kv_write(qkv + q_cols, qkv + q_cols + kv_cols, qkv_n, l->k_cache, l->v_cache,
                             m->num_blocks * m->block_size, s->slots + row, 1, kv_cols,
                             (int)m->kv_dtype);
        if (rc) {
            fail(r, rc - 200);
            continue;
        }
        if (split && split->parts[q] > 1) continue;
        rc = xy_decode_attention(s->qkv, qkv_n, l->k_cache, l->v_cache,
                                 s->decode_tables + q * s->decode_table_stride,
                                 s->decode_table_stride, s->decode_context_lens + q,
                                 s->decode_rows + q, s->attn, q_cols, 1, m->num_heads,
                                 m->num_kv_heads, d, m->num_blocks, m->block_size, m->scale, 1,
                                 (int)m->kv_dtype, (int)s->attention_flags);
        if (rc) fail(r, rc - 300);
    }
    if (!split) return;
    barrier_wait(&r->barrier);  /* every split decode's row is in the cache */
    for (int64_t i = atomic_fetch_add(&r->next_part, 1); i < split->num_items;
         i = atomic_fetch_add(&r->next_part, 1)) {
        if (atomic_load(&r->failed)) continue;
        int64_t q = split->item_decode[i], c = i - split->item_first[i];
        int rc = xy_decode_part(s->qkv + s->decode_rows[q] * qkv_n, l->k_cache, l->v_cache,
                                s->decode_tables + q * s->decode_table_stride,
                                s->decode_table_stride, s->decode_context_lens[q], c,
                                split->partials + (split->first[q] + c) * split->part_len,
                                m->num_heads, m->num_kv_heads, d, m->num_blocks, m->block_size,
                                m->scale, (int)m->kv_dtype, (int)s->attention_flags);
        if (rc) fail(r, rc - 300);
    }
    barrier_wait(&r->barrier);  /* every part summed */
    int64_t b, e;
    share(s->num_decodes, tid, nth, &b, &e);
    for (int64_t q = b; q < e && !atomic_load(&r->failed); q++)
        if (split->parts[q] > 1)
            xy_decode_merge(split->partials + split->first[q] * split->part_len, split->parts[q],
                            m->num_heads, d, s->attn + s->decode_rows[q] * q_cols);
}

static void layers_in_region(region *r, const xy_layer *layers, int tid, int nth) {
    const xy_dims *m = r->m;
    const xy_step *s = r->s;
    int64_t t = s->num_tokens, b, e;
    share(t, tid, nth, &b, &e);
    for (int64_t i = 0; i < m->num_layers; i++) {
        const xy_layer *l = layers + i;
        gemm_share(r, &l->qkv, s->x, s->qkv, tid, nth, 1);
        decode_share(r, l, tid, nth);
        barrier_wait(&r->barrier);
        if (tid == 0) {  /* next claimed a layer and barriers on */
            atomic_store(&r->next_seq, 0);
            atomic_store(&r->next_part, 0);
        }
        gemm_share(r, &l->o, s->attn, s->o, tid, nth, 4);
        norm_rows(r, s->o, l->post_attn_norm, b, e);
        gemm_share(r, &l->gate_up, s->x, s->gate_up, tid, nth, 5);
        if (b < e)
            xy_silu_mul(s->gate_up + b * 2 * m->inter, 2 * m->inter, s->act + b * m->inter,
                        m->inter, e - b, m->inter);
        barrier_wait(&r->barrier);
        gemm_share(r, &l->down, s->act, s->down, tid, nth, 6);
        if (l->next_norm) norm_rows(r, s->down, l->next_norm, b, e);
    }
}

/* Whether a step runs in one region: decodes only, on two threads or more (every weight
 * format splits by panels: xy_gemm_panels). */
static int one_region_takes(const xy_step *s) {
    return !s->num_chunks && s->num_decodes == s->num_tokens && s->num_threads >= 2;
}

/* The parts the step's decode q is attended in (attention.c's xy_decode_parts). */
static int64_t decode_parts(const xy_dims *m, const xy_step *s, int64_t q) {
    return xy_decode_parts(s->decode_context_lens[q], (int)s->attention_flags, (int)m->kv_dtype,
                           m->head_dim, m->block_size, m->num_heads, m->num_kv_heads);
}

/* The step's split decodes into plan: 1, or 0 when none is split (nothing allocated: the
 * common step, whose decodes are short); -1 when out of memory. */
static int plan_split(const xy_dims *m, const xy_step *s, split_plan *plan) {
    int64_t n = s->num_decodes, num_items = 0;
    for (int64_t q = 0; q < n; q++) {
        int64_t parts = decode_parts(m, s, q);
        num_items += parts > 1 ? parts : 0;
    }
    if (!num_items) return 0;
    plan->num_items = num_items;
    plan->part_len = m->num_heads * (m->head_dim + 2);  /* attention.c's part_floats */
    plan->parts = malloc(sizeof(int64_t) * (size_t)(2 * n + 2 * num_items));
    plan->partials = malloc(sizeof(float) * (size_t)(num_items * plan->part_len));
    if (!plan->parts || !plan->partials) {
        free(plan->parts);
        free(plan->partials);
        return -1;
    }
    plan->first = plan->parts + n;
    plan->item_decode = plan->first + n;
    plan->item_first = plan->item_decode + num_items;
    for (int64_t q = 0, i = 0; q < n; q++) {
        plan->parts[q] = decode_parts(m, s, q);
        plan->first[q] = i;
        for (int64_t c = 0; plan->parts[q] > 1 && c < plan->parts[q]; c++, i++) {
            plan->item_decode[i] = q;
            plan->item_first[i] = plan->first[q];
        }
    }
    return 1;
}

/* Returns 0, or the first failing kernel's code plus 100 * its launch (in layer order: 1 QKV,
 * 2 KV write, 3 attention, 4 O, 5 gate/up, 6 down). The last layer's down projection is left
 * in s->down, the residual stream in s->residual. */
int xy_decoder_layers(const xy_dims *m, const xy_layer *layers, const xy_step *s) {
    if (!one_region_takes(s)) return layers_by_kernel(m, layers, s);
    split_plan plan;
    int split = plan_split(m, s, &plan);
    if (split < 0) return -300 - 1;
    region r = {.m = m, .s = s, .split = split ? &plan : NULL};
    atomic_init(&r.next_seq, 0);
    atomic_init(&r.next_part, 0);
    atomic_init(&r.failed, 0);
    atomic_init(&r.barrier.arrived, 0);
    atomic_init(&r.barrier.phase, 0);
#pragma omp parallel num_threads((int)s->num_threads)
    {
#pragma omp single
        r.barrier.num_threads = omp_get_num_threads();  /* the team may be smaller than asked */
        /* (single's implied barrier: every thread sees the count before the first wait) */
        layers_in_region(&r, layers, omp_get_thread_num(), r.barrier.num_threads);
    }
    if (split) {
        free(plan.parts);
        free(plan.partials);
    }
    return atomic_load(&r.failed);
}
