/* fp32 CPU kernels for the simulator's fast path (loaded by npu_sim/kernels/native/__init__.py).
 *
 * Why: between two weight-streaming GEMMs of a decode step the CPU's caches hold little but
 * weights, and each small ATen op then pays tens of microseconds of cold dispatch and kernel code
 * (an RMSNorm is ~15 ATen calls). Each function here is one call doing one launch's whole work in
 * a small, tight loop, too small to be worth a parallel region (the attention is in
 * attention.c, the GEMM in gemm.c).
 *
 * Conventions: every tensor is fp32 with unit stride along its last dimension; row strides are in
 * elements. Built with -ffp-contract=off so a * b + c * d rounds as ATen's separate mul and add
 * do (RoPE and the KV write are bit-identical to the ATen path; RMSNorm and SiLU sum in another
 * order and use exp_approx, within a few fp32 ulps of it).
 */
#define _GNU_SOURCE  /* sched_setaffinity and the CPU_* macros */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_approx.h"
#include "simd.h"

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

/* out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i], in chunks of 256: the exponentials
 * first, then the divisions (one loop doing both ran 3.4x slower on Zen 2: GCC split it at
 * exp_approx's clamp into blended copies with two divisions per element). */
void xy_silu_mul(const float *gate_up, int64_t g_stride, float *out, int64_t o_stride,
                 int64_t rows, int64_t inter) {
    float e[256];
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * g_stride, *u = g + inter;
        float *o = out + r * o_stride;
        for (int64_t i0 = 0; i0 < inter; i0 += 256) {
            int64_t n = inter - i0 < 256 ? inter - i0 : 256;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) e[i] = exp_approx(-g[i0 + i]);
#pragma omp simd
            for (int64_t i = 0; i < n; i++) o[i0 + i] = g[i0 + i] / (1.0f + e[i]) * u[i0 + i];
        }
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

/* n fp32 elements to a cache row of type dt (simd.h's KV_*), rounded to nearest even. */
static void put_row(void *dst, const float *src, int64_t n, int dt) {
    if (dt == KV_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *d16 = dst;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (dt == KV_BF16)
            store_bf16x8(d16 + i, load8(src + i));
        else
            store_halves8(d16 + i, load8(src + i));
    }
    for (; i < n; i++) d16[i] = dt == KV_BF16 ? float_to_bf16(src[i]) : float_to_half(src[i]);
}

/* Copy each row's k and v (row_len contiguous fp32 elements) to cache slot slots[r] of
 * num_slots, as the caches' element type kv_dtype (KV_F32, KV_BF16, KV_F16). Returns 0, -2 for
 * another type, or -3 (nothing written) when a slot is out of range. */
int xy_kv_write(const float *k, const float *v, int64_t kv_stride, void *k_cache, void *v_cache,
                int64_t num_slots, const int64_t *slots, int64_t rows, int64_t row_len,
                int kv_dtype) {
    if (kv_dtype < KV_F32 || kv_dtype > KV_F16) return -2;
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return -3;
    int64_t bytes = row_len * kv_size(kv_dtype);
    for (int64_t r = 0; r < rows; r++) {
        put_row((char *)k_cache + slots[r] * bytes, k + r * kv_stride, row_len, kv_dtype);
        put_row((char *)v_cache + slots[r] * bytes, v + r * kv_stride, row_len, kv_dtype);
    }
    return 0;
}

/* The first maximum of row[0, cols) as torch.argmax finds it: a NaN counts as the maximum. One
 * pass keeps, per lane of four 8-lane vectors, the largest value seen and the index where it
 * first appeared (a lane moves only on a strictly larger value), then the lanes' ties go to the
 * smallest index. */
static int64_t argmax_row(const float *row, int64_t cols) {
    int64_t i = 0;
    float best = row[0];
    int64_t at = 0;
    v8i unordered = {0};
    if (cols >= 32) {
        v8 m[4];
        v8i idx[4], step = {32, 32, 32, 32, 32, 32, 32, 32};
        v8i pos[4];
        for (int j = 0; j < 4; j++) {
            m[j] = load8(row + 8 * j);
            for (int l = 0; l < 8; l++) pos[j][l] = idx[j][l] = 8 * j + l;
        }
        for (i = 32; i + 32 <= cols; i += 32)
            for (int j = 0; j < 4; j++) {
                pos[j] += step;
                v8 a = load8(row + i + 8 * j);
                v8i gt = a > m[j];
                unordered |= a != a;
                m[j] = (v8)((gt & (v8i)a) | (~gt & (v8i)m[j]));
                idx[j] = (gt & pos[j]) | (~gt & idx[j]);
            }
        for (int j = 0; j < 4; j++) {
            unordered |= m[j] != m[j];  /* (a NaN in the first vectors) */
            for (int l = 0; l < 8; l++)
                if (m[j][l] > best || (m[j][l] == best && idx[j][l] < at))
                    best = m[j][l], at = idx[j][l];
        }
    }
    int nan = 0;
    for (int l = 0; l < 8; l++) nan |= unordered[l] != 0;
    for (; i < cols && !nan; i++) {  /* the tail (or a short row) */
        if (row[i] != row[i]) nan = 1;
        else if (row[i] > best) best = row[i], at = i;
    }
    if (nan || best != best)  /* rare: the first NaN is the answer */
        for (at = 0; row[at] == row[at]; at++) {}
    return at;
}

/* out[r] = argmax_row of row r of x (rows, cols), row stride `stride`. Why: ATen's argmax does
 * not vectorise (0.55 ms for 16 rows of a 49k vocabulary, against 40 us for amax), on the
 * critical path of every greedy decode step. */
void xy_argmax_rows(const float *x, int64_t stride, int64_t rows, int64_t cols, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, cols);
}

/* Pin the calling thread's OpenMP team of num_threads threads, thread i to the i-th CPU the
 * calling thread may run on, where those CPUs are exactly num_threads (the engine's default:
 * a thread per usable core); else nothing is pinned. Unpinned, a step after an idle spell could
 * find the engine thread and its worker woken onto one core, the other idle, until the
 * scheduler moved one (a 15-token prefill served 36-81 ms after idle, 33-52 pinned, on the
 * 2-core VM). Returns 0 when pinned, 1 when the CPUs are not one per thread, -1 when the
 * kernel refused. */
int xy_pin_team(int num_threads) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed)) return -1;
    if (num_threads < 1 || CPU_COUNT(&allowed) != num_threads) return 1;
    int cpus[CPU_SETSIZE], n = 0;
    for (int i = 0; i < CPU_SETSIZE; i++)
        if (CPU_ISSET(i, &allowed)) cpus[n++] = i;
    int refused = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : refused)
    {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpus[omp_get_thread_num()], &one);
        refused |= sched_setaffinity(0, sizeof one, &one) != 0;
    }
    return refused ? -1 : 0;
}
