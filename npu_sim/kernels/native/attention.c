/* Attention over the paged KV cache for the simulator's fast path: one query token per
 * sequence (decodes; prefill chunks are in attention_chunk.c). Keys and values are read
 * straight out of the cache through the block tables (no gather into a padded copy, no mask
 * tensor), and the work is shared among torch's OpenMP threads (see gemm.c). Compiled like
 * cpu_kernels.c (-ffp-contract=off), but both attention kernels opt back into fused
 * multiply-adds: attention never matched ATen bit for bit, and its tests allow fp32 rounding.
 * Softmax in fp32 with the row max subtracted.
 *
 * The cache holds fp32, bf16 or fp16 elements (kv_dtype: simd.h's KV_*); 16-bit elements are
 * widened to fp32 as they are loaded (a shift, or F16C's vcvtph2ps), so queries, scores,
 * softmax and the output stay fp32. A 16-bit cache halves the bytes of each key: the cache
 * holds twice the tokens, and a decode that streams it at the memory bound takes half the time
 * (on the 2-core Zen 2 these were written on, the decode is bound by its arithmetic instead:
 * 10-15% faster). One copy of each kernel per element type. A bf16 cache may take AMX tiles
 * instead (attention_amx.h, where the caller allows them).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_amx.h"
#include "exp_approx.h"
#include "paged.h"

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
 * flags: XY_ATTN_BF16_MATMUL lets a bf16 cache take AMX tiles where the CPU grants them, d is a
 * multiple of 32, blocks hold at least 16 slots and at most 16 query heads share a KV head
 * (attention_amx.h's decode_item_amx: Q and P split in two bf16 parts); else fp32 arithmetic.
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
                        float scale, int num_threads, int kv_dtype, int flags) {
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
#if XY_HAVE_AMX
    int64_t group = num_heads / num_kv_heads;
    if (group <= 16 && amx_attention_takes(flags, kv_dtype, d, block_shift)) {
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
        {
            uint32_t *scratch = thread_scratch(sizeof(uint32_t) * amx_decode_scratch(max_ctx, d));
            failed = scratch == NULL;
            _tile_loadconfig(&AMX_CONFIG);
#pragma omp for schedule(dynamic, 1)
            for (int64_t s = 0; s < num_seqs; s++) {
                if (!scratch) continue;
                for (int64_t j = 0; j < num_kv_heads; j++)
                    decode_item_amx(q + q_rows[s] * q_stride, k_cache, v_cache,
                                    block_tables + s * bt_stride, context_lens[s], j, group, d,
                                    token_len, block_shift, scale, out + q_rows[s] * o_stride,
                                    scratch);
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
        /* per thread: scores (num_heads, max_ctx), then acc and the query (num_heads, d) */
        int64_t scores_len = (num_heads * max_ctx + 15) & ~(int64_t)15;
        float *scores = thread_scratch(sizeof(float) * (size_t)(scores_len + 2 * num_heads * d));
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
    }
    return failed ? -1 : 0;
}
