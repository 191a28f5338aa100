/* fp32 CPU kernels for the simulator's fast path (loaded by npu_sim/kernels/native/__init__.py).
 *
 * Why: between two weight-streaming GEMMs of a decode step the CPU's caches hold little but
 * weights, and each small ATen op then pays tens of microseconds of cold dispatch and kernel code
 * (an RMSNorm is ~15 ATen calls). Each function here is one call doing one launch's whole work in
 * a small, tight loop; the attention reads keys and values straight out of the paged cache
 * (no gather into a padded copy) and shares the sequences among torch's OpenMP threads (see
 * gemm.c); the row-wise ops are too small to be worth a parallel region.
 *
 * Conventions: every tensor is fp32 with unit stride along its last dimension; row strides are in
 * elements. Built with -ffp-contract=off so a * b + c * d rounds as ATen's separate mul and add
 * do (RoPE and the KV write are bit-identical to the ATen path; RMSNorm and SiLU sum in another
 * order and use exp_approx, within a few fp32 ulps of it). The attention opts back into fused
 * multiply-adds: it never matched ATen bit for bit, and its tests allow fp32 rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) in fp32 within ~1 ulp where softmax and SiLU use it; vectorisable (no libm call).
 * exp(x) = 2^n 2^f with n = round(x log2 e) and f in [-0.5, 0.5]; 2^f by its degree-7 Taylor
 * polynomial (truncation error < 1e-8). Adding and subtracting 1.5 * 2^23 rounds to nearest. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f;
    float f = t - n;
    float p = 1.5252734e-5f;
    p = p * f + 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* out[r] = weight * (h * rsqrt(mean(h^2) + eps)) with h = residual[r] (+= x[r] first when
 * x != NULL), as transformers' LlamaRMSNorm in fp32. */
void xy_add_rmsnorm(const float *x, int64_t x_stride, float *residual, int64_t r_stride,
                    const float *weight, float *out, int64_t o_stride, int64_t rows,
                    int64_t hidden, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *h = residual + r * r_stride;
        if (x) {
            const float *xr = x + r * x_stride;
#pragma omp simd
            for (int64_t i = 0; i < hidden; i++) h[i] += xr[i];
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) sum += h[i] * h[i];
        float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        float *o = out + r * o_stride;
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) o[i] = weight[i] * (h[i] * inv);
    }
}

/* out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]. */
void xy_silu_mul(const float *gate_up, int64_t g_stride, float *out, int64_t o_stride,
                 int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * g_stride, *u = g + inter;
        float *o = out + r * o_stride;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
    }
}

/* Rotate num_heads heads of head_dim d per row in place (non-interleaved halves, as Llama):
 * t1' = t1 cos1 - t2 sin1, t2' = t2 cos2 + t1 sin2, with cos / sin rows of length d. */
void xy_rope(float *t, int64_t row_stride, int64_t head_stride, int64_t num_heads,
             const float *cos_, const float *sin_, int64_t cs_stride, int64_t rows, int64_t d) {
    int64_t half = d / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_ + r * cs_stride, *s = sin_ + r * cs_stride;
        for (int64_t h = 0; h < num_heads; h++) {
            float *a = t + r * row_stride + h * head_stride, *b = a + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] + x2 * (-s[i]);
                b[i] = x2 * c[half + i] + x1 * s[half + i];
            }
        }
    }
}

/* Copy each row's k and v (row_len contiguous elements) to cache slot slots[r] of num_slots.
 * Returns 0, or -3 (nothing written) when a slot is out of range. */
int xy_kv_write(const float *k, const float *v, int64_t kv_stride, float *k_cache,
                float *v_cache, int64_t num_slots, const int64_t *slots, int64_t rows,
                int64_t row_len) {
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return -3;
    for (int64_t r = 0; r < rows; r++) {
        memcpy(k_cache + slots[r] * row_len, k + r * kv_stride, row_len * sizeof(float));
        memcpy(v_cache + slots[r] * row_len, v + r * kv_stride, row_len * sizeof(float));
    }
    return 0;
}

/* 8 fp32 lanes (GCC vector extension: AVX / SSE / NEON as the target has); `vf_u` is the same
 * vector read from or written to memory with only float alignment. */
typedef float vf __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(32), aligned(4)));
#define VF_LANES 8

static inline float hsum(vf v) {  /* pairwise, by shuffles: lanes are never read one by one */
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
}

/* The cache slot of position p: its block from the table, its offset in the block. The block
 * size is a power of two (shift and mask, not a 64-bit division per key). */
static inline const float *slot(const float *cache, const int64_t *table, int64_t p,
                                int64_t block_shift, int64_t token_len) {
    int64_t mask = ((int64_t)1 << block_shift) - 1;
    return cache + ((table[p >> block_shift] << block_shift) + (p & mask)) * token_len;
}

/* Sequence s's attention for one query row: qv (num_heads, d) against keys [0, ctx) through its
 * block table; scores (num_heads, ctx) and acc (num_heads, d) are scratch. */
