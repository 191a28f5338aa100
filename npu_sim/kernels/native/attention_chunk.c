/* Attention of a prefill chunk over the paged KV cache (fp32, bf16 or fp16 elements, widened as
 * a key tile is loaded; fp32 arithmetic), flash style: 16 query rows x one KV head's query
 * heads per work item, 16-key tiles with online softmax, straight from the cache through the
 * block table (no gather, no mask). Compiled like attention.c (see there for the conventions;
 * the decodes of one query token each are there). On a bf16 cache the same work items may run
 * on AMX tiles instead (attention_amx.h, where the caller allows them).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_amx.h"
#include "exp_approx.h"
#include "paged.h"

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
 * OpenMP threads, the latest rows (the most keys) first. flags: XY_ATTN_BF16_MATMUL lets a bf16
 * cache take AMX tiles where the CPU grants them, d is a multiple of 32 and blocks hold at
 * least 16 slots (attention_amx.h: Q and P split in two bf16 parts); else fp32 arithmetic.
 * d must be a multiple of 16 up to 256, at most 64 query heads share a KV head, and block_size
 * is a power of two. Returns 0, -1 when out of memory, -2 for an unsupported shape, -3 (nothing
 * written) when the chunk reaches past its table or a block is out of range. */
__attribute__((optimize("fp-contract=fast")))
int xy_chunk_attention(const float *q, int64_t q_stride, const void *k_cache,
                       const void *v_cache, const int64_t *table, int64_t bt_len,
                       int64_t start_pos, int64_t q_len, float *out, int64_t o_stride,
                       int64_t num_heads, int64_t num_kv_heads, int64_t d, int64_t num_blocks,
                       int64_t block_size, float scale, int num_threads, int kv_dtype,
                       int flags) {
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
#if XY_HAVE_AMX
    if (amx_attention_takes(flags, kv_dtype, d, block_shift)) {
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
        {
            uint32_t *scratch = thread_scratch(sizeof(uint32_t) * amx_item_scratch(TQ * group, d));
            failed = scratch == NULL;
            _tile_loadconfig(&AMX_CONFIG);
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = items - 1; it >= 0; it--) {
                if (!scratch) continue;
                int64_t r0 = (it / num_kv_heads) * TQ, j = it % num_kv_heads;
                int64_t rows = q_len - r0 < TQ ? q_len - r0 : TQ;
                chunk_item_amx(q, q_stride, k_cache, v_cache, table, start_pos, r0, rows, j, group,
                               d, token_len, block_shift, scale, out, o_stride, scratch);
            }
            _tile_release();
        }
        return failed ? -1 : 0;
    }
#else
    (void)flags;
#endif
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* per thread: kt (d, TK), vt (TK, d), then sc (nq, TK), acc (nq, d), m and l (nq) */
        size_t nq = (size_t)(TQ * group), len = 2 * (size_t)d * TK + nq * (TK + d + 2);
        float *kt = thread_scratch(sizeof(float) * ((len + 15) & ~(size_t)15));
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
    }
    return failed ? -1 : 0;
}

/* Whether the AMX paths run in this process: compiled in (-march=native on a CPU with AMX) and
 * granted by the kernel (amx.h). */
int xy_amx_granted(void) {
#if XY_HAVE_AMX
    return amx_ready();
#else
    return 0;
#endif
}
