/* Attention on AMX tiles over a bf16 KV cache: attention_chunk.c's prefill work items
 * (chunk_item_amx) and attention.c's decodes (decode_item_amx). Both matmuls of attention as
 * tile multiply-adds, bf16 operands and fp32 sums, the softmax in fp32 between them. K and V
 * are bf16 in the cache already; the fp32 queries and softmax weights go in as two bf16 parts
 * each, hi = bf16(x) and lo = bf16(x - hi), multiplied in turn into the same sums: hi + lo
 * carries ~16 of fp32's 24 mantissa bits, so the results are within ~2^-16 of the
 * fp32-arithmetic kernels' (measured ~1e-5 of unit-scale outputs, against ~1e-6 for those),
 * for twice the tile work, which is not what bounds these kernels. Used where the caller
 * allows it (XY_ATTN_BF16_MATMUL: native.bf16_attention_for).
 *
 * A prefill work item is 16 query rows x the `group` query heads of one KV head: its nq query
 * vectors in blocks of 16 (the columns of a tile), over key tiles of 32 (one A tile of P: 16
 * key pairs), flash style:
 *
 *   scores   S^T (32 keys x 16 queries) = K (32 x d) . Q^T (d x 16): the K tile's A tiles are
 *            the cache's rows as they are (16 keys of a block are 16 rows with the slot stride;
 *            32 bf16 of d a row), Q^T's B tiles (d pairs x 16 queries) made once per item
 *   softmax  down the keys, one lane per query: running max m, sum l and rescale alpha are
 *            16-lane vectors; a key after a query's position is masked (causal)
 *   output   O (16 queries x d) += P (16 x 32 keys) . V (32 keys x d): P's A tiles are P^T's
 *            key pairs transposed, V's B tiles (key pairs x 16 columns of d) interleaved once
 *            per key tile for every query block; O in fp32 rows, rescaled by alpha per query
 *
 * A decode (one query row, the group's heads the first columns of one block) takes two passes
 * instead, as attention.c's: every score, an exact softmax per head, then P . V with the C
 * tiles accumulating over every key.
 *
 * Needs d a multiple of 32 (whole A tiles along d) and blocks of at least 16 slots (a 16-key
 * half of a tile lies in one block). Keys past the last one seen are never read (V's pairs
 * are zero there, P is zero there, and their scores are never looked at).
 */
#ifndef XY_ATTENTION_AMX_H
#define XY_ATTENTION_AMX_H

#include <math.h>
#include <stdint.h>

#include "amx.h"
#include "paged.h"

#define XY_ATTN_BF16_MATMUL 1  /* attention kernels' flag: AMX tiles allowed (split Q and P) */

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
    for (int k = 0; k < 4; k++) {  /* column 4L + k: lane L of r[k], r[4+k], r[8+k], r[12+k] */
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

/* Whether an attention launch with these flags and operands runs on the tiles (the contract
 * above): the caller allows it, a bf16 cache, d in whole tiles, blocks of 16 slots or more, and
 * the kernel grants AMX. */
static inline int amx_attention_takes(int flags, int kv_dtype, int64_t d, int64_t block_shift) {
    return (flags & XY_ATTN_BF16_MATMUL) && kv_dtype == KV_BF16 && d % 32 == 0
           && block_shift >= 4 && amx_ready();
}

/* x rounded to bf16 (to nearest, ties to even, as vcvtne2ps2bf16 rounds), as fp32 */
static inline AI __m512 bf16_round(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }

/* The B tiles of Q^T (d pairs x 16 query columns, a tile per 32 of d) of up to 16 query
 * vectors of d floats (vec[g]; NULL: a zero column), each split in two bf16 parts whose sum
 * carries ~16 bits of the fp32 mantissa: hi = bf16(q), lo = bf16(q - hi). */
static void query_tiles(const float *const vec[16], int64_t ns, uint32_t *hi, uint32_t *lo) {
    for (int64_t s = 0; s < ns; s++) {
        uint32_t xh[256] __attribute__((aligned(64))), xl[256] __attribute__((aligned(64)));
        for (int g = 0; g < 16; g++) {
            __m512i h = _mm512_setzero_si512(), l = _mm512_setzero_si512();
            if (vec[g]) {
                const float *src = vec[g] + 32 * s;
                __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
                h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
                l = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, bf16_round(b)),
                                                 _mm512_sub_ps(a, bf16_round(a)));
            }
            _mm512_store_si512(xh + g * 16, h);
            _mm512_store_si512(xl + g * 16, l);
        }
        transpose16(xh, 16, hi + s * 256, 16);
        transpose16(xl, 16, lo + s * 256, 16);
    }
}

