/* What the AMX kernels (gemm_amx.h: bf16 panel GEMMs; attention_amx.h: prefill-chunk attention)
 * share: the kernel's permission to use the tiles, and the one tile configuration both run on.
 *
 * Linux hands AMX's tile state to a process only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM);
 * where it refuses (older kernels, VMs that list the flag without the state), amx_ready() says
 * no and the callers take their AVX-512 / AVX2 paths. Tile configuration is per thread: each
 * parallel region's threads load it and release the tiles when done.
 */
#ifndef XY_AMX_H
#define XY_AMX_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 16        /* rows of an A or C tile */
#define AMX_PAIRS 16       /* bf16 pairs along K in an A tile row (64 bytes) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether this process may use AMX tiles: asked of the kernel once per translation unit (torch's
 * oneDNN asks the same; a second request succeeds too). */
static int amx_ready(void) {
    static atomic_int state;  /* 0 not asked yet, 1 granted, -1 refused */
    int s = atomic_load(&state);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        atomic_store(&state, s);
    }
    return s > 0;
}

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];  /* bytes per row of each tile */
    uint8_t rows[16];
} __attribute__((aligned(64))) amx_config;

/* Tiles 0-3: C (16 x 16 fp32), 4-7: A (16 rows x 16 pairs) or B (16 pair rows x 16 columns):
 * every tile 16 rows of 64 bytes. */
static const amx_config AMX_CONFIG = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS},
};

static inline __attribute__((always_inline)) void amx_zero_c(void) {  /* the C tiles, 0-3 */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}
#define XY_HAVE_AMX 1
#else
#define XY_HAVE_AMX 0
#endif

#endif
