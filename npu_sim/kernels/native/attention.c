/* Attention over the paged KV cache for the simulator's fast path: one query token per
 * sequence (decodes) and prefill chunks. Keys and values are read straight out of the cache
 * through the block tables (no gather into a padded copy, no mask tensor), and the work is shared
 * among torch's OpenMP threads (see gemm.c). Compiled like cpu_kernels.c (-ffp-contract=off),
 * but both kernels opt back into fused multiply-adds: attention never matched ATen bit for bit,
 * and its tests allow fp32 rounding. Softmax in fp32 with the row max subtracted.
 *
 * The cache holds fp32, bf16 or fp16 elements (kv_dtype: simd.h's KV_*); 16-bit elements are
 * widened to fp32 as they are loaded (a shift, or F16C's vcvtph2ps), so queries, scores,
 * softmax and the output stay fp32 and a 16-bit cache halves the bytes each key costs, which
 * is what bounds a decode at long contexts. One copy of each kernel per element type.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_approx.h"
#include "simd.h"

/* 8 fp32 lanes (simd.h's v8: AVX / SSE / NEON as the target has); `vf_u` is the same vector
 * read from or written to memory with only float alignment. */
typedef v8 vf;
typedef v8_u vf_u;
#define VF_LANES 8

static inline float hsum(vf v) {  /* pairwise, by shuffles: lanes are never read one by one */
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
}

/* The first cache element of position p's slot: its block from the table, its offset in the
 * block. The block size is a power of two (shift and mask, not a 64-bit division per key). */
static inline int64_t slot(const int64_t *table, int64_t p, int64_t block_shift,
                           int64_t token_len) {
    int64_t mask = ((int64_t)1 << block_shift) - 1;
    return ((table[p >> block_shift] << block_shift) + (p & mask)) * token_len;
}

/* log2 of a block size, or -1 unless it is a power of two (slots are found by shift and mask). */
static int64_t block_shift_of(int64_t block_size) {
    int64_t shift = 0;
    while (((int64_t)1 << shift) < block_size) shift++;
    return ((int64_t)1 << shift) == block_size ? shift : -1;
}

/* Whether the first `used` entries of a block table all name blocks of the cache. */
static int blocks_in_range(const int64_t *table, int64_t used, int64_t num_blocks) {
    for (int64_t b = 0; b < used; b++)
        if (table[b] < 0 || table[b] >= num_blocks) return 0;
    return 1;
}

/* Blocks are scattered, so the hardware prefetchers cannot run ahead across them: fetch the slot
 * a block after p (all KV heads), if the context reaches it, into L2. (Into L1, with keys and
 * values fetched in the same pass, the prefetches filled the miss buffers and stalled: 1.6x
 * slower at 1000 keys.) */
static inline void prefetch_block_ahead(const void *cache, const int64_t *table, int64_t p,
                                        int64_t ctx, int64_t block_shift, int64_t token_len,
                                        int dt) {
    int64_t ahead = p + ((int64_t)1 << block_shift), size = kv_size(dt);
    if (ahead >= ctx) return;
    const char *row = (const char *)cache + slot(table, ahead, block_shift, token_len) * size;
    for (int64_t i = 0; i < token_len * size; i += 64) __builtin_prefetch(row + i, 0, 2);
}

/* Sequence s's attention for one query row: qv (num_heads, d) against keys [0, ctx) through its
 * block table; scores (num_heads, ctx) and acc (num_heads, d) are scratch. */
