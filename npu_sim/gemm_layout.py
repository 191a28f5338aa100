"""What a batch of GEMM candidate tilings fixes whatever its covers' valid rows: the rows the
tiling search prices (npu_sim.gemm_cycles) but for their valid rows and the launch's HBM
traffic, and how each candidate's tasks map onto them and onto the cores.

A candidate's cover is a list of (m_start, m_rows, tile) entries; its task table repeats each
entry over the N tiles and K slices. The distinct (m_rows, tile) entries, in order of first
appearance, and which of them each entry is (the cover's pattern) fix the table's layout; the
valid rows of the distinct entries are all a token count adds. Neighbouring token counts have
covers of the same tiles and pattern (1000 and 1001 rows: seven 128-row tiles, then 64, 32 and
a masked 16), so a search keeps the layout of its token count's candidates by their covers'
tiles and patterns (npu_sim.gemm_tiling), and prices the next token count of the same covers
with only its entries' valid rows new: some hundreds of layouts serve a whole trace.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from npu_sim.dealing import deal
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import TileShape
from npu_sim.tiling import MCover, gemm_l1_depth, gemm_menu, k_slices

Tiling = tuple[tuple[TileShape, ...], MCover, int]  # (menu, cover, split_k)


@dataclass(frozen=True, eq=False)
class CandidateLayout:
    """What candidates' tilings fix (see the module docstring); read, never change it."""

    static: np.ndarray  # float64 (7, rows): tm, tn, tk, GM->L1 depth, columns, K length and
    #   tasks of each distinct row (candidate major, then cover entry, then (N tile, K slice))
    partial: np.ndarray  # bool (rows,): whether the row's tasks write split-K partials
    row_entry: np.ndarray  # int64 (rows,): the entry whose valid rows each row has, an index
    #   into the entries' valid rows the layout is priced with
    candidate: np.ndarray  # int64 (rows,): each row's candidate
    first_rows: list[int]  # each candidate's first row (its rows are contiguous)
    first_row: np.ndarray  # int64: first_rows
    task_row: np.ndarray  # int64 (tasks,): each task's row, the candidates' tables one after
    #   the other, each in table order (`task_layout`)
    task_bin: np.ndarray  # int64 (tasks,): each task's candidate x cores + its core
    num_tasks: list[int]  # per candidate: its tasks
    first_task: list[int]  # per candidate: its first task
    dealt: np.ndarray  # bool (candidates, cores): the cores each candidate's tasks reach
    split: list[int]  # per candidate: its split-K factor
    is_split: np.ndarray  # bool per candidate: split-K
    traffic: list[tuple[int, int, tuple[TileShape, ...]]]  # the distinct (n, k, menu) whose
    #   HBM traffic the candidates read (npu_sim.cost_gemm.gemm_hbm_traffic)
    traffic_of: np.ndarray  # int64 per candidate: its index into `traffic`
    reduce: dict[int, list[int]]  # per n: the split-K factors of its split candidates, in
    #   order of first use (their reduce phases)
    columns: list[int]  # n of each candidate


def candidate_layout(candidates: Sequence[tuple[int, int, Tiling]], entry_base: Sequence[int],
                     chip: ChipSpec, operand_bytes: int) -> CandidateLayout:
    """The layout of `candidates` ((n, k, (menu, cover, split_k)) each, menus the chip's for
    their N tiles: npu_sim.tiling.gemm_menu) on `chip` for `operand_bytes`-byte operands, the
    valid rows of candidate i's distinct entries (`cover_layout`) at entry_base[i] on."""
    static: list[tuple[int, ...]] = []
    row_entry: list[int] = []
    first_rows: list[int] = []
    tasks: list[tuple[np.ndarray, np.ndarray]] = []
    traffic: dict[tuple[int, int, int, int], int] = {}  # (n, k, tn, smallest tm) -> index
    traffic_menus: list[tuple[int, int, tuple[TileShape, ...]]] = []
    traffic_of: list[int] = []
    reduce: dict[int, dict[int, None]] = {}
    for (n, k, (menu, cover, split_k)), base in zip(candidates, entry_base, strict=True):
        _, tiles, counts, pattern = cover_layout(cover)
        kinds = tile_layout(n, menu[0].tn, k, split_k)[0]
        fits = _l1_depths(menu[0].tn, k, chip, operand_bytes)
        first_rows.append(len(static))
        for j, (tile, num_entries) in enumerate(zip(tiles, counts, strict=True)):
            t = menu[tile]
            static += [(t.tm, t.tn, t.tk, fits[tile], cols, k_len, num_entries * num_kind)
                       for cols, k_len, num_kind in kinds]
            row_entry += [base + j] * len(kinds)
        tasks.append(task_layout(pattern, n, menu[0].tn, k, split_k, chip.num_cube_cores))
        key = (n, k, menu[0].tn, menu[-1].tm)
        if key not in traffic:
            traffic[key] = len(traffic_menus)
            traffic_menus.append((n, k, menu))
        traffic_of.append(traffic[key])
        if split_k > 1:
            reduce.setdefault(n, {})[split_k] = None
    num_tasks = np.array([len(relative) for relative, _ in tasks])
    cores = chip.num_cube_cores
    split = [s for _, _, (_, _, s) in candidates]
    candidate = np.repeat(np.arange(len(candidates)), np.diff(first_rows, append=len(static)))
    layout = CandidateLayout(
        static=np.ascontiguousarray(np.array(static, dtype=np.float64).reshape(-1, 7).T),
        partial=(np.array(split) > 1)[candidate],
        row_entry=np.array(row_entry, dtype=np.int64), candidate=candidate,
        first_rows=first_rows, first_row=np.array(first_rows, dtype=np.int64),
        task_row=np.concatenate([relative for relative, _ in tasks]) + np.repeat(first_rows,
                                                                              num_tasks),
        task_bin=np.concatenate([core for _, core in tasks]) + np.repeat(
            np.arange(0, len(tasks) * cores, cores), num_tasks),
        num_tasks=num_tasks.tolist(), first_task=(np.cumsum(num_tasks) - num_tasks).tolist(),
        dealt=np.arange(cores) < np.minimum(num_tasks, cores)[:, None],
        split=split, is_split=np.array(split) > 1,
        traffic=traffic_menus, traffic_of=np.array(traffic_of, dtype=np.int64),
        reduce={n: list(ss) for n, ss in reduce.items()},
        columns=[n for n, _, _ in candidates])
    for a in (layout.static, layout.partial, layout.row_entry, layout.candidate,
              layout.first_row, layout.task_row, layout.task_bin, layout.dealt,
              layout.is_split, layout.traffic_of):
        a.flags.writeable = False
    return layout


