/* Token ids in bulk, for engine.token_ids: the vocabulary check of a request's prompt and the
 * chained block hashes of the prefix cache (engine.kv_cache), over ids packed as native int64s
 * (the bytes struct.pack("<n>q") gives). Python does the same per id and per block, a few
 * hundred nanoseconds each: tens of microseconds per prompt of a thousand tokens, a second or
 * more per simulated trace of tens of thousands of requests.
 *
 * SHA-256 itself is OpenSSL's, the library Python's hashlib runs on (SHA-NI where the CPU has
 * it): engine.token_ids hands its functions in, so the digests are hashlib's, bit for bit. */

#include <stddef.h>
#include <stdint.h>

/* OpenSSL's SHA256_Init / SHA256_Update / SHA256_Final (each returns 1 on success). */
typedef struct {
    int (*init)(void *ctx);
    int (*update)(void *ctx, const void *data, size_t len);
    int (*final)(unsigned char *digest, void *ctx);
} sha256_fns;

#define DIGEST_BYTES 32
#define SHA256_CTX_BYTES 256 /* OpenSSL's SHA256_CTX is 112 bytes: room to spare */

/* The index of the first of ids[0..n) outside [0, vocab_size), or -1 when all are inside. */
int64_t xy_first_outside(const int64_t *ids, int64_t n, int64_t vocab_size) {
    for (int64_t i = 0; i < n; i++)
        if ((uint64_t)ids[i] >= (uint64_t)vocab_size) /* (a negative id wraps above) */
            return i;
    return -1;
}

/* out[32 b .. 32 b + 32) = SHA-256(parent_b || packed[b * block_bytes .. (b + 1) * block_bytes))
 * for b in [0, num_blocks), where parent_0 = parent[0..parent_len) and parent_b is block b-1's
 * digest. Returns 0, or 1 where OpenSSL reported a failure. */
int xy_hash_blocks(const sha256_fns *sha, const uint8_t *parent, int64_t parent_len,
                   const uint8_t *packed, int64_t num_blocks, int64_t block_bytes, uint8_t *out) {
    _Alignas(16) unsigned char ctx[SHA256_CTX_BYTES];
    for (int64_t b = 0; b < num_blocks; b++) {
        uint8_t *digest = out + DIGEST_BYTES * b;
        if (!sha->init(ctx) || !sha->update(ctx, parent, (size_t)parent_len)
            || !sha->update(ctx, packed + b * block_bytes, (size_t)block_bytes)
            || !sha->final(digest, ctx))
            return 1;
        parent = digest;
        parent_len = DIGEST_BYTES;
    }
    return 0;
}
