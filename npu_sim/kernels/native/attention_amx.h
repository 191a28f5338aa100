/* Prefill-chunk attention on AMX tiles (attention_chunk.c's work item, on a bf16 KV cache): the
 * two matmuls of flash attention as tile multiply-adds, bf16 operands and fp32 sums, with the
 * online softmax in fp32 between them. The query rows and the softmax weights are rounded to
 * bf16 on their way into the tiles (as oneDNN's and vLLM's bf16 attention round them), so the
 * numbers are not those of the fp32-arithmetic path: the caller allows it
 * (XY_ATTN_BF16_MATMUL), the tests hold it to a bf16 tolerance.
 *
 * A work item is 16 query rows x the `group` query heads of one KV head: its nq query vectors
 * in blocks of 16 (the columns of a tile), over key tiles of 32 (one A tile of P: 16 pairs).
 *
 *   scores   S^T (32 keys x 16 queries) = K (32 x d) . Q^T (d x 16): the K tile's A tiles are
 *            the cache's rows as they are (16 keys of a block are 16 rows with the slot stride;
 *            32 bf16 of d a row), Q^T's B tiles (d pairs x 16 queries) made once per item
 *   softmax  down the keys, one lane per query: running max m, sum l and rescale alpha are
 *            16-lane vectors; a key after a query's position is masked (causal)
 *   output   O (16 queries x d) += P (16 x 32 keys) . V (32 keys x d): P's A tile is P^T's
 *            key pairs transposed, V's B tiles (key pairs x 16 columns of d) interleaved once
 *            per key tile for every query block; O in fp32 rows, rescaled by alpha per query
 *
 * Needs d a multiple of 32 (whole A tiles along d) and blocks of at least 16 slots (a 16-key
 * half of a tile lies in one block). Keys past the item's last row are never read (V's pairs
 * are zero there, P is zero there, and their scores are never looked at).
 */
#ifndef XY_ATTENTION_AMX_H
#define XY_ATTENTION_AMX_H

#include <math.h>
#include <stdint.h>

#include "amx.h"
#include "paged.h"

#define XY_ATTN_BF16_MATMUL 1  /* xy_chunk_attention flag: bf16 Q and P allowed (AMX tiles) */

#if XY_HAVE_AMX
#define AK 32  /* keys per tile */

/* dst row i = column i of src, a 16 x 16 matrix of 32-bit elements (strides in elements): four
 * rounds of unpacks and 128-bit lane shuffles. */
static inline AI void transpose16(const uint32_t *src, int64_t ss, uint32_t *dst, int64_t ds) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + i * ss);
    for (int i = 0; i < 8; i++) {  /* 2 x 2 blocks */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {  /* r[4i + k]'s lane L: column 4L + k, rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) {  /* column 4L + k: lane L of r[k], r[4 + k], r[8 + k], r[12 + k] */
        __m512i u0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88);
        __m512i u1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xdd);
        __m512i v0 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
        __m512i v1 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xdd);
        _mm512_storeu_si512(dst + k * ds, _mm512_shuffle_i32x4(u0, v0, 0x88));
        _mm512_storeu_si512(dst + (4 + k) * ds, _mm512_shuffle_i32x4(u1, v1, 0x88));
        _mm512_storeu_si512(dst + (8 + k) * ds, _mm512_shuffle_i32x4(u0, v0, 0xdd));
        _mm512_storeu_si512(dst + (12 + k) * ds, _mm512_shuffle_i32x4(u1, v1, 0xdd));
    }
}

/* exp_approx (exp_approx.h) on 16 lanes: the same clamp, reduction and polynomial. */
static inline AI __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n), p = _mm512_set1_ps(1.5252734e-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);  /* p 2^n */
}

