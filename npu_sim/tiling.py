"""Tile shapes derived from the chip's buffer sizes, and the fixed-menu covers built from them.

Why these shapes (fp16/bf16 operands, 2 bytes; fp32 accumulation, 4 bytes):
- GEMM. The output tile accumulates in L0C in fp32: tm * tn * 4 <= L0C (128 KiB) gives
  tm * tn <= 32768. L0A and L0B are double-buffered so the next K step loads while the cube runs:
  2 * tm * tk * 2 <= L0A (64 KiB) and 2 * tk * tn * 2 <= L0B (64 KiB). With tk = 64 (four cube
  K-fractals per step) the largest tile is 128 x 256 x 64, the shape catlass uses by default on
  the 910B. Tokens (M) are the only dynamic dimension, so the menu varies tm alone: powers of two
  from one cube fractal (16) up to 128, all with tn = 256, tk = 64. Smaller tm keeps decode-sized
  batches from computing mostly masked rows.
- Attention. A Q tile is at most 128 stacked rows (query tokens x the query heads sharing one KV
  head): the 128 x 128 fp32 score block of one KV block is 64 KiB, leaving L0C room to double
  buffer, and each of the two vector cores of the AIC softmaxes 64 rows of it in UB. Tiles of 16,
  64 and 128 rows serve decode, verify and prefill rows as in the paper. A verify chunk (a root
  and its draft tokens) never takes the 16-row tile, see ATTN_VERIFY_TILE_ROWS.
- Vector ops. A row tile holds input, output and weight rows in fp32 in UB, double-buffered.
- GM->L1 depth (the MTE2 unit of a GEMM task). L1 holds the A (tm x kl1) and B (tn x kl1) panels
  double-buffered: 2 * (tm + tn) * kl1 * 2 <= L1 (512 KiB), kl1 a multiple of 256 as ATB rounds
  it: 256 for every menu tile, catlass's L1TileShape<128, 256, 256>.
- Attention KV chunk (the unit the cube hands the vector cores through GM). Each of the AIC's two
  AIVs softmaxes half of a Q tile's rows (<= 64) over the chunk in fp32, in two thirds of UB (the
  rest holds P in fp16 and the row statistics): 64 * chunk * 4 <= 128 KiB, chunk a multiple of
  the 128-token page: 512, catlass FAI's [128, 512] base block.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from npu_sim.hardware import ChipSpec
from npu_sim.tasks import GEMM_TASK, VECTOR_TASK, TileShape

OPERAND_BYTES = 2  # fp16 / bf16 on the cube
ACCUM_BYTES = 4  # fp32 accumulators in L0C
GEMM_TK = 64  # four 16-deep cube fractals per L0 step
GEMM_TN = 256
ATTN_Q_TILE_ROWS = (16, 64, 128)  # decode / verify / prefill Q tiles, stacked rows
# The smallest Q tile of a verify chunk. The paper makes a verify stage one 64-row tiling block
# (XYS Fig. 7b: 53 verify tokens -> one tile, next to 16-row decode tiles), so the whole
# specLen x specLen tree mask is loaded once per task and applied in one pass of its rows; verify
# attention streams the whole KV per KV head for a few rows, so it is bandwidth-bound and the
# masked rows of a short chunk cost cube time that the KV stream hides.
ATTN_VERIFY_TILE_ROWS = 64
VECTOR_BUFFERS = 3 * 2  # in, out, weight rows; double-buffered
L1_K_ALIGN = 256  # GM->L1 K depth granule (ATB pp_matmul rounds k0 to 256)
KV_PAGE_TOKENS = 128  # catlass FAI's page; the KV chunk is a multiple of it


@functools.cache
def gemm_menu(chip: ChipSpec) -> tuple[TileShape, ...]:
    """The GEMM tile menu for `chip`, largest tm first (see the module docstring)."""
    max_tm = chip.l0c_bytes // (GEMM_TN * ACCUM_BYTES)
    assert chip.l0b_bytes >= 2 * GEMM_TK * GEMM_TN * OPERAND_BYTES, "tn x tk overflows L0B"
    menu = []
    tm = chip.cube_m
    while tm <= max_tm and 2 * tm * GEMM_TK * OPERAND_BYTES <= chip.l0a_bytes:
        menu.append(TileShape(tm=tm, tn=GEMM_TN, tk=GEMM_TK))
        tm *= 2
    return tuple(reversed(menu))


def cover_m(m: int, menu: tuple[TileShape, ...]) -> list[tuple[int, int, int]]:
    """Cover `m` rows greedily with menu tiles: `[(m_start, m_rows, tile_index), ...]`.

    Full tiles of the largest shape that fits, then the remainder in the smallest tile that holds
    it, masked (virtual padding): 200 = 128 + 64 + 16 (8 rows valid). Never pads M itself.
    """
    cover, start = [], 0
    while start < m:
        rest = m - start
        fitting = [i for i, t in enumerate(menu) if t.tm <= rest]
        idx = fitting[0] if fitting else len(menu) - 1  # menu is largest first
        rows = min(menu[idx].tm, rest)
        cover.append((start, rows, idx))
        start += rows
    return cover


@functools.lru_cache(maxsize=1 << 14)
def gemm_tasks(m: int, n: int, menu: tuple[TileShape, ...]) -> np.ndarray:
    """GEMM_TASK table for an (m, n) output: the M cover times the N tiles, m-tile major.

    Cached by shape: every layer of a step, and every step with the same token count, reuses it.
    The last N tile is masked when n is not a multiple of tn.
    """
    tn = menu[0].tn
    m_cover = cover_m(m, menu)
    n_starts = np.arange(0, n, tn)
    tasks = np.empty(len(m_cover) * len(n_starts), dtype=GEMM_TASK)
    i = 0
    for m_start, m_rows, tile in m_cover:
        for n_start in n_starts:
            tasks[i] = (m_start, m_rows, n_start, min(tn, n - n_start), tile)
            i += 1
    tasks.flags.writeable = False
    return tasks


@functools.lru_cache(maxsize=1 << 14)
def vector_tasks(num_rows: int, row_len: int, chip: ChipSpec) -> np.ndarray:
    """VECTOR_TASK table: rows split evenly over the vector cores, each tile fitting in UB."""
    ub_rows = max(1, chip.ub_bytes // (row_len * ACCUM_BYTES * VECTOR_BUFFERS))
    rows_per_task = max(1, min(ub_rows, math.ceil(num_rows / chip.num_vector_cores)))
    starts = np.arange(0, num_rows, rows_per_task)
    tasks = np.empty(len(starts), dtype=VECTOR_TASK)
    tasks["row_start"] = starts
    tasks["num_rows"] = np.minimum(rows_per_task, num_rows - starts)
    tasks.flags.writeable = False
    return tasks


def attention_q_tile(q_len: int, group_size: int, verify: bool = False) -> tuple[int, int]:
    """(tile_rows, tokens_per_tile) for a sequence of q_len query tokens.

    A tile's stacked rows are tokens x group_size; pick the smallest menu tile that holds the
    whole sequence (for a verify chunk: at least ATTN_VERIFY_TILE_ROWS), else split it into full
    128-row tiles.
    """
    stacked = q_len * group_size
    for tile_rows in ATTN_Q_TILE_ROWS:
        if stacked <= tile_rows and (not verify or tile_rows >= ATTN_VERIFY_TILE_ROWS):
            return tile_rows, q_len
    largest = ATTN_Q_TILE_ROWS[-1]
    return largest, max(1, largest // group_size)


def attention_q_tiles(q_len: np.ndarray, group_size: int,
                      verify: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`attention_q_tile` over arrays of sequences: (tile_rows, tokens_per_tile), int64."""
    largest = ATTN_Q_TILE_ROWS[-1]
    tile_rows = np.full(len(q_len), largest, dtype=np.int64)
    tokens = np.full(len(q_len), max(1, largest // group_size), dtype=np.int64)
    for rows in reversed(ATTN_Q_TILE_ROWS):  # the smallest that fits wins
        fits = (q_len * group_size <= rows) & (~verify | (rows >= ATTN_VERIFY_TILE_ROWS))
        tile_rows = np.where(fits, rows, tile_rows)
        tokens = np.where(fits, q_len, tokens)
    return tile_rows, tokens


def gemm_l1_depth(tile: TileShape, k: int, chip: ChipSpec) -> int:
    """K depth of one GM->L1 load of a `tile` task (see the module docstring), at most k."""
    fit = chip.l1_bytes // (2 * (tile.tm + tile.tn) * OPERAND_BYTES)
    depth = max(tile.tk, fit // L1_K_ALIGN * L1_K_ALIGN)
    return min(depth, -(-k // tile.tk) * tile.tk)


@functools.cache
def attention_kv_chunk(chip: ChipSpec) -> int:
    """Keys per cube->vector handoff of the attention pipeline (see the module docstring)."""
    rows_per_aiv = ATTN_Q_TILE_ROWS[-1] * chip.num_cube_cores // chip.num_vector_cores
    fit = (2 * chip.ub_bytes // 3) // (max(rows_per_aiv, 1) * ACCUM_BYTES)
    return max(KV_PAGE_TOKENS, fit // KV_PAGE_TOKENS * KV_PAGE_TOKENS)
