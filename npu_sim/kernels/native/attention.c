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

/* Keys [p0, p1) of sequence s's attention for one query row: qv (num_heads, d) against them
 * through its block table; scores (num_heads, p1 - p0) and acc (num_heads, d) are scratch.
 * part NULL (the keys are the whole context): the attention into os. Else the keys' partial
 * sums into part (part_floats): acc (num_heads, d) = sum of exp(score - m) v, then m
 * (num_heads) the largest score and l (num_heads) the sum of exp(score - m), each head's. */
static inline __attribute__((always_inline)) void attend(
    const vf *qv, const void *k_cache, const void *v_cache, const int64_t *table, int64_t p0,
    int64_t p1, float *os, float *part, float *scores, vf *acc, const int16_t *head_kv,
    int64_t num_heads, int64_t d, int64_t token_len, int64_t block_shift, float scale, int dt) {
    int64_t nv = d / VF_LANES, len = p1 - p0;
    for (int64_t p = p0; p < p1; p++) {  /* scores: keys slot by slot */
        int64_t key = slot(table, p, block_shift, token_len);
        prefetch_block_ahead(k_cache, table, p, p1, block_shift, token_len, dt);
        for (int64_t h = 0; h < num_heads; h++) {
            int64_t kh = key + head_kv[h] * d;
            const vf *qh = qv + h * nv;
            vf dot = qh[0] * kv_load8(k_cache, kh, dt);
            for (int64_t c = 1; c < nv; c++) dot += qh[c] * kv_load8(k_cache, kh + c * VF_LANES, dt);
            scores[h * len + p - p0] = hsum(dot) * scale;
        }
    }
    for (int64_t h = 0; h < num_heads; h++) {
        float *sh = scores + h * len, m = sh[0], l = 0.0f;
        for (int64_t p = 1; p < len; p++) m = sh[p] > m ? sh[p] : m;
#pragma omp simd reduction(+ : l)
        for (int64_t p = 0; p < len; p++) {
            sh[p] = exp_approx(sh[p] - m);
            l += sh[p];
        }
        if (part) {  /* the weights stay as they are: merge_parts scales every part's */
            part[num_heads * d + h] = m;
            part[num_heads * (d + 1) + h] = l;
            continue;
        }
        float inv = 1.0f / l;
#pragma omp simd
        for (int64_t p = 0; p < len; p++) sh[p] *= inv;
    }
    memset(acc, 0, sizeof(vf) * (size_t)(num_heads * nv));
    for (int64_t p = p0; p < p1; p++) {  /* output: values slot by slot, in their own pass */
        int64_t val = slot(table, p, block_shift, token_len);
        prefetch_block_ahead(v_cache, table, p, p1, block_shift, token_len, dt);
        for (int64_t h = 0; h < num_heads; h++) {
            int64_t vh = val + head_kv[h] * d;
            vf w = bcast8(scores[h * len + p - p0]);
            vf *a = acc + h * nv;
            for (int64_t c = 0; c < nv; c++) a[c] += w * kv_load8(v_cache, vh + c * VF_LANES, dt);
        }
    }
    float *dst = part ? part : os;
    for (int64_t i = 0; i < num_heads * nv; i++) *(vf_u *)(dst + i * VF_LANES) = acc[i];
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

/* Keys a part of a long decode covers: a context of more keys is attended in parts of that
 * many (the last one shorter), each a work item of its own, and their partial sums merged in
 * part order (merge_parts). A lone stream's long context then runs on every thread, where one
 * thread attended to it all (the default model on a 2-core Xeon, fp32 arithmetic: a lone
 * stream's token at 1,000 keys 10.2-10.4 -> 8.8 ms, at 4,000 20.7-21.7 -> 14.8-15.1 ms), and a
 * few long streams share the threads evenly (AMX: 3 streams of 4,000 keys 26.4 -> 18.7 ms a
 * step's attention). The parts depend on the context alone, so the numbers do not depend on
 * the thread count; a context of up to a part's keys is attended whole, as before. The AMX
 * kernel's parts are longer: each pays its query tiles again and starts without the keys
 * fetched ahead (256-key parts cost 16 streams of 1,000 keys 10%). Multiples of its 32-key
 * tiles. */
#define PART_KEYS 256
#define AMX_PART_KEYS 1024

static inline int64_t part_keys(int amx) { return amx ? AMX_PART_KEYS : PART_KEYS; }

static inline int64_t parts_of(int64_t ctx, int amx) {
    int64_t keys = part_keys(amx);
    return ctx <= keys ? 1 : (ctx + keys - 1) / keys;
}

/* The keys [*p0, *p1) of part c of a decode over ctx keys. */
static inline void part_range(int64_t ctx, int64_t c, int amx, int64_t *p0, int64_t *p1) {
    int64_t keys = part_keys(amx);
    *p0 = c * keys;
    *p1 = ctx - *p0 < keys ? ctx : *p0 + keys;
}

/* Floats of one part's partial sums (attend's `part`) */
static inline int64_t part_floats(int64_t num_heads, int64_t d) { return num_heads * (d + 2); }

/* Bytes of a thread's scratch for decode_part over contexts of up to max_ctx keys: AMX's
 * (amx_decode_scratch), or scores of up to PART_KEYS keys, acc and q. */
static inline size_t part_scratch(int amx, int64_t max_ctx, int64_t num_heads, int64_t d) {
#if XY_HAVE_AMX
    if (amx) return sizeof(uint32_t) * amx_decode_scratch(max_ctx < AMX_PART_KEYS
                                                          ? max_ctx : AMX_PART_KEYS, d);
#else
    (void)amx, (void)max_ctx;
#endif
    return sizeof(float) * (size_t)(((num_heads * PART_KEYS + 15) & ~(int64_t)15)
                                    + 2 * num_heads * d);
}

/* Part c of one query row's decode over ctx keys: the attention into orow when the context is
 * one part, else the part's partial sums into partial; on AMX tiles (amx: a bf16 cache, the
 * calling thread's tile configuration loaded) or in fp32 arithmetic. */
__attribute__((optimize("fp-contract=fast")))
static void decode_part(int amx, const float *qrow, const void *k_cache, const void *v_cache,
                        const int64_t *table, int64_t ctx, int64_t c, float *orow, float *partial,
                        const int16_t *head_kv, int64_t num_heads, int64_t num_kv_heads,
                        int64_t d, int64_t block_shift, float scale, int kv_dtype,
                        void *scratch) {
    int64_t p0, p1, token_len = num_kv_heads * d;
    part_range(ctx, c, amx, &p0, &p1);  /* (one part: [0, ctx)) */
    float *part = parts_of(ctx, amx) == 1 ? NULL : partial;
#if XY_HAVE_AMX
    if (amx) {
        for (int64_t j = 0; j < num_kv_heads; j++)
            decode_item_amx(qrow, k_cache, v_cache, table, p0, p1, j, num_heads / num_kv_heads,
                            num_heads, d, token_len, block_shift, scale, orow, part, scratch);
        return;
    }
#else
    (void)amx;
#endif
    float *scores = scratch;
    vf *acc = (vf *)(scores + ((num_heads * PART_KEYS + 15) & ~(int64_t)15));
    vf *qv = acc + num_heads * (d / VF_LANES);
    for (int64_t i = 0; i < num_heads * d / VF_LANES; i++)
        qv[i] = *(const vf_u *)(qrow + i * VF_LANES);
    ATTEND_COPIES(qv, k_cache, v_cache, table, p0, p1, orow, part, scores, acc, head_kv,
                  num_heads)
}

/* A row's attention from its parts' partial sums (num_parts of part_floats, in part order):
 * per head, with m the largest of the parts' maxima, the sum of their acc times exp(m_c - m)
 * over the sum of their l times the same. */
static void merge_parts(const float *parts, int64_t num_parts, int64_t num_heads, int64_t d,
                        float *orow) {
    int64_t len = part_floats(num_heads, d);
    for (int64_t h = 0; h < num_heads; h++) {
        const float *first = parts + num_heads * d + h;  /* part 0's m; its l num_heads on */
        float m = first[0], l = 0.0f, *o = orow + h * d;
        for (int64_t c = 1; c < num_parts; c++) m = first[c * len] > m ? first[c * len] : m;
        for (int64_t x = 0; x < d; x++) o[x] = 0.0f;
        for (int64_t c = 0; c < num_parts; c++) {
            float w = exp_approx(first[c * len] - m);
            const float *a = parts + c * len + h * d;
            l += first[c * len + num_heads] * w;
#pragma omp simd
            for (int64_t x = 0; x < d; x++) o[x] += a[x] * w;
        }
        float inv = 1.0f / l;
#pragma omp simd
        for (int64_t x = 0; x < d; x++) o[x] *= inv;
    }
}

/* Whether the decode kernels take operands of this shape: d a multiple of 8, a power-of-two
 * block, at most 1024 query heads, a cache element type of simd.h's. */
static int decode_shape_ok(int64_t d, int64_t block_shift, int64_t num_heads, int kv_dtype) {
    return d % VF_LANES == 0 && block_shift >= 0 && num_heads <= 1024 && kv_dtype >= KV_F32
           && kv_dtype <= KV_F16;
}

/* The KV head of each query head into head_kv (num_heads of them, at most 1024). */
static void heads_kv(int64_t num_heads, int64_t num_kv_heads, int16_t *head_kv) {
    for (int64_t h = 0; h < num_heads; h++) head_kv[h] = (int16_t)(h / (num_heads / num_kv_heads));
}

/* Whether decodes with these operands take AMX tiles rather than fp32 arithmetic. */
static int decodes_on_amx(int flags, int kv_dtype, int64_t d, int64_t block_shift,
                          int64_t num_heads, int64_t num_kv_heads) {
#if XY_HAVE_AMX
    return num_heads / num_kv_heads <= 16
           && amx_attention_takes(flags, kv_dtype, d, block_shift);
#else
    (void)flags, (void)kv_dtype, (void)d, (void)block_shift, (void)num_heads, (void)num_kv_heads;
    return 0;
#endif
}

/* For a caller that runs its own parallel region (decoder.c), xy_decode_attention's decode
 * of one row in its pieces: xy_decode_parts, the parts a decode of ctx keys takes with these
 * operands (1: it is attended in one piece, by xy_decode_attention); xy_decode_part, part c of
 * one decode of more (a row of q and its block table of bt_len entries; xy_decode_attention's
 * other operands) into `partial` (part_floats(num_heads, d) floats) on the calling thread: 0,
 * -1 when out of memory, -2 / -3 as xy_decode_attention; xy_decode_merge, the row's attention
 * from its parts. */
int64_t xy_decode_parts(int64_t ctx, int flags, int kv_dtype, int64_t d, int64_t block_size,
                        int64_t num_heads, int64_t num_kv_heads) {
    return parts_of(ctx, decodes_on_amx(flags, kv_dtype, d, block_shift_of(block_size),
                                        num_heads, num_kv_heads));
}

int xy_decode_part(const float *qrow, const void *k_cache, const void *v_cache,
                   const int64_t *table, int64_t bt_len, int64_t ctx, int64_t c, float *partial,
                   int64_t num_heads, int64_t num_kv_heads, int64_t d, int64_t num_blocks,
                   int64_t block_size, float scale, int kv_dtype, int flags) {
    int64_t block_shift = block_shift_of(block_size);
    if (!decode_shape_ok(d, block_shift, num_heads, kv_dtype)) return -2;
    int amx = decodes_on_amx(flags, kv_dtype, d, block_shift, num_heads, num_kv_heads);
    if (parts_of(ctx, amx) < 2 || c < 0 || c >= parts_of(ctx, amx)) return -2;
    /* the part's own blocks: a decode's parts check each of its blocks once between them */
    int64_t p0, p1;
    part_range(ctx, c, amx, &p0, &p1);
    int64_t b0 = p0 >> block_shift, b1 = (p1 + block_size - 1) >> block_shift;
    if (b1 > bt_len || !blocks_in_range(table + b0, b1 - b0, num_blocks)) return -3;
    int16_t head_kv[1024];
    heads_kv(num_heads, num_kv_heads, head_kv);
    void *scratch = thread_scratch(part_scratch(amx, ctx, num_heads, d));
    if (!scratch) return -1;
#if XY_HAVE_AMX
    if (amx) _tile_loadconfig(&AMX_CONFIG);
#endif
    decode_part(amx, qrow, k_cache, v_cache, table, ctx, c, NULL, partial, head_kv, num_heads,
                num_kv_heads, d, block_shift, scale, kv_dtype, scratch);
#if XY_HAVE_AMX
    if (amx) _tile_release();
#endif
    return 0;
}

void xy_decode_merge(const float *partials, int64_t num_parts, int64_t num_heads, int64_t d,
                     float *orow) {
    merge_parts(partials, num_parts, num_heads, d, orow);
}

/* One query token per sequence against its whole context, read from the paged cache.
 *
 * q: rows of num_heads * d (query heads j * G .. j * G + G - 1 share KV head j); sequence s
 * reads q row q_rows[s] and writes the same row of out. Cache: (num_blocks, block_size,
 * num_kv_heads, d); sequence s's key at position p is in block block_tables[s * bt_stride +
 * p / block_size], offset p % block_size, and it sees positions [0, context_lens[s]).
 * Keys and values are read slot by slot, each slot (all KV heads) once and in order, the
 * cache's elements of type kv_dtype (KV_F32, KV_BF16, KV_F16). Softmax in fp32 with the row
 * max subtracted. Sequences, and the parts of long ones (PART_KEYS), are shared among up to
 * num_threads OpenMP threads (torch's, see gemm.c). d must be a multiple
 * of 8 and block_size a power of two; at most 1024 query heads; every context is >= 1 token
 * and every block it reaches in [0, num_blocks).
 * flags: XY_ATTN_BF16_MATMUL lets a bf16 cache take AMX tiles where the CPU grants them, d is a
 * multiple of 32, blocks hold at least 16 slots and at most 16 query heads share a KV head
 * (attention_amx.h's decode_item_amx: Q and P split in two bf16 parts); else fp32 arithmetic.
 * Returns 0, -1 when out of memory, -2 for an unsupported shape, -3 (nothing written) for a
 * context past its table or a block out of range. */
/* (fp-contract on this function and on decode_part, not on `attend`: an inlined callee's
 * optimize attribute gives way to its caller's, and the OpenMP body outlined from here inherits
 * this one) */
__attribute__((optimize("fp-contract=fast")))
int xy_decode_attention(const float *q, int64_t q_stride, const void *k_cache,
                        const void *v_cache, const int64_t *block_tables, int64_t bt_stride,
                        const int64_t *context_lens, const int64_t *q_rows, float *out,
                        int64_t o_stride, int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t d, int64_t num_blocks, int64_t block_size,
                        float scale, int num_threads, int kv_dtype, int flags) {
    int64_t block_shift = block_shift_of(block_size);
    if (!decode_shape_ok(d, block_shift, num_heads, kv_dtype)) return -2;
    int16_t head_kv[1024];  /* the KV head of each query head */
    heads_kv(num_heads, num_kv_heads, head_kv);
    int64_t max_ctx = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t ctx = context_lens[s], used = (ctx + block_size - 1) >> block_shift;
        if (ctx < 1 || used > bt_stride
            || !blocks_in_range(block_tables + s * bt_stride, used, num_blocks))
            return -3;
        if (ctx > max_ctx) max_ctx = ctx;
    }
    /* a work item per part of a sequence (one for a context of up to a part's keys) */
    int amx = decodes_on_amx(flags, kv_dtype, d, block_shift, num_heads, num_kv_heads);
    int64_t num_items = 0, num_partials = 0, pf = part_floats(num_heads, d);
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t n = parts_of(context_lens[s], amx);
        num_items += n;
        num_partials += n > 1 ? n : 0;
    }
    /* Where some are split, item i is part i - first_item[s] of sequence s = item_seq[i], its
     * partial sums from partials + first_partial[s] * pf; else item i is sequence i, whole. */
    int64_t *index = NULL, *item_seq = NULL, *first_item = NULL, *first_partial = NULL;
    float *partials = NULL;
    if (num_partials) {
        index = malloc(sizeof(int64_t) * (size_t)(num_items + 2 * num_seqs));
        partials = malloc(sizeof(float) * (size_t)(num_partials * pf));
        if (!index || !partials) {
            free(index);
            free(partials);
            return -1;
        }
        item_seq = index;
        first_item = item_seq + num_items;
        first_partial = first_item + num_seqs;
        for (int64_t s = 0, i = 0, next = 0; s < num_seqs; s++) {
            int64_t n = parts_of(context_lens[s], amx);
            first_item[s] = i;
            first_partial[s] = next;
            for (int64_t c = 0; c < n; c++) item_seq[i++] = s;
            next += n > 1 ? n : 0;
        }
    }
    if (num_threads > num_items) num_threads = (int)num_items;
    if (num_threads < 1) num_threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        void *scratch = thread_scratch(part_scratch(amx, max_ctx, num_heads, d));
        failed = scratch == NULL;
#if XY_HAVE_AMX
        if (amx) _tile_loadconfig(&AMX_CONFIG);
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < num_items; i++) {
            if (!scratch) continue;
            int64_t s = item_seq ? item_seq[i] : i, c = item_seq ? i - first_item[s] : 0;
            decode_part(amx, q + q_rows[s] * q_stride, k_cache, v_cache,
                        block_tables + s * bt_stride, context_lens[s], c,
                        out + q_rows[s] * o_stride,
                        partials ? partials + (first_partial[s] + c) * pf : NULL, head_kv,
                        num_heads, num_kv_heads, d, block_shift, scale, kv_dtype, scratch);
        }
#if XY_HAVE_AMX
        if (amx) _tile_release();
#endif
        if (partials) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t s = 0; s < num_seqs; s++)
                if (parts_of(context_lens[s], amx) > 1)
                    merge_parts(partials + first_partial[s] * pf, parts_of(context_lens[s], amx),
                                num_heads, d, out + q_rows[s] * o_stride);
        }
    }
    free(index);
    free(partials);
    return failed ? -1 : 0;
}
