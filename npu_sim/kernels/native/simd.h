/* 8-lane fp32 vectors (GCC vector extensions: AVX2 ymm under -march=native on x86) and the
 * narrow loads and stores the kernels share: fp16 / bf16 / int8 lanes widened to fp32 and fp32
 * rounded to fp16 / bf16. Intrinsics where the build has AVX2 / F16C (GCC 12 scalarises vector
 * conversions between narrow and wide lanes), plain loops elsewhere. Rounding is to nearest,
 * ties to even, as torch's .to(torch.bfloat16) and .to(torch.float16) round. */
#ifndef XY_SIMD_H
#define XY_SIMD_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8_u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint32_t v8u_u __attribute__((vector_size(32), aligned(4)));

#define AI __attribute__((always_inline))

/* The calling thread's scratch of at least `bytes`, 64-byte aligned, kept for its next call;
 * NULL when out of memory (one buffer per thread and per translation unit: a caller is done
 * with it before its next call). A decode step's kernels want scratch a few hundred times a
 * thread: a malloc and free each time cost ~1.5 ms a batch-1 step in a server's engine thread
 * (measured). Kept while the thread lives (torch's OpenMP workers and
 * the engine's thread live as long as the process). */
static inline void *thread_scratch(size_t bytes) {
    static __thread void *buf;
    static __thread size_t cap;
    if (bytes > cap) {
        free(buf);
        cap = (bytes + 65535) & ~(size_t)65535;
        buf = aligned_alloc(64, cap);
        if (!buf) cap = 0;
    }
    return buf;
}

static inline AI v8 load8(const float *p) { return *(const v8_u *)p; }
static inline AI v8 bcast8(float f) { return (v8){f, f, f, f, f, f, f, f}; }
static inline AI v8 to_float(v8i v) { return __builtin_convertvector(v, v8); }

static inline float half_to_float(uint16_t h) {  /* IEEE fp16 -> fp32, exactly */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) {  /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 1024));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 1023) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_half(float f) {  /* fp32 -> fp16, nearest even; NaN quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, abs = u & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) return (uint16_t)(sign | 0x7E00 | ((abs >> 13) & 0x1FF));
    if (abs >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);  /* rounds past 65504: inf */
    if (abs < 0x38800000u) {  /* fp16 subnormal or zero: round on the 2^-24 grid */
        float scaled;
        memcpy(&scaled, &abs, 4);
        scaled = scaled * 16777216.0f;  /* exact: x * 2^24 */
        uint32_t q = (uint32_t)scaled, rest;
        float frac = scaled - (float)q;
        rest = frac > 0.5f || (frac == 0.5f && (q & 1));
        return (uint16_t)(sign | (q + rest));
    }
    uint32_t bits = abs - 0x38000000u;  /* rebias the exponent (127 - 15) */
    bits += 0xFFF + ((bits >> 13) & 1);
    return (uint16_t)(sign | (bits >> 13));
}

static inline uint16_t float_to_bf16(float f) {  /* nearest even; NaN -> 0x7FC0 as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

static inline AI v8 halves8(const uint16_t *p) {  /* 8 fp16 -> fp32 */
#ifdef __F16C__
    return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    v8 r;
    for (int i = 0; i < 8; i++) r[i] = half_to_float(p[i]);
    return r;
#endif
}

static inline AI v8 bf16x8(const uint16_t *p) {  /* 8 bf16 -> fp32: the bits shifted up */
#ifdef __AVX2__
    v8u u = (v8u)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    v8u u;
    for (int i = 0; i < 8; i++) u[i] = p[i];
#endif
    return (v8)(u << 16);
}

static inline AI void store_halves8(uint16_t *p, v8 x) {
#ifdef __F16C__
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int i = 0; i < 8; i++) p[i] = float_to_half(x[i]);
#endif
}

static inline AI void store_bf16x8(uint16_t *p, v8 x) {
    for (int i = 0; i < 8; i++) p[i] = float_to_bf16(x[i]);  /* (vectorised by GCC) */
}

static inline AI v8i u8x8(const uint8_t *p) {  /* 8 bytes zero-extended to 32 bits */
#ifdef __AVX2__
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8i r;
    for (int i = 0; i < 8; i++) r[i] = p[i];
    return r;
#endif
}

static inline AI v8i i8x8(const int8_t *p) {  /* 8 bytes sign-extended to 32 bits */
#ifdef __AVX2__
    return (v8i)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8i r;
    for (int i = 0; i < 8; i++) r[i] = p[i];
    return r;
#endif
}

/* The cache's element types (attention.c, cpu_kernels.c's KV write). */
enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };

static inline int64_t kv_size(int dt) { return dt == KV_F32 ? 4 : 2; }

/* 8 consecutive cache elements from element i, as fp32. */
static inline AI v8 kv_load8(const void *cache, int64_t i, int dt) {
    switch (dt) {
    case KV_F32: return load8((const float *)cache + i);
    case KV_BF16: return bf16x8((const uint16_t *)cache + i);
    default: return halves8((const uint16_t *)cache + i);
    }
}

/* n (a multiple of 8) cache elements from element i into fp32 dst. */
static inline AI void kv_load_row(float *dst, const void *cache, int64_t i, int64_t n, int dt) {
    for (int64_t c = 0; c < n; c += 8) *(v8_u *)(dst + c) = kv_load8(cache, i + c, dt);
}
#endif
