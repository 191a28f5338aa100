/* What the attention kernels (attention.c: decodes, attention_chunk.c: prefill chunks) share:
 * 8-lane fp32 vectors and the paged cache's addressing, checks and prefetch. */
#ifndef XY_PAGED_H
#define XY_PAGED_H
#include <stdint.h>

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

#endif
