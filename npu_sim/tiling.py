"""Tile shapes derived from the chip's buffer sizes, and the fixed-menu covers built from them.

Why these shapes (fp16/bf16 operands, 2 bytes; fp32 accumulation, 4 bytes):
- GEMM. The output tile accumulates in L0C in fp32: tm * tn * 4 <= L0C (128 KiB) gives
  tm * tn <= 32768. L0A and L0B are double-buffered so the next K step loads while the cube runs:
  2 * tm * tk * 2 <= L0A (64 KiB) and 2 * tk * tn * 2 <= L0B (64 KiB). With tk = 64 (four cube
  K-fractals per step) the default tile is 128 x 256 x 64, the shape catlass uses by default on
  the 910B. Tokens (M) are the only dynamic dimension: the tm menu is fixed, powers of two from
  one cube fractal (16) up to what the buffers allow (128 at tn = 256, 256 at tn <= 128), and
  covers M (masked rows in the last tile); smaller tm keeps decode-sized batches from computing
  mostly masked rows. N and K are static per weight, so the N tile (any multiple of 16 the
  buffers allow, tk shrinking past tn = 256) and split-K are chosen per shape, with the M cover,
  by npu_sim.gemm_tiling.
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
from npu_sim.tasks import GEMM_REDUCE_TASK, GEMM_TASK, VECTOR_TASK, TileShape

OPERAND_BYTES = 2  # fp16 / bf16 on the cube
ACCUM_BYTES = 4  # fp32 accumulators in L0C
GEMM_TK = 64  # four 16-deep cube fractals per L0 step
GEMM_TN = 256  # the default N tile (catlass L1TileShape<128, 256, 256>); the search varies it
# catlass's split-K reduce gives each AIV at least 256 B of fp32 partial sums (64 elements)
REDUCE_MIN_ELEMS = 64
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
def gemm_tk(chip: ChipSpec, tn: int, operand_bytes: int = OPERAND_BYTES) -> int:
    """L0 K step of an N tile of `tn` columns: 64 (four cube K-fractals) where the double-buffered
    tk x tn B panel fits L0B, else the largest multiple of cube_k that fits."""
    fit = chip.l0b_bytes // (2 * tn * operand_bytes)
    return max(chip.cube_k, min(GEMM_TK, fit // chip.cube_k * chip.cube_k))


@functools.cache
def gemm_menu(chip: ChipSpec, tn: int = GEMM_TN) -> tuple[TileShape, ...]:
    """The GEMM tile menu for `chip` with N tile `tn`, largest tm first: tm = 16, 32, 64, ...
    (whole cube fractals, powers of two) as far as the fp32 tm x tn tile fits L0C, the
    double-buffered tm x tk A step fits L0A and the A + B panels 256 deep fit L1 (see the module
    docstring): 128 .. 16 at tn = 256 on the 910B, 256 .. 16 at tn <= 128. Empty when no tm fits
    `tn`."""
    tk = gemm_tk(chip, tn)
    menu = []
    tm = chip.cube_m
    while (tm * tn * ACCUM_BYTES <= chip.l0c_bytes
           and 2 * tm * tk * OPERAND_BYTES <= chip.l0a_bytes
           and 2 * (tm + tn) * L1_K_ALIGN * OPERAND_BYTES <= chip.l1_bytes):
        menu.append(TileShape(tm=tm, tn=tn, tk=tk))
        tm *= 2
    return tuple(reversed(menu))


MCover = tuple[tuple[int, int, int], ...]  # ((m_start, m_rows, menu index), ...) in row order


def cover_m(m: int, menu: tuple[TileShape, ...]) -> list[tuple[int, int, int]]:
    """Cover `m` rows greedily with menu tiles: `[(m_start, m_rows, tile_index), ...]`.

    Full tiles of the largest shape that fits, then the remainder in the smallest tile that holds
    it, masked (virtual padding): 200 = 128 + 64 + 16 (8 rows valid). Never pads M itself.
    One of the candidate covers of `m_covers`.
    """
    # full tiles of the largest shape while at least that many rows are left, then the rest
    full = menu[0].tm
    start = max(m, 0) // full * full
    cover = [(s, full, 0) for s in range(0, start, full)]
    while start < m:
        rest = m - start
        fitting = [i for i, t in enumerate(menu) if t.tm <= rest]
        idx = fitting[0] if fitting else len(menu) - 1  # menu is largest first
        rows = min(menu[idx].tm, rest)
        cover.append((start, rows, idx))
        start += rows
    return cover


def _tiles_then_remainder(m: int, menu: tuple[TileShape, ...], idx: int) -> MCover:
    """Full tiles of menu[idx], the remainder in the smallest menu tile that holds it."""
    tm = menu[idx].tm
    cover = [(s, tm, idx) for s in range(0, m - m % tm, tm)]
    rest = m % tm
    if rest:
        holding = max(i for i, t in enumerate(menu) if t.tm >= rest)  # smallest that holds it
        cover.append((m - rest, rest, holding))
    return tuple(cover)


def m_covers(m: int, menu: tuple[TileShape, ...]) -> list[MCover]:
    """Candidate covers of `m` rows by `menu` tiles, for the tiling search to cost: the greedy
    cover (200 = 128 + 64 + 16), and for each tile size at least half the largest useful one,
    full tiles of it with the remainder in one masked tile (200 = 128 + 128 with 72 valid, or
    3 x 64 + 16). Each streams the weights once per m-tile; which is cheapest depends on the
    shape, so the search decides. Never pads M: only the last tile may be masked."""
    if m <= 0:
        return [()]
    useful = min(menu[0].tm, 1 << (m - 1).bit_length())  # no tile bigger than m's power of two
    covers = {tuple(cover_m(m, menu))}
    for i, t in enumerate(menu):
        if 2 * t.tm >= useful and t.tm <= useful:
            covers.add(_tiles_then_remainder(m, menu, i))
    return sorted(covers, key=len)


def k_slices(k: int, split_k: int) -> list[tuple[int, int]]:
    """(k_start, k_len) of `split_k` slices of K, as catlass splits it: K in L1_K_ALIGN-deep basic
    blocks dealt evenly, the remainder one block each to the first slices; the last slice ends
    at k."""
    blocks = -(-k // L1_K_ALIGN)
    if not 1 <= split_k <= max(blocks, 1):
        raise ValueError(f"cannot split K={k} into {split_k} slices of {L1_K_ALIGN}-deep blocks")
    out, start = [], 0
    for s in range(split_k):
        n_blocks = blocks // split_k + (s < blocks % split_k)
        end = min(k, start + n_blocks * L1_K_ALIGN)
        out.append((start, end - start))
        start = end
    return out


@functools.lru_cache(maxsize=1 << 14)
def gemm_tasks(m: int, n: int, k: int, menu: tuple[TileShape, ...], cover: MCover | None = None,
               split_k: int = 1) -> np.ndarray:
    """GEMM_TASK table for an (m, n) output over depth k: the M cover (greedy by default) times
    the N tiles of menu[0].tn times the K slices, m-tile major, the slices of one tile adjacent
    (so round-robin deals them to different cores).

    Cached by shape: every layer of a step, and every step with the same token count, reuses it.
    The last N tile is masked when n is not a multiple of tn.
    """
    tn = menu[0].tn
    m_cover = np.array(cover_m(m, menu) if cover is None else cover, dtype=np.int64).reshape(-1, 3)
    n_starts = np.arange(0, n, tn)
    slices = np.array([(0, k, -1)] if split_k == 1 else [
        (start, length, s) for s, (start, length) in enumerate(k_slices(k, split_k))],
        dtype=np.int64)
    # m-tile major, then N tiles, then K slices: each field broadcast over the three axes
    tasks = np.empty((len(m_cover), len(n_starts), len(slices)), dtype=GEMM_TASK)
    for j, field in enumerate(("m_start", "m_rows", "tile")):
        tasks[field] = m_cover[:, j, None, None]
    tasks["n_start"] = n_starts[:, None]
    tasks["n_cols"] = np.minimum(tn, n - n_starts)[:, None]
    for j, field in enumerate(("k_start", "k_len", "k_split")):
        tasks[field] = slices[:, j]
    tasks = tasks.reshape(-1)
    tasks.flags.writeable = False
    return tasks


@functools.lru_cache(maxsize=1 << 14)
def gemm_reduce_tasks(m: int, n: int, chip: ChipSpec) -> np.ndarray:
    """GEMM_REDUCE_TASK table: the (m, n) output as one row-major range of elements, dealt in
    contiguous pieces to the vector cores, at least REDUCE_MIN_ELEMS each (catlass
    MultiCoreSplitkMatmul)."""
    total = m * n
    per_task = max(REDUCE_MIN_ELEMS, -(-total // chip.num_vector_cores))
    starts = np.arange(0, total, per_task)
    tasks = np.empty(len(starts), dtype=GEMM_REDUCE_TASK)
    tasks["elem_start"] = starts
    tasks["num_elems"] = np.minimum(per_task, total - starts)
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
    menu = np.array(ATTN_Q_TILE_ROWS, dtype=np.int64)
    # the smallest menu tile holding the stacked rows (a verify: and the verify tile)
    smallest = np.searchsorted(menu, q_len * group_size)
    if verify.any():
        smallest = np.maximum(smallest, np.where(verify, ATTN_Q_TILE_ROWS.index(
            ATTN_VERIFY_TILE_ROWS), 0))
    fits = smallest < len(menu)
    tile_rows = menu[np.minimum(smallest, len(menu) - 1)]  # the largest where none fits
    tokens = np.where(fits, q_len, max(1, int(menu[-1]) // group_size))
    return tile_rows, tokens


def gemm_l1_depth(tile: TileShape, k: int, chip: ChipSpec,
                  operand_bytes: int = OPERAND_BYTES) -> int:
    """K depth of one GM->L1 load of a `tile` task (see the module docstring), at most k."""
    fit = chip.l1_bytes // (2 * (tile.tm + tile.tn) * operand_bytes)
    depth = max(tile.tk, fit // L1_K_ALIGN * L1_K_ALIGN)
    return min(depth, -(-k // tile.tk) * tile.tk)


@functools.cache
def attention_kv_chunk(chip: ChipSpec) -> int:
    """Keys per cube->vector handoff of the attention pipeline (see the module docstring)."""
    rows_per_aiv = ATTN_Q_TILE_ROWS[-1] * chip.num_cube_cores // chip.num_vector_cores
    fit = (2 * chip.ub_bytes // 3) // (max(rows_per_aiv, 1) * ACCUM_BYTES)
    return max(KV_PAGE_TOKENS, fit // KV_PAGE_TOKENS * KV_PAGE_TOKENS)