# Layouts of a task table's axes: the distinct values with their counts, and each position's
# distinct value, in table order (M cover entries; an entry's N tiles x K slices). Cached: a search
# meets the same covers (one per GEMM of a token count), N tiles and K slices again and again.

@functools.lru_cache(maxsize=1 << 14)
def cover_layout(cover: MCover) -> tuple[list[int], tuple[int, ...], list[int], bytes]:
    """Of the distinct (m_rows, tile) entries of `cover`, in order of first appearance: their
    valid rows, their tiles and how many entries each is; and the cover's pattern, the
    distinct index of each entry (int64 bytes)."""
    index: dict[tuple[int, int], int] = {}
    entry_of = [index.setdefault((rows, tile), len(index)) for _, rows, tile in cover]
    return ([rows for rows, _ in index], tuple(tile for _, tile in index),
            np.bincount(entry_of, minlength=len(index)).tolist(),
            np.array(entry_of, dtype=np.int64).tobytes())


# A long simulation meets some hundreds of (cover pattern, N tile, K split) layouts.
@functools.lru_cache(maxsize=1 << 12)
def task_layout(pattern: bytes, n: int, tn: int, k: int, split_k: int, cores: int,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(row of each task relative to its candidate's first, its core) of the task table of a
    cover of pattern `pattern` (`cover_layout`'s) over `n` columns in tiles of `tn`, K split in
    `split_k`, in table order (cover entry major, then N tile, then K slice: row entry x kinds
    + kind), dealt round-robin onto `cores` as the device deals them (npu_sim.dealing.deal).
    Read-only."""
    kinds, kind_of = tile_layout(n, tn, k, split_k)
    entry_of = np.frombuffer(pattern, dtype=np.int64)
    relative = (entry_of[:, None] * len(kinds) + kind_of).reshape(-1)
    relative.flags.writeable = False
    return relative, deal(len(relative), cores)[0]


@functools.lru_cache(maxsize=1 << 12)
def tile_layout(n: int, tn: int, k: int, split_k: int,
                ) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """([(cols, k_len, count), ...]: the distinct (N tile, K slice) pairs of an m-tile's tasks,
    N tiles (full ones, the masked last one) major, K slices (at most three lengths) minor;
    int64 distinct index of each (N tile, K slice), N tiles major)."""
    num_full, rest = divmod(n, tn)
    cols = [(tn, num_full)] * (num_full > 0) + [(rest, 1)] * (rest > 0)
    col_of = np.zeros(num_full + (rest > 0), dtype=np.int64)
    col_of[-1] = len(cols) - 1
    lengths = [k] if split_k == 1 else [length for _, length in k_slices(k, split_k)]
    slices = Counter(lengths)
    slice_index = {length: j for j, length in enumerate(slices)}
    slice_of = np.array([slice_index[length] for length in lengths], dtype=np.int64)
    kinds = [(c, k_len, num_cols * num_slices)
             for c, num_cols in cols for k_len, num_slices in slices.items()]
    return kinds, (col_of[:, None] * len(slices) + slice_of).reshape(-1)


@functools.lru_cache(maxsize=1 << 12)
def _l1_depths(tn: int, k: int, chip: ChipSpec, operand_bytes: int) -> list[int]:
    """gemm_l1_depth of each tile of the menu of N tile `tn` (keyed by tn: a menu's tile
    shapes are slow to hash)."""
    return [gemm_l1_depth(t, k, chip, operand_bytes) for t in gemm_menu(chip, tn)]
