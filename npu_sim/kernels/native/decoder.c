/* A step's decoder layers in one call: the launch sequence of every layer (QKV GEMM, RoPE, KV
 * write, attention, O GEMM, add + RMSNorm, gate/up GEMM, SiLU-mul, down GEMM, add + RMSNorm of
 * the next layer's input) replayed from a table prepared once per model (xy_layer: weights and
 * caches) and once per step (xy_step: buffers, RoPE tables, slots, attention rows).
 *
 * Why: at batch 1 the kernels of a small model's layer take ~100 us and the Python that walks a
 * layer's ten launches (operand checks, output allocation, ctypes marshalling, the device's
 * bookkeeping) took as long again: a decode step of the default model paid ~8 ms of it. Here the
 * walk costs nothing; each launch calls the same C function the launch-by-launch path calls,
 * with the same operands and thread count, so the numbers are bit-for-bit the same.
 *
 * The caller (npu_sim/kernels/replay.py) checks that every operand is what these functions take
 * (fp32 rows, panel weights, a paged cache, attention as C decodes and C chunks only) before it
 * builds an xy_step; the functions' own return codes are passed back.
 */
#include <stdint.h>

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
                        float scale, int num_threads, int kv_dtype);
int xy_chunk_attention(const float *q, int64_t q_stride, const void *k_cache,
                       const void *v_cache, const int64_t *table, int64_t bt_len,
                       int64_t start_pos, int64_t q_len, float *out, int64_t o_stride,
                       int64_t num_heads, int64_t num_kv_heads, int64_t d, int64_t num_blocks,
                       int64_t block_size, float scale, int num_threads, int kv_dtype);
int xy_gemm_packed(int fmt, const float *x, int64_t xs, const void *panels, const float *bias,
                   int64_t n, int64_t k, float *out, int64_t os, int64_t m, int num_threads,
                   int flags);

typedef struct {
    int64_t fmt;         /* gemm_formats.h's XY_* code */
    const void *panels;  /* the packed weight (N, K) */
    const float *bias;   /* (N,) or NULL */
    int64_t n, k;
} xy_weight;

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
    int64_t num_threads, gemm_flags;
} xy_step;

static int gemm(const xy_weight *w, const float *x, float *out, const xy_step *s) {
    return xy_gemm_packed((int)w->fmt, x, w->k, w->panels, w->bias, w->n, w->k, out, w->n,
                          s->num_tokens, (int)s->num_threads, (int)s->gemm_flags);
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
                                 m->scale, (int)s->num_threads, (int)m->kv_dtype);
    for (int64_t c = 0; c < s->num_chunks && rc == 0; c++) {
        const int64_t *chunk = s->chunks + 3 * c;
        rc = xy_chunk_attention(s->qkv + chunk[0] * q_stride, q_stride, l->k_cache, l->v_cache,
                                s->chunk_tables + c * s->chunk_table_len, s->chunk_table_len,
                                chunk[2], chunk[1], s->attn + chunk[0] * o_stride, o_stride,
                                m->num_heads, m->num_kv_heads, m->head_dim, m->num_blocks,
                                m->block_size, m->scale, (int)s->num_threads, (int)m->kv_dtype);
    }
    return rc;
}

/* Returns 0, or the first failing kernel's code plus 100 * its launch (in layer order: 1 QKV,
 * 2 KV write, 3 attention, 4 O, 5 gate/up, 6 down). The last layer's down projection is left
 * in s->down, the residual stream in s->residual. */
int xy_decoder_layers(const xy_dims *m, const xy_layer *layers, const xy_step *s) {
    int64_t t = s->num_tokens, h = m->hidden, d = m->head_dim;
    int64_t q_cols = m->num_heads * d, kv_cols = m->num_kv_heads * d;
    int rc;
    for (int64_t i = 0; i < m->num_layers; i++) {
        const xy_layer *l = layers + i;
        int64_t qkv_n = l->qkv.n;
        if ((rc = gemm(&l->qkv, s->x, s->qkv, s))) return rc - 100;
        /* q's and k's heads are adjacent in each qkv row: one rotation over Hq + Hkv heads */
        xy_rope(s->qkv, qkv_n, d, m->num_heads + m->num_kv_heads, s->cos, s->sin, d, t, d);
        if ((rc = xy_kv_write(s->qkv + q_cols, s->qkv + q_cols + kv_cols, qkv_n, l->k_cache,
                              l->v_cache, m->num_blocks * m->block_size, s->slots, t, kv_cols,
                              (int)m->kv_dtype)))
            return rc - 200;
        if ((rc = attention(m, l, s))) return rc - 300;
        if ((rc = gemm(&l->o, s->attn, s->o, s))) return rc - 400;
        xy_add_rmsnorm(s->o, h, s->residual, h, l->post_attn_norm, s->x, h, t, h, m->eps);
        if ((rc = gemm(&l->gate_up, s->x, s->gate_up, s))) return rc - 500;
        xy_silu_mul(s->gate_up, 2 * m->inter, s->act, m->inter, t, m->inter);
        if ((rc = gemm(&l->down, s->act, s->down, s))) return rc - 600;
        if (l->next_norm)
            xy_add_rmsnorm(s->down, h, s->residual, h, l->next_norm, s->x, h, t, h, m->eps);
    }
    return 0;
}