static inline __attribute__((always_inline)) void attend(
    const vf *qv, const float *k_cache, const float *v_cache, const int64_t *table, int64_t ctx,
    float *os, float *scores, vf *acc, const int16_t *head_kv, int64_t num_heads, int64_t d,
    int64_t token_len, int64_t block_shift, float scale) {
    int64_t nv = d / VF_LANES, block_size = (int64_t)1 << block_shift;
    for (int64_t p = 0; p < ctx; p++) {
        const float *key = slot(k_cache, table, p, block_shift, token_len);
        /* Blocks are scattered: fetch the keys a block ahead, into L2 (into L1, with the values
         * fetched here too, the prefetches filled the miss buffers and stalled: 1.6x slower at
         * 1000 keys). The values are fetched the same way in their own pass below. */
        if (p + block_size < ctx) {
            const float *ahead = slot(k_cache, table, p + block_size, block_shift, token_len);
            for (int64_t i = 0; i < token_len; i += 16) __builtin_prefetch(ahead + i, 0, 2);
        }
        for (int64_t h = 0; h < num_heads; h++) {
            const float *kh = key + head_kv[h] * d;
            const vf *qh = qv + h * nv;
            vf dot = qh[0] * *(const vf_u *)kh;
            for (int64_t c = 1; c < nv; c++) dot += qh[c] * *(const vf_u *)(kh + c * VF_LANES);
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
    for (int64_t p = 0; p < ctx; p++) {
        const float *val = slot(v_cache, table, p, block_shift, token_len);
        if (p + block_size < ctx) {
            const float *ahead = slot(v_cache, table, p + block_size, block_shift, token_len);
            for (int64_t i = 0; i < token_len; i += 16) __builtin_prefetch(ahead + i, 0, 2);
        }
        for (int64_t h = 0; h < num_heads; h++) {
            const float *vh = val + head_kv[h] * d;
            vf w = {0};
            w += scores[h * ctx + p];
            vf *a = acc + h * nv;
            for (int64_t c = 0; c < nv; c++) a[c] += w * *(const vf_u *)(vh + c * VF_LANES);
        }
    }
    for (int64_t i = 0; i < num_heads * nv; i++) *(vf_u *)(os + i * VF_LANES) = acc[i];
}

/* One query token per sequence against its whole context, read from the paged cache.
 *
 * q: rows of num_heads * d (query heads j * G .. j * G + G - 1 share KV head j); sequence s
 * reads q row q_rows[s] and writes the same row of out. Cache: (num_blocks, block_size,
 * num_kv_heads, d); sequence s's key at position p is in block block_tables[s * bt_stride +
 * p / block_size], offset p % block_size, and it sees positions [0, context_lens[s]).
 * Keys and values are read slot by slot, each slot (all KV heads) once and in order. Softmax in
 * fp32 with the row max subtracted. Sequences are shared among up to num_threads OpenMP threads
 * (torch's, see gemm.c). d must be a multiple of 8 and block_size a power of two; at most 1024
 * query heads; every context is >= 1 token and every block it reaches in [0, num_blocks).
 * Returns 0, -1 when out of memory, -2 for an unsupported shape, -3 (nothing written) for a
 * context past its table or a block out of range. */
/* (fp-contract on this function, not on `attend`: an inlined callee's optimize attribute gives
 * way to its caller's, and the OpenMP body outlined from here inherits this one) */
__attribute__((optimize("fp-contract=fast")))
int xy_decode_attention(const float *q, int64_t q_stride, const float *k_cache,
                        const float *v_cache, const int64_t *block_tables, int64_t bt_stride,
                        const int64_t *context_lens, const int64_t *q_rows, float *out,
                        int64_t o_stride, int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t d, int64_t num_blocks, int64_t block_size,
                        float scale, int num_threads) {
    int64_t block_shift = 0;
    while (((int64_t)1 << block_shift) < block_size) block_shift++;
    if (d % VF_LANES || ((int64_t)1 << block_shift) != block_size || num_heads > 1024) return -2;
    int16_t head_kv[1024];  /* the KV head of each query head */
    for (int64_t h = 0; h < num_heads; h++) head_kv[h] = (int16_t)(h / (num_heads / num_kv_heads));
    int64_t max_ctx = 0, token_len = num_kv_heads * d;  /* one cache slot */
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t ctx = context_lens[s], used = (ctx + block_size - 1) >> block_shift;
        if (ctx < 1 || used > bt_stride) return -3;
        for (int64_t b = 0; b < used; b++)
            if (block_tables[s * bt_stride + b] < 0 || block_tables[s * bt_stride + b] >= num_blocks)
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
            /* a copy for the common head size, its per-head loops unrolled (~10% at 90 keys) */
            if (d == 64)
                attend(qv, k_cache, v_cache, table, context_lens[s], os, scores, acc, head_kv,
                       num_heads, 64, token_len, block_shift, scale);
            else
                attend(qv, k_cache, v_cache, table, context_lens[s], os, scores, acc, head_kv,
                       num_heads, d, token_len, block_shift, scale);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