/* Per-thread scratch of an item of nq query vectors, in 32-bit elements (every piece a whole
 * number of 64-byte lines). */
static inline size_t amx_item_scratch(int64_t nq, int64_t d) {
    size_t nb = (size_t)((nq + 15) / 16);
    return 2 * nb * (size_t)(d / 32) * 256 + 16 * (size_t)d + 6 * 256 + nb * 16 * (size_t)d
           + 3 * nb * 16 + 256;
}

/* V's key pairs of the key tile at k0, the B tiles of P . V: row i of w holds the pairs
 * (V[k0 + 2i][col], V[k0 + 2i + 1][col]) of columns col0 .. col0 + ncols - 1 (ncols a multiple
 * of 32; col0 counts from a slot's first element), rows w_len elements apart; keys from `end`
 * on as zero (their slots are never read). Two 16-bit unpacks per 32 columns leave them in the
 * unpacks' order: of each 32, the first 16 pairs are columns 8L + k and the next 16 columns
 * 8L + 4 + k, at position 4L + k (L, k < 4); `store_in_order` puts outputs back. */
static inline AI void value_pairs(const uint16_t *v_cache, const int64_t *table, int64_t k0,
                                  int64_t end, int64_t col0, int64_t ncols, int64_t token_len,
                                  int64_t block_shift, uint32_t *w, int64_t w_len) {
    for (int64_t i = 0; i < 16; i++) {
        int64_t ka = k0 + 2 * i;
        const uint16_t *va = ka < end ? v_cache + slot(table, ka, block_shift, token_len) + col0
                                      : NULL;
        const uint16_t *vb = ka + 1 < end ? v_cache + slot(table, ka + 1, block_shift, token_len)
                                            + col0 : NULL;
        for (int64_t x = 0; x < ncols; x += 32) {
            __m512i a = va ? _mm512_loadu_si512(va + x) : _mm512_setzero_si512();
            __m512i b = vb ? _mm512_loadu_si512(vb + x) : _mm512_setzero_si512();
            _mm512_store_si512(w + i * w_len + x, _mm512_unpacklo_epi16(a, b));
            _mm512_store_si512(w + i * w_len + x + 16, _mm512_unpackhi_epi16(a, b));
        }
    }
}

/* 32 output columns in value_pairs' order (first: its first 16, second: the next 16) back in
 * column order, times scale, to dst. */
static inline AI void store_in_order(float *dst, __m512 first, __m512 second, __m512 scale) {
    const __m512i low = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i high = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10,
                                          9, 8);
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_permutex2var_ps(first, low, second), scale));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_permutex2var_ps(first, high, second), scale));
}

/* S^T of a key tile into st (32 keys x 16 queries): tiles 0 and 1 = K (tile 4: the first 16
 * keys' rows from kh0, tile 5: the next 16 from kh1, NULL: none) . (Q^T hi + lo) (tiles 6, 7;
 * ns tiles of each, a tile per 32 of d). */