static inline __attribute__((always_inline)) void attend(
    const vf *qv, const void *k_cache, const void *v_cache, const int64_t *table, int64_t ctx,
    float *os, float *scores, vf *acc, const int16_t *head_kv, int64_t num_heads, int64_t d,
    int64_t token_len, int64_t block_shift, float scale, int dt) {
    int64_t nv = d / VF_LANES;
    for (int64_t p = 0; p < ctx; p++) {  /* scores: keys slot by slot */
        int64_t key = slot(table, p, block_shift, token_len);
        prefetch_block_ahead(k_cache, table, p, ctx, block_shift, token_len, dt);
        for (int64_t h = 0; h < num_heads; h++) {
            int64_t kh = key + head_kv[h] * d;
            const vf *qh = qv + h * nv;
            vf dot = qh[0] * kv_load8(k_cache, kh, dt);
            for (int64_t c = 1; c < nv; c++) dot += qh[c] * kv_load8(k_cache, kh + c * VF_LANES, dt);
            scores[h * ctx + p] = hsum(dot) * scale;
        }
    }
    for (int64_t h = 0; h < num_heads; h++) {
        float *sh = scores + h * ctx, m = sh[0], l = 0.0f;
        for (int64_t p = 1; p < ctx; p++) m = sh[p] > m ? sh[p] : m;
#pragma omp simd reduction(+ : l)
        for (int64_t p = 0; p < ctx; p++) {
            sh[p] = exp_approx(sh[p] - m);
            l += sh[p];
        }
        float inv = 1.0f / l;
#pragma omp simd
        for (int64_t p = 0; p < ctx; p++) sh[p] *= inv;
    }
    memset(acc, 0, sizeof(vf) * (size_t)(num_heads * nv));
    for (int64_t p = 0; p < ctx; p++) {  /* output: values slot by slot, in their own pass */
        int64_t val = slot(table, p, block_shift, token_len);
        prefetch_block_ahead(v_cache, table, p, ctx, block_shift, token_len, dt);
        for (int64_t h = 0; h < num_heads; h++) {
            int64_t vh = val + head_kv[h] * d;
            vf w = bcast8(scores[h * ctx + p]);
            vf *a = acc + h * nv;
            for (int64_t c = 0; c < nv; c++) a[c] += w * kv_load8(v_cache, vh + c * VF_LANES, dt);
        }
    }
    for (int64_t i = 0; i < num_heads * nv; i++) *(vf_u *)(os + i * VF_LANES) = acc[i];
}

/* attend with the element type a constant, and a copy for the common head size, its per-head
 * loops unrolled (~10% at 90 keys). */
#define ATTEND_COPIES(...)                                                                    \
    switch (kv_dtype * 2 + (d == 64)) {                                                       \
    case KV_F32 * 2: attend(__VA_ARGS__, d, token_len, block_shift, scale, KV_F32); break;    \
    case KV_F32 * 2 + 1: attend(__VA_ARGS__, 64, token_len, block_shift, scale, KV_F32); break; \
    case KV_BF16 * 2: attend(__VA_ARGS__, d, token_len, block_shift, scale, KV_BF16); break;  \
    case KV_BF16 * 2 + 1: attend(__VA_ARGS__, 64, token_len, block_shift, scale, KV_BF16); break; \
    case KV_F16 * 2: attend(__VA_ARGS__, d, token_len, block_shift, scale, KV_F16); break;    \
    default: attend(__VA_ARGS__, 64, token_len, block_shift, scale, KV_F16); break;           \
    }

/* One query token per sequence against its whole context, read from the paged cache.
 *
 * q: rows of num_heads * d (query heads j * G .. j * G + G - 1 share KV head j); sequence s
 * reads q row q_rows[s] and writes the same row of out. Cache: (num_blocks, block_size,
 * num_kv_heads, d); sequence s's key at position p is in block block_tables[s * bt_stride +
 * p / block_size], offset p % block_size, and it sees positions [0, context_lens[s]).
 * Keys and values are read slot by slot, each slot (all KV heads) once and in order, the
 * cache's elements of type kv_dtype (KV_F32, KV_BF16, KV_F16). Softmax in fp32 with the row
 * max subtracted. Sequences are shared among up to num_threads OpenMP threads
 * (torch's, see gemm.c). d must be a multiple of 8 and block_size a power of two; at most 1024
 * query heads; every context is >= 1 token and every block it reaches in [0, num_blocks).
 * Returns 0, -1 when out of memory, -2 for an unsupported shape, -3 (nothing written) for a
 * context past its table or a block out of range. */
