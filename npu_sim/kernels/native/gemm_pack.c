/* Packing weights into the panel GEMM's layouts (gemm_formats.h), once at load, and reading
 * single weight rows back out of them (the embedding lookup of a model whose LM head shares
 * the table, so only the packed copy is kept). Plain loops: packing runs once per weight. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_formats.h"

/* Bytes of the packed weight (n, k) in format fmt: ceil(n / 16) panels. */
int64_t xy_packed_bytes(int fmt, int64_t n, int64_t k) {
    return (n + NR - 1) / NR * panel_bytes(fmt, k);
}

/* w (n, k) fp32 into panels (ceil(n / 16), k, 16); columns past n are zero. */
void xy_pack_panels(const float *w, int64_t n, int64_t k, float *panels) {
    for (int64_t p = 0; p * NR < n; p++)
        for (int64_t kk = 0; kk < k; kk++)
            for (int64_t j = 0; j < NR; j++) {
                int64_t col = p * NR + j;
                panels[(p * k + kk) * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            }
}

/* w (n, k) bf16 (its bits) into pair panels (ceil(n / 16), ceil(k / 2), 16) of uint32: lane j
 * = w[j][2i] | w[j][2i + 1] << 16, zero past n and past k. */
void xy_pack_panels_bf16(const uint16_t *w, int64_t n, int64_t k, uint32_t *panels) {
    int64_t kp = (k + 1) / 2;
    for (int64_t p = 0; p * NR < n; p++)
        for (int64_t i = 0; i < kp; i++)
            for (int64_t j = 0; j < NR; j++) {
                int64_t col = p * NR + j;
                uint32_t lo = 0, hi = 0;
                if (col < n) {
                    lo = w[col * k + 2 * i];
                    hi = 2 * i + 1 < k ? w[col * k + 2 * i + 1] : 0;
                }
                panels[(p * kp + i) * NR + j] = lo | hi << 16;
            }
}

/* GGUF Q4_1 blocks (n, k / 32) of 20 bytes (fp16 d, fp16 m, 16 bytes: weight i < 16 in the low
 * nibble of byte i, weight 16 + i in its high nibble) into XY_Q4_1 panels. */
void xy_pack_q4_1(const uint8_t *blocks, int64_t n, int64_t k, uint8_t *panels) {
    const int64_t src_bytes = 20, dst_bytes = Q4_1_BLOCK_BYTES, nb = k / QK;
    for (int64_t p = 0; p * NR < n; p++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *dst = panels + (p * nb + b) * dst_bytes;
            memset(dst, 0, (size_t)dst_bytes);
            for (int64_t j = 0; j < NR && p * NR + j < n; j++) {
                const uint8_t *src = blocks + ((p * NR + j) * nb + b) * src_bytes;
                memcpy(dst + 2 * j, src, 2);           /* d */
                memcpy(dst + 2 * (NR + j), src + 2, 2);  /* m */
                for (int kk = 0; kk < QK; kk++) {
                    int q = kk < 16 ? src[4 + kk] & 15 : src[4 + kk - 16] >> 4;
                    dst[4 * NR + kk * 8 + j % 8] |= (uint8_t)(q << (j < 8 ? 0 : 4));
                }
            }
        }
}

/* GGUF Q8_0 blocks (n, k / 32) of 34 bytes (fp16 d, 32 int8) into XY_Q8_0 panels. */
void xy_pack_q8_0(const uint8_t *blocks, int64_t n, int64_t k, uint8_t *panels) {
    const int64_t src_bytes = 34, dst_bytes = Q8_0_BLOCK_BYTES, nb = k / QK;
    for (int64_t p = 0; p * NR < n; p++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *dst = panels + (p * nb + b) * dst_bytes;
            memset(dst, 0, (size_t)dst_bytes);
            for (int64_t j = 0; j < NR && p * NR + j < n; j++) {
                const uint8_t *src = blocks + ((p * NR + j) * nb + b) * src_bytes;
                memcpy(dst + 2 * j, src, 2);
                for (int kk = 0; kk < QK; kk++) dst[2 * NR + kk * NR + j] = src[2 + kk];
            }
        }
}

/* Rows ids[0 .. count) of the packed weight (n, k) in format fmt, as fp32 into out (count, k),
 * row stride os (for a tied embedding table, the LM head's panels). Returns 0, or -3 (nothing
 * written) when an id is outside [0, n). */
__attribute__((optimize("fp-contract=fast")))
int xy_gather_rows(int fmt, const void *panels, int64_t n, int64_t k, const int64_t *ids,
                   int64_t count, float *out, int64_t os) {
    enum { CHUNK = 256 };
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n) return -3;
    float scratch[CHUNK * NR] __attribute__((aligned(64)));
    int64_t step = fmt == XY_F32 || fmt == XY_BF16 ? CHUNK : CHUNK / QK * QK;
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *panel = (const uint8_t *)panels + ids[i] / NR * panel_bytes(fmt, k);
        for (int64_t k0 = 0; k0 < k; k0 += step) {
            int64_t k1 = k - k0 < step ? k : k0 + step;
            sink_t s = {NULL, 0, k0, NULL, scratch};
            walk(fmt, panel, 0, k0, k1, &s, 0);  /* the chunk's 16 columns */
            for (int64_t kk = k0; kk < k1; kk++)
                out[i * os + kk] = scratch[(kk - k0) * NR + ids[i] % NR];
        }
    }
    return 0;
}

/* Which instruction-set paths this build has (-march=native: the build machine's), as bits:
 * 1 AVX2, 2 FMA, 4 F16C, 8 AVX-512F, 16 AVX512_BF16 (the bf16 GEMM's vdpbf16ps), 32 AMX-BF16
 * (the bf16 GEMM's tiles, gemm_amx.h). */
int xy_isa(void) {
    int bits = 0;
#ifdef __AVX2__
    bits |= 1;
#endif
#ifdef __FMA__
    bits |= 2;
#endif
#ifdef __F16C__
    bits |= 4;
#endif
#ifdef __AVX512F__
    bits |= 8;
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    bits |= 16;
#endif
#ifdef __AMX_BF16__
    bits |= 32;
#endif
    return bits;
}