static inline AI void scores_amx(const uint16_t *kh0, const uint16_t *kh1, int64_t kv_stride,
                                 const uint32_t *q_hi, const uint32_t *q_lo, int64_t ns,
                                 float *st) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t s = 0; s < ns; s++) {
        _tile_loadd(4, kh0 + 32 * s, kv_stride);
        _tile_loadd(6, q_hi + s * 256, 64);
        _tile_loadd(7, q_lo + s * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(0, 4, 7);
        if (kh1) {
            _tile_loadd(5, kh1 + 32 * s, kv_stride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(1, 5, 7);
        }
    }
    _tile_stored(0, st, 64);
    if (kh1) _tile_stored(1, st + 256, 64);
}

/* C tiles 0 .. ne - 1 (ne <= 4) += P . V: P's A tiles loaded in tiles 4 (hi) and 5 (lo), V's
 * B tiles the 16-column blocks of w (key pairs, rows w_stride bytes apart), each through
 * tile 6 or 7. */
static inline AI void values_amx(const uint32_t *w, int64_t w_stride, int64_t ne) {
/* C tile c += (hi + lo) . B, B through tile b (tile numbers are immediates) */
#define PV(c, b)                                      \
    do {                                              \
        _tile_loadd(b, w + 16 * (c), w_stride);       \
        _tile_dpbf16ps(c, 4, b);                      \
        _tile_dpbf16ps(c, 5, b);                      \
    } while (0)
    PV(0, 6);
    if (ne > 1) PV(1, 7);
    if (ne > 2) PV(2, 6);
    if (ne > 3) PV(3, 7);
#undef PV
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
    uint32_t *qt = scratch;          /* (nb, ns, hi / lo) B tiles of Q^T: d pairs x queries */
    uint32_t *w = qt + 2 * nb * ns * 256;  /* (16, d): V's key pairs, the B tiles of P . V */
    uint32_t *pm = w + 16 * d;       /* (2, 16, 16): P^T's key pairs x queries (hi, lo), ... */
    uint32_t *pa = pm + 512;         /* ... transposed: P's A tiles (hi, lo) */
    float *st = (float *)(pa + 512);  /* (32, 16): S^T, then P^T, of a key tile */
    float *c = st + 512;             /* (16, 16): a C tile stored */
    float *acc = c + 256;            /* (nb * 16, d): the running output */
    float *m = acc + nb * 16 * d, *l = m + nb * 16;  /* (nb * 16): running max and sum */
    int32_t *qpos = (int32_t *)(l + nb * 16);  /* (nb * 16): each query's position, -1 past nq */
    const int64_t kv_stride = token_len * 2;  /* bytes between a block's slots */
    float alpha_of[16] __attribute__((aligned(64)));

    for (int64_t b = 0; b < nb; b++) {  /* Q^T, block by block */
        const float *vec[16];
        for (int64_t qq = 0; qq < 16; qq++) {
            int64_t iq = b * 16 + qq;
            vec[qq] = iq < nq ? q + (r0 + iq / group) * q_stride + (j * group + iq % group) * d
                              : NULL;
        }
        query_tiles(vec, ns, qt + 2 * b * ns * 256, qt + (2 * b + 1) * ns * 256);
    }
    for (int64_t i = 0; i < nb * 16 * d; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
    for (int64_t i = 0; i < nb * 16; i += 16) {
        _mm512_store_ps(m + i, _mm512_set1_ps(-INFINITY));
        _mm512_store_ps(l + i, _mm512_setzero_ps());
    }
    for (int64_t iq = 0; iq < nb * 16; iq++)
        qpos[iq] = iq < nq ? (int32_t)(start_pos + r0 + iq / group) : -1;

    int64_t k_end = start_pos + r0 + rows;  /* the item's last row sees keys [0, k_end) */
    for (int64_t k0 = 0; k0 < k_end; k0 += AK) {
        int64_t nk = k_end - k0 < AK ? k_end - k0 : AK;
        value_pairs(v_cache, table, k0, k_end, j * d, d, token_len, block_shift, w, d);
        /* the tile's two halves of 16 keys, each 16 rows of one block; the second only if any
         * of its keys is seen */
        const uint16_t *kh0 = k_cache + slot(table, k0, block_shift, token_len) + j * d;
        const uint16_t *kh1 = nk > 16 ? k_cache + slot(table, k0 + 16, block_shift, token_len)
                                        + j * d : NULL;
        for (int64_t b = 0; b < nb; b++) {
            scores_amx(kh0, kh1, kv_stride, qt + 2 * b * ns * 256, qt + (2 * b + 1) * ns * 256,
                       ns, st);

            /* online softmax down the keys, a lane per query */
            __m512i pos = _mm512_load_si512(qpos + b * 16);
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

            /* P's A tiles: P^T's key pairs (a row per pair; hi and lo parts), transposed to a
             * row per query */
            for (int64_t i = 0; i < 16; i++) {
                __m512 p0 = _mm512_load_ps(st + 32 * i), p1 = _mm512_load_ps(st + 32 * i + 16);
                _mm512_store_si512(pm + i * 16, bf16_pairs16(p0, p1));
                _mm512_store_si512(pm + 256 + i * 16,
                                   bf16_pairs16(_mm512_sub_ps(p0, bf16_round(p0)),
                                                _mm512_sub_ps(p1, bf16_round(p1))));
            }
            transpose16(pm, 16, pa, 16);
            transpose16(pm + 256, 16, pa + 256, 16);
            _tile_loadd(4, pa, 64);
            _tile_loadd(5, pa + 256, 64);
            /* O = O alpha + P V, four 16-column blocks of d at a time */
            float *o = acc + b * 16 * d;
            for (int64_t e = 0; e < d; e += 64) {
                int64_t ne = (d - e) / 16 < 4 ? (d - e) / 16 : 4;
                amx_zero_c();
                values_amx(w + e, d * 4, ne);
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
        for (int64_t x = 0; x < d; x += 32)  /* (acc's columns in value_pairs' order) */
            store_in_order(dst + x, _mm512_load_ps(acc + iq * d + x),
                           _mm512_load_ps(acc + iq * d + x + 16), inv);
    }
}
#undef AMX_ACCUMULATE

/* Key tiles a decode fetches ahead of the one it multiplies (decode_item_amx) */
#define AHEAD_TILES 2

/* Elements [col0, col0 + ncols) of the slots of keys [k0, k0 + AK) (those before end) fetched
 * into L2. A decode reads one KV head's rows (128 of a slot's 384 bytes for the default model)
 * out of scattered blocks, which the hardware prefetchers do not follow, and a tile load that
 * misses stalls the tile unit: 16 decodes of 1,000 keys took 26.1 ms a step (30 layers, 2
 * threads) without, 22.5 with (2-core AMX Xeon; 1 and 4 tiles ahead: 22.7-22.8 ms). */
static inline AI void head_rows_ahead(const uint16_t *cache, const int64_t *table, int64_t k0,
                                      int64_t end, int64_t col0, int64_t ncols, int64_t token_len,
                                      int64_t block_shift) {
    int64_t last = k0 + AK < end ? k0 + AK : end;
    for (int64_t k = k0; k < last; k++) {
        const char *row = (const char *)(cache + slot(table, k, block_shift, token_len) + col0);
        for (int64_t i = 0; i < ncols * 2; i += 64) __builtin_prefetch(row + i, 0, 2);
    }
}

/* Per-thread scratch of decode_item_amx for contexts of up to max_ctx keys, in 32-bit
 * elements. */
static inline size_t amx_decode_scratch(int64_t max_ctx, int64_t d) {
    size_t ctx_pad = (size_t)((max_ctx + AK - 1) / AK * AK);
    return 2 * (size_t)(d / 32) * 256 + 512 + 4 * 256 + 16 * ctx_pad + 16 * ctx_pad + 16 * 64;
}

/* One decode's attention for KV head j on AMX tiles: the query row's `group` heads (qrow: the
 * row of q, heads of d) against keys [p0, p1) (p0 a multiple of 32), into the same heads of
 * orow (part NULL: the keys are the whole context), else their partial sums into part as
 * attention.c's attend writes them (num_heads heads). Two passes, as attention.c's decode:
 * every score first (S^T = K . Q^T, 32 keys a step, the group's queries the tile's first
 * columns), an exact softmax per head down its keys, then O = P . V with the four C tiles of
 * 64 columns of d accumulating over every key (no rescaling). Q and P split in two bf16 parts
 * as in chunk_item_amx; group <= 16; the calling thread has the tile configuration loaded, and
 * `scratch` holds amx_decode_scratch(p1 - p0, d) elements. */
static void decode_item_amx(const float *qrow, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *table, int64_t p0, int64_t p1, int64_t j,
                            int64_t group, int64_t num_heads, int64_t d, int64_t token_len,
                            int64_t block_shift, float scale, float *orow, float *part,
                            uint32_t *scratch) {
    int64_t ns = d / 32, len = p1 - p0, ctx_pad = (len + AK - 1) / AK * AK;
    uint32_t *qt = scratch;              /* (hi / lo, ns) B tiles of Q^T */
    float *st = (float *)(qt + 2 * ns * 256);  /* (32, 16): S^T of a key tile */
    float *c = st + 512;                 /* (4, 16, 16): the C tiles stored */
    float *sc = c + 4 * 256;             /* (16, ctx_pad): each head's scores, then weights */
    uint16_t *pb = (uint16_t *)(sc + 16 * ctx_pad);  /* (hi / lo, 16, ctx_pad) bf16: P's A tiles */
    uint32_t *w = (uint32_t *)(pb + 32 * ctx_pad);   /* (16, 64): V's key pairs */
    const int64_t kv_stride = token_len * 2;
    float max_score[16], sum_weights[16];

    /* the values' first tiles, read once the scores are done (pass 3 fetches ahead of itself) */
    for (int64_t t = 0; t < AHEAD_TILES; t++)
        head_rows_ahead(v_cache, table, p0 + AK * t, p1, j * d, d, token_len, block_shift);
    const float *vec[16];
    for (int64_t g = 0; g < 16; g++) vec[g] = g < group ? qrow + (j * group + g) * d : NULL;
    query_tiles(vec, ns, qt, qt + ns * 256);
    /* scores: a head's column of each S^T tile, gathered into its row of sc */
    const __m512i column = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16));
    for (int64_t k0 = p0; k0 < p1; k0 += AK) {
        head_rows_ahead(k_cache, table, k0 + AK * AHEAD_TILES, p1, j * d, d, token_len,
                        block_shift);
        const uint16_t *kh0 = k_cache + slot(table, k0, block_shift, token_len) + j * d;
        const uint16_t *kh1 = k0 + 16 < p1 ? k_cache + slot(table, k0 + 16, block_shift,
                                                               token_len) + j * d : NULL;
        scores_amx(kh0, kh1, kv_stride, qt, qt + ns * 256, ns, st);
        float *at = sc + k0 - p0;
        for (int64_t g = 0; g < group; g++) {
            __m512 lo = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32((int)g)),
                                            st, 4);
            _mm512_store_ps(at + g * ctx_pad, _mm512_mul_ps(lo, _mm512_set1_ps(scale)));
            __m512 hi = kh1 ? _mm512_i32gather_ps(
                _mm512_add_epi32(column, _mm512_set1_epi32((int)(256 + g))), st, 4)
                            : _mm512_setzero_ps();
            _mm512_store_ps(at + g * ctx_pad + 16, _mm512_mul_ps(hi, _mm512_set1_ps(scale)));
        }
    }
    /* softmax per head, its weights into P's rows as two bf16 parts (keys past p1: 0) */
    for (int64_t g = 0; g < group; g++) {
        float *row = sc + g * ctx_pad;
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < ctx_pad; k += 16) {
            int64_t left = len - k;
            __mmask16 in = (__mmask16)(left >= 16 ? 0xFFFF : left > 0 ? (1u << left) - 1 : 0);
            mx = _mm512_mask_max_ps(mx, in, mx, _mm512_load_ps(row + k));
        }
        max_score[g] = _mm512_reduce_max_ps(mx);
        __m512 m = _mm512_set1_ps(max_score[g]);
        for (int64_t k = 0; k < ctx_pad; k += 32) {
            __m512 p[2];
            for (int h = 0; h < 2; h++) {
                int64_t left = len - k - 16 * h;
                __mmask16 in = (__mmask16)(left >= 16 ? 0xFFFF : left > 0 ? (1u << left) - 1 : 0);
                p[h] = _mm512_maskz_mov_ps(in, exp16(_mm512_sub_ps(_mm512_load_ps(row + k + 16 * h),
                                                                 m)));
                sum = _mm512_add_ps(sum, p[h]);
            }
            _mm512_store_si512(pb + g * ctx_pad + k, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
            _mm512_store_si512(pb + (16 + g) * ctx_pad + k, (__m512i)_mm512_cvtne2ps_pbh(
                _mm512_sub_ps(p[1], bf16_round(p[1])), _mm512_sub_ps(p[0], bf16_round(p[0]))));
        }
        sum_weights[g] = _mm512_reduce_add_ps(sum);
    }
    /* the next KV head's first key tiles, for the item after this one */
    if ((j + 1) * group < num_heads)
        for (int64_t t = 0; t < AHEAD_TILES; t++)
            head_rows_ahead(k_cache, table, p0 + AK * t, p1, (j + 1) * d, d, token_len,
                            block_shift);
    /* O = P V, 64 columns of d at a time over every key */
    float *dst = part ? part : orow;
    for (int64_t e0 = 0; e0 < d; e0 += 64) {
        int64_t ne = (d - e0) / 16 < 4 ? (d - e0) / 16 : 4;
        amx_zero_c();
        for (int64_t k0 = p0; k0 < p1; k0 += AK) {
            head_rows_ahead(v_cache, table, k0 + AK * AHEAD_TILES, p1, j * d + e0, 16 * ne,
                            token_len, block_shift);
            value_pairs(v_cache, table, k0, p1, j * d + e0, 16 * ne, token_len, block_shift, w,
                        64);
            _tile_loadd(4, pb + k0 - p0, ctx_pad * 2);
            _tile_loadd(5, pb + 16 * ctx_pad + k0 - p0, ctx_pad * 2);
            values_amx(w, 256, ne);
        }
        _tile_stored(0, c, 64);
        _tile_stored(1, c + 256, 64);
        if (ne > 2) {
            _tile_stored(2, c + 512, 64);
            _tile_stored(3, c + 768, 64);
        }
        for (int64_t g = 0; g < group; g++)  /* (the tiles' columns in value_pairs' order) */
            for (int64_t x = 0; x < ne / 2; x++)
                store_in_order(dst + (j * group + g) * d + e0 + 32 * x,
                               _mm512_load_ps(c + 512 * x + g * 16),
                               _mm512_load_ps(c + 512 * x + 256 + g * 16),
                               _mm512_set1_ps(part ? 1.0f : 1.0f / sum_weights[g]));
    }
    if (part)
        for (int64_t g = 0; g < group; g++) {
            part[num_heads * d + j * group + g] = max_score[g];
            part[num_heads * (d + 1) + j * group + g] = sum_weights[g];
        }
}
#endif

#endif