/* (fp-contract on this function, not on `attend`: an inlined callee's optimize attribute gives
 * way to its caller's, and the OpenMP body outlined from here inherits this one) */
__attribute__((optimize("fp-contract=fast")))
int xy_decode_attention(const float *q, int64_t q_stride, const void *k_cache,
                        const void *v_cache, const int64_t *block_tables, int64_t bt_stride,
                        const int64_t *context_lens, const int64_t *q_rows, float *out,
                        int64_t o_stride, int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t d, int64_t num_blocks, int64_t block_size,
                        float scale, int num_threads, int kv_dtype) {
    int64_t block_shift = block_shift_of(block_size);
    if (d % VF_LANES || block_shift < 0 || num_heads > 1024 || kv_dtype < KV_F32
        || kv_dtype > KV_F16)
        return -2;
    int16_t head_kv[1024];  /* the KV head of each query head */
    for (int64_t h = 0; h < num_heads; h++) head_kv[h] = (int16_t)(h / (num_heads / num_kv_heads));
    int64_t max_ctx = 0, token_len = num_kv_heads * d;  /* one cache slot */
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t ctx = context_lens[s], used = (ctx + block_size - 1) >> block_shift;
        if (ctx < 1 || used > bt_stride
            || !blocks_in_range(block_tables + s * bt_stride, used, num_blocks))
            return -3;
        if (ctx > max_ctx) max_ctx = ctx;
    }
    if (num_threads > num_seqs) num_threads = (int)num_seqs;
    if (num_threads < 1) num_threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* per thread: scores (num_heads, max_ctx), then acc and the query (num_heads, d) */
        int64_t scores_len = (num_heads * max_ctx + 15) & ~(int64_t)15;
        float *scores = aligned_alloc(64, sizeof(float) * (size_t)(scores_len + 2 * num_heads * d));
        failed = scores == NULL;
        vf *acc = (vf *)(scores + scores_len), *qv = acc + num_heads * (d / VF_LANES);
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; s++) {
            if (!scores) continue;
            for (int64_t i = 0; i < num_heads * d / VF_LANES; i++)
                qv[i] = *(const vf_u *)(q + q_rows[s] * q_stride + i * VF_LANES);
            const int64_t *table = block_tables + s * bt_stride;
            float *os = out + q_rows[s] * o_stride;
            ATTEND_COPIES(qv, k_cache, v_cache, table, context_lens[s], os, scores, acc, head_kv,
                          num_heads)
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------ prefill chunks */

#define TQ 16  /* query rows per work item */
#define TK 16  /* keys per tile: two 8-lane vectors of scores */
#define QB 6   /* query vectors whose scores are computed together: 12 accumulators, with the
                  key row (2) and a broadcast 15 of AVX2's 16 vector registers */
#define MAX_D 256

/* Keys k0 .. k0 + nk - 1 of KV head j (nk <= TK) as fp32 into kt (d, TK), transposed, and
 * vt (TK, d); the tile's keys past nk are zero. */
static void load_tile(const void *k_cache, const void *v_cache, const int64_t *table,
                      int64_t k0, int64_t nk, int64_t j, int64_t d, int64_t token_len,
                      int64_t block_shift, int dt, float *kt, float *vt) {
    float key[MAX_D] __attribute__((aligned(32)));
    for (int64_t t = 0; t < TK; t++) {
        if (t >= nk) {
            for (int64_t c = 0; c < d; c++) kt[c * TK + t] = 0.0f;
            memset(vt + t * d, 0, sizeof(float) * (size_t)d);
            continue;
        }
        int64_t at = slot(table, k0 + t, block_shift, token_len) + j * d;
        switch (dt) {  /* the element type a constant in each row load */
        case KV_F32:
            kv_load_row(key, k_cache, at, d, KV_F32), kv_load_row(vt + t * d, v_cache, at, d, KV_F32);
            break;
        case KV_BF16:
            kv_load_row(key, k_cache, at, d, KV_BF16), kv_load_row(vt + t * d, v_cache, at, d, KV_BF16);
            break;
        default:
            kv_load_row(key, k_cache, at, d, KV_F16), kv_load_row(vt + t * d, v_cache, at, d, KV_F16);
        }
        for (int64_t c = 0; c < d; c++) kt[c * TK + t] = key[c];
    }
}

/* One work item of a chunk: rows [r0, r0 + rows) of the chunk, the `group` query heads of KV
 * head j, flash style: key tiles in order, online softmax. Query vector i = r * group + g.
 * Scratch: kt (d, TK) the tile's keys transposed and vt (TK, d) its values, shared by every
 * query vector of the item; sc (nq, TK) their scores; acc (nq, d), m and l (nq): the running
 * output, max and sum of each. */
static inline __attribute__((always_inline)) void chunk_item(
    const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
    const int64_t *table, int64_t start_pos, int64_t r0, int64_t rows, int64_t j, int64_t group,
    int64_t d, int64_t token_len, int64_t block_shift, float scale, float *out, int64_t o_stride,
    float *kt, float *vt, float *sc, float *acc, float *m, float *l, int dt) {
    int64_t nq = rows * group, nd = d / VF_LANES;
    const float *qv[TQ * 64];  /* each query vector's row of q (group <= 64) */
    for (int64_t i = 0; i < nq; i++) {
        qv[i] = q + (r0 + i / group) * q_stride + (j * group + i % group) * d;
        m[i] = -INFINITY, l[i] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(nq * d));
    int64_t k_end = start_pos + r0 + rows;  /* the item's last row sees keys [0, k_end) */
    for (int64_t k0 = 0; k0 < k_end; k0 += TK) {
        int64_t nk = k_end - k0 < TK ? k_end - k0 : TK;
        load_tile(k_cache, v_cache, table, k0, nk, j, d, token_len, block_shift, dt, kt, vt);
        /* scores, QB query vectors at a time: each kt row is loaded once for all of them */
        for (int64_t i0 = 0; i0 < nq; i0 += QB) {
            const float *qb[QB];
            for (int b = 0; b < QB; b++) qb[b] = qv[i0 + b < nq ? i0 + b : nq - 1];
            vf s[QB][2];
            for (int b = 0; b < QB; b++) s[b][0] = s[b][1] = (vf){0};
            for (int64_t c = 0; c < d; c++) {
                vf k0v = load8(kt + c * TK), k1v = load8(kt + c * TK + 8);
                for (int b = 0; b < QB; b++) {
                    vf qc = bcast8(qb[b][c]);
                    s[b][0] += qc * k0v, s[b][1] += qc * k1v;
                }
            }
            for (int b = 0; b < QB && i0 + b < nq; b++) {
                *(vf_u *)(sc + (i0 + b) * TK) = s[b][0] * scale;
                *(vf_u *)(sc + (i0 + b) * TK + 8) = s[b][1] * scale;
            }
        }
        for (int64_t i = 0; i < nq; i++) {
            int64_t visible = start_pos + r0 + i / group - k0 + 1;  /* keys of the tile it sees */
            if (visible <= 0) continue;  /* the whole tile lies after this row */
            if (visible > nk) visible = nk;
            const float *s = sc + i * TK;
            float mx = m[i];
            for (int64_t t = 0; t < visible; t++) mx = s[t] > mx ? s[t] : mx;
            float p[TK], sum = 0.0f, alpha = exp_approx(m[i] - mx);  /* (m = -inf: ~0) */
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < TK; t++) {
                p[t] = t < visible ? exp_approx(s[t] - mx) : 0.0f;
                sum += p[t];
            }
            m[i] = mx;
            l[i] = l[i] * alpha + sum;
            /* the running output in registers, one independent chain per 8 elements */
            vf o[MAX_D / VF_LANES], *oi = (vf *)(acc + i * d);
            for (int64_t c = 0; c < nd; c++) o[c] = oi[c] * alpha;
            for (int64_t t = 0; t < visible; t++) {
                vf pt = bcast8(p[t]);
                for (int64_t c = 0; c < nd; c++) o[c] += pt * load8(vt + t * d + c * VF_LANES);
            }
            for (int64_t c = 0; c < nd; c++) oi[c] = o[c];
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        float inv = 1.0f / l[i];
        float *dst = out + (r0 + i / group) * o_stride + (j * group + i % group) * d;
        for (int64_t c = 0; c < d; c++) dst[c] = acc[i * d + c] * inv;
    }
}

/* A prefill chunk of one sequence: query row r of q (rows [0, q_len), heads as in
 * xy_decode_attention) is the token at position start_pos + r and sees the keys at positions
 * [0, start_pos + r] (causal), read through the sequence's block table (bt_len entries); writes
 * the same rows of out; the cache's elements are of type kv_dtype (KV_F32, KV_BF16, KV_F16).
 * Work items (KV head, 16 query rows) are shared among up to num_threads
 * OpenMP threads, the latest rows (the most keys) first. d must be a multiple of 16 up to 256,
 * at most 64 query heads share a KV head, and block_size is a power of two. Returns 0, -1 when
 * out of memory, -2 for an unsupported shape, -3 (nothing written) when the chunk reaches past
 * its table or a block is out of range. */
__attribute__((optimize("fp-contract=fast")))
int xy_chunk_attention(const float *q, int64_t q_stride, const void *k_cache,
                       const void *v_cache, const int64_t *table, int64_t bt_len,
                       int64_t start_pos, int64_t q_len, float *out, int64_t o_stride,
                       int64_t num_heads, int64_t num_kv_heads, int64_t d, int64_t num_blocks,
                       int64_t block_size, float scale, int num_threads, int kv_dtype) {
    int64_t block_shift = block_shift_of(block_size);
    if (d % TK || d > MAX_D || block_shift < 0 || num_heads % num_kv_heads
        || num_heads / num_kv_heads > 64 || q_len < 1 || start_pos < 0 || kv_dtype < KV_F32
        || kv_dtype > KV_F16)
        return -2;
    int64_t used = (start_pos + q_len + block_size - 1) >> block_shift;
    if (used > bt_len || !blocks_in_range(table, used, num_blocks)) return -3;
    int64_t group = num_heads / num_kv_heads, token_len = num_kv_heads * d;
    int64_t tiles = (q_len + TQ - 1) / TQ, items = tiles * num_kv_heads;
    if (num_threads > items) num_threads = (int)items;
    if (num_threads < 1) num_threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* per thread: kt (d, TK), vt (TK, d), then sc (nq, TK), acc (nq, d), m and l (nq) */
        size_t nq = (size_t)(TQ * group), len = 2 * (size_t)d * TK + nq * (TK + d + 2);
        float *kt = aligned_alloc(64, sizeof(float) * ((len + 15) & ~(size_t)15));
        failed = kt == NULL;
        float *vt = kt + d * TK, *sc = vt + d * TK, *acc = sc + nq * TK, *m = acc + nq * d;
        float *l = m + nq;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = items - 1; it >= 0; it--) {
            if (!kt) continue;
            int64_t r0 = (it / num_kv_heads) * TQ, j = it % num_kv_heads;
            int64_t rows = q_len - r0 < TQ ? q_len - r0 : TQ;
            if (d == 64)  /* the common head size: its loops unrolled */
                chunk_item(q, q_stride, k_cache, v_cache, table, start_pos, r0, rows, j, group,
                           64, token_len, block_shift, scale, out, o_stride, kt, vt, sc, acc, m, l,
                           kv_dtype);
            else
                chunk_item(q, q_stride, k_cache, v_cache, table, start_pos, r0, rows, j, group,
                           d, token_len, block_shift, scale, out, o_stride, kt, vt, sc, acc, m, l,
                           kv_dtype);
        }
        free(kt);
    }
    return failed ? -1 : 0;
}