/* fp32 a (lanes 0-15) and b (lanes 16-31) rounded to bf16 as 16 pairs (a[i], b[i]). */
static inline AI __m512i bf16_pairs16(__m512 a, __m512 b) {
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/* Per-thread scratch of an item of nq query vectors, in 32-bit elements (every piece a whole
 * number of 64-byte lines). */
static inline size_t amx_item_scratch(int64_t nq, int64_t d) {
    size_t nb = (size_t)((nq + 15) / 16);
    return nb * (size_t)(d / 32) * 256 + 16 * (size_t)d + 4 * 256 + nb * 16 * (size_t)d
           + 2 * nb * 16 + 256;
}

/* C tile `tile` (a constant) of P . V into the running output rows o (16 rows of d, stride d)
 * at column e: o = o * alpha + C, row by row. */
#define AMX_ACCUMULATE(tile, e)                                                              \
    do {                                                                                     \
        _tile_stored(tile, c, 64);                                                           \
        for (int qq = 0; qq < 16; qq++) {                                                    \
            float *row = o + qq * d + (e);                                                   \
            _mm512_store_ps(row, _mm512_fmadd_ps(_mm512_load_ps(row),                        \
                                                 _mm512_set1_ps(alpha_of[qq]),               \
                                                 _mm512_load_ps(c + qq * 16)));              \
        }                                                                                    \
    } while (0)

/* attention_chunk.c's chunk_item on AMX (the contract above): rows [r0, r0 + rows) of the
 * chunk, the query heads of KV head j, from a bf16 cache; the calling thread has the tile
 * configuration loaded, and `scratch` holds amx_item_scratch(rows * group, d) elements. */
static void chunk_item_amx(const float *q, int64_t q_stride, const uint16_t *k_cache,
                           const uint16_t *v_cache, const int64_t *table, int64_t start_pos,
                           int64_t r0, int64_t rows, int64_t j, int64_t group, int64_t d,
                           int64_t token_len, int64_t block_shift, float scale, float *out,
                           int64_t o_stride, uint32_t *scratch) {
    int64_t nq = rows * group, nb = (nq + 15) / 16, ns = d / 32;
    uint32_t *qt = scratch;          /* (nb, ns) B tiles of Q^T: 16 pairs of d x 16 queries */
    uint32_t *w = qt + nb * ns * 256;  /* (16, d): V's key pairs, the B tiles of P . V */
    uint32_t *pm = w + 16 * d;       /* (16, 16): P^T's key pairs x queries, then ... */
    uint32_t *pa = pm + 256;         /* ... transposed: P's A tile */
    float *st = (float *)(pa + 256);  /* (32, 16): S^T, then P^T, of a key tile */
    float *c = st + 512;             /* (16, 16): a C tile stored */
    float *acc = c + 256;            /* (nb * 16, d): the running output */
    float *m = acc + nb * 16 * d, *l = m + nb * 16;  /* (nb * 16): running max and sum */
    const int64_t kv_stride = token_len * 2;  /* bytes between a block's slots */
    float alpha_of[16] __attribute__((aligned(64)));
    int32_t qpos[16] __attribute__((aligned(64)));

    /* Q^T: each block's query rows rounded to bf16 pairs (a row of x per query), transposed */
    for (int64_t b = 0; b < nb; b++)
        for (int64_t s = 0; s < ns; s++) {
            uint32_t x[256] __attribute__((aligned(64)));
            for (int64_t qq = 0; qq < 16; qq++) {
                int64_t iq = b * 16 + qq;
                __m512i pairs = _mm512_setzero_si512();
                if (iq < nq) {
                    const float *src = q + (r0 + iq / group) * q_stride
                                       + (j * group + iq % group) * d + 32 * s;
                    pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16),
                                                         _mm512_loadu_ps(src));
                }
                _mm512_store_si512(x + qq * 16, pairs);
            }
            transpose16(x, 16, qt + (b * ns + s) * 256, 16);
        }
    for (int64_t i = 0; i < nb * 16 * d; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
    for (int64_t i = 0; i < nb * 16; i += 16) {
        _mm512_store_ps(m + i, _mm512_set1_ps(-INFINITY));
        _mm512_store_ps(l + i, _mm512_setzero_ps());
    }

    int64_t k_end = start_pos + r0 + rows;  /* the item's last row sees keys [0, k_end) */
    for (int64_t k0 = 0; k0 < k_end; k0 += AK) {
        int64_t nk = k_end - k0 < AK ? k_end - k0 : AK;
        /* V's key pairs: w[i][x] = (V[k0 + 2i][x], V[k0 + 2i + 1][x]), zero past k_end */
        for (int64_t i = 0; i < 16; i++) {
            int64_t ka = k0 + 2 * i;
            const uint16_t *va = ka < k_end ? v_cache + slot(table, ka, block_shift, token_len)
                                 + j * d : NULL;
            const uint16_t *vb = ka + 1 < k_end ? v_cache + slot(table, ka + 1, block_shift,
                                                                 token_len) + j * d : NULL;
            for (int64_t e = 0; e < d; e += 16) {
                __m512i lo = va ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(va + e)))
                                : _mm512_setzero_si512();
                __m512i hi = vb ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vb + e)))
                                : _mm512_setzero_si512();
                _mm512_store_si512(w + i * d + e, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
        /* the tile's two halves of 16 keys, each 16 rows of one block; the second only if any
         * of its keys is seen */
        const uint16_t *kh0 = k_cache + slot(table, k0, block_shift, token_len) + j * d;
        const uint16_t *kh1 = nk > 16 ? k_cache + slot(table, k0 + 16, block_shift, token_len)
                                        + j * d : NULL;
        for (int64_t b = 0; b < nb; b++) {
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t s = 0; s < ns; s++) {
                _tile_loadd(6, qt + (b * ns + s) * 256, 64);
                _tile_loadd(4, kh0 + 32 * s, kv_stride);
                _tile_dpbf16ps(0, 4, 6);
                if (kh1) {
                    _tile_loadd(5, kh1 + 32 * s, kv_stride);
                    _tile_dpbf16ps(1, 5, 6);
                }
            }
            _tile_stored(0, st, 64);
            if (kh1) _tile_stored(1, st + 256, 64);

            /* online softmax down the keys, a lane per query */
            for (int qq = 0; qq < 16; qq++) {
                int64_t iq = b * 16 + qq;
                qpos[qq] = iq < nq ? (int32_t)(start_pos + r0 + iq / group) : -1;
            }
            __m512i pos = _mm512_load_si512(qpos);
            __m512 m_old = _mm512_load_ps(m + b * 16), mx = m_old;
            __mmask16 seen[AK];
            for (int64_t t = 0; t < nk; t++) {
                seen[t] = _mm512_cmple_epi32_mask(_mm512_set1_epi32((int32_t)(k0 + t)), pos);
                __m512 sv = _mm512_maskz_mul_ps(seen[t], _mm512_load_ps(st + t * 16),
                                                _mm512_set1_ps(scale));
                _mm512_store_ps(st + t * 16, sv);
                mx = _mm512_mask_max_ps(mx, seen[t], mx, sv);
            }
            /* lanes that have seen a key: rescale; the others (mx -inf) keep 0 sums */
            __mmask16 live = _mm512_cmp_ps_mask(mx, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m512 alpha = _mm512_mask_blend_ps(live, _mm512_set1_ps(1.0f),
                                                exp16(_mm512_sub_ps(m_old, mx)));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t t = 0; t < AK; t++) {
                __m512 p = _mm512_setzero_ps();
                if (t < nk)
                    p = _mm512_maskz_mov_ps(seen[t] & live, exp16(_mm512_sub_ps(
                        _mm512_load_ps(st + t * 16), mx)));
                sum = _mm512_add_ps(sum, p);
                _mm512_store_ps(st + t * 16, p);
            }
            _mm512_store_ps(m + b * 16, mx);
            _mm512_store_ps(l + b * 16, _mm512_fmadd_ps(_mm512_load_ps(l + b * 16), alpha, sum));
            _mm512_store_ps(alpha_of, alpha);

            /* P's A tile: P^T's key pairs (a row per pair), transposed to a row per query */
            for (int64_t i = 0; i < 16; i++)
                _mm512_store_si512(pm + i * 16, bf16_pairs16(_mm512_load_ps(st + 2 * i * 16),
                                                             _mm512_load_ps(st + (2 * i + 1) * 16)));
            transpose16(pm, 16, pa, 16);
            _tile_loadd(4, pa, 64);
            /* O = O alpha + P V, four 16-column blocks of d at a time */
            float *o = acc + b * 16 * d;
            for (int64_t e = 0; e < d; e += 64) {
                int64_t ne = (d - e) / 16 < 4 ? (d - e) / 16 : 4;
                _tile_zero(0);
                _tile_loadd(5, w + e, d * 4);
                _tile_dpbf16ps(0, 4, 5);
                if (ne > 1) {
                    _tile_zero(1);
                    _tile_loadd(6, w + e + 16, d * 4);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (ne > 2) {
                    _tile_zero(2);
                    _tile_loadd(7, w + e + 32, d * 4);
                    _tile_dpbf16ps(2, 4, 7);
                }
                if (ne > 3) {
                    _tile_zero(3);
                    _tile_loadd(5, w + e + 48, d * 4);
                    _tile_dpbf16ps(3, 4, 5);
                }
                AMX_ACCUMULATE(0, e);
                if (ne > 1) AMX_ACCUMULATE(1, e + 16);
                if (ne > 2) AMX_ACCUMULATE(2, e + 32);
                if (ne > 3) AMX_ACCUMULATE(3, e + 48);
            }
        }
    }
    for (int64_t iq = 0; iq < nq; iq++) {
        __m512 inv = _mm512_set1_ps(1.0f / l[iq]);
        float *dst = out + (r0 + iq / group) * o_stride + (j * group + iq % group) * d;
        for (int64_t e = 0; e < d; e += 16)
            _mm512_storeu_ps(dst + e, _mm512_mul_ps(_mm512_load_ps(acc + iq * d + e), inv));
    }
}
#undef AMX_ACCUMULATE
#endif

#endif
