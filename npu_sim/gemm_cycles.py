"""GEMM tilings' launch cycles without building their kernels: what the tiling search compares.

`gemm_launch_cycles` gives, for each of a shape's candidate tilings, `Device.time(kernel).cycles`
of the GemmKernel it builds (npu_sim.gemm_tiling.GemmTiling.kernel), bit for bit, all
candidates at once:
- A task's terms (npu_sim.cost.CostModel.gemm_terms) depend on its M cover entry, its columns
  (a full N tile, or the masked last one) and its K slice only, so they are computed once per
  distinct (candidate, cover entry, column kind, slice) row, every candidate's rows in one
  call, and expanded to each task table, in its order (m-tile major, then N tiles, then K
  slices), by indexing. The terms are elementwise IEEE operations: the same values whichever
  rows are computed together.
- The launch's byte sums (MTE2 reads, output writes, split-K partials) are sums of whole numbers
  far below 2^53 (under 1e12 for a 152k-wide, 8k-deep LM head over 2048 rows), exact in any
  order, so they are taken over the distinct rows times their counts.
- The per-core busy cycles are not whole: they are summed task by task in table order, the way
  the device deals a candidate's tasks (round-robin, np.bincount; each candidate's cores are
  bins of their own), then the slowest core sets the phase.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from npu_sim.cost import CostModel
from npu_sim.device import deal
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import TileShape
from npu_sim.tiling import MCover, gemm_l1_depth, gemm_menu, gemm_reduce_tasks, k_slices

Tiling = tuple[tuple[TileShape, ...], MCover, int]  # (menu, cover, split_k)


def gemm_launch_cycles(cm: CostModel, m: int, n: int, k: int,
                       tilings: Sequence[Tiling]) -> list[float]:
    """Cycles of one launch of `out[m, n] = x[m, k] @ w[n, k]^T` under each tiling on `cm`'s
    chip: launch overhead plus the longer of the cores' makespan (the cube phase, then the
    split-K reduce phase) and the HBM / L2 bandwidth bounds."""
    return shapes_launch_cycles(cm, m, [(n, k, tiling) for tiling in tilings])


def shapes_launch_cycles(cm: CostModel, m: int,
                         candidates: Sequence[tuple[int, int, Tiling]]) -> list[float]:
    """gemm_launch_cycles(cm, m, n, k, [tiling])[0] of each (n, k, tiling): the candidates of
    several GEMM shapes of m rows costed together, in fewer numpy calls (a candidate's cycles
    are its own, whichever others are costed with it)."""
    c, b = cm.chip, cm.bytes
    cores = c.num_cube_cores
    rows: list[tuple[int, ...]] = []  # the distinct rows: GemmTerms inputs, count, candidate
    tasks: list[np.ndarray] = []  # per candidate: its tasks' rows, in table order
    first_rows: list[int] = []  # per candidate: its first row
    # per (n, k, tn, smallest tm): all it reads from HBM
    hbm_traffic: dict[tuple[int, int, int, int], float] = {}
    for i, (n, k, (menu, cover, split_k)) in enumerate(candidates):
        entries, entry_of = _cover_layout(cover)
        kinds, offset_of = _tile_layout(n, menu[0].tn, k, split_k)
        fits = _l1_depths(menu[0].tn, k, c, b)
        first = len(rows)
        first_rows.append(first)
        rows += [(menu[tile].tm, menu[tile].tn, menu[tile].tk, fits[tile], m_rows, cols, k_len,
                  num_entries * num_kind, i)
                 for (m_rows, tile), num_entries in entries for cols, k_len, num_kind in kinds]
        tasks.append(first + entry_of * len(kinds) + offset_of)
        if (n, k, menu[0].tn, menu[-1].tm) not in hbm_traffic:
            hbm_traffic[n, k, menu[0].tn, menu[-1].tm] = cm.gemm_hbm_traffic(m, n, k, menu)
    table = np.array(rows, dtype=np.float64)
    tm, tn, tk, fit, m_rows, n_cols, k_len, counts = table[:, :8].T
    candidate = table[:, 8].astype(np.int64)
    num = len(candidates)
    split = np.array([s for _, _, (_, _, s) in candidates])
    mte2_bytes = (m_rows + n_cols) * k_len * b
    total = np.bincount(candidate, weights=mte2_bytes * counts, minlength=num).tolist()
    hbm_read = [min(total[i], hbm_traffic[n, k, menu[0].tn, menu[-1].tm])
                for i, (n, k, (menu, _, _)) in enumerate(candidates)]
    inv_rate = [cm._mte2_inv_rate(read / all_read)
                for read, all_read in zip(hbm_read, total, strict=True)]
    terms = cm.gemm_terms(tm, tn, tk, fit, k_len, m_rows, n_cols, split[candidate] > 1,
                          mte2_bytes, np.array(inv_rate)[candidate])
    written = np.bincount(candidate, weights=terms.out_bytes * counts, minlength=num).tolist()
    # each candidate's rows are contiguous, from its first
    overhead = np.maximum.reduceat(terms.overlapped_fix, np.array(first_rows))

    # cube phase: each candidate's tasks dealt round-robin onto its own bins of the cores
    task_rows = [t.reshape(-1) for t in tasks]
    bins = [i * cores + deal(len(t), cores)[0] for i, t in enumerate(task_rows)]
    busy = np.bincount(np.concatenate(bins), weights=terms.cycles[np.concatenate(task_rows)],
                       minlength=num * cores).reshape(num, cores)
    block = np.array([min(len(t), cores) for t in task_rows])
    busy += np.where(np.arange(cores) < block[:, None],
                     (c.gm_latency_cycles + overhead)[:, None], 0.0)
    offsets = busy.max(axis=1).tolist()
    splits: dict[int, dict[int, None]] = {}  # per n: the split-K factors its tilings use
    for n, _, (_, _, s) in candidates:
        if s > 1:
            splits.setdefault(n, {})[s] = None
    reduce = {n: _reduce_phases(cm, m, n, list(ss)) for n, ss in splits.items()}

    launch_cycles = c.cube_launch_s * c.clock_hz
    out = []
    for i, (n, _, (_, _, split_k)) in enumerate(candidates):
        offset = offsets[i]
        hbm_write, l2_bytes = (0.0, total[i] - hbm_read[i] + written[i]) if split_k > 1 else (
            written[i], total[i] - hbm_read[i])
        if split_k > 1:
            reduce_offset, reduce_hbm_write, reduce_l2_bytes = reduce[n][split_k]
            offset += reduce_offset
            hbm_write += reduce_hbm_write
            l2_bytes += reduce_l2_bytes
        hbm_bound = (hbm_read[i] + hbm_write) / (c.hbm_bytes_per_s / c.clock_hz)
        l2_bound = l2_bytes / (c.l2_bytes_per_s / c.clock_hz)
        out.append(launch_cycles + max(offset, hbm_bound, l2_bound))
    return out


def _reduce_phases(cm: CostModel, m: int, n: int, splits: Sequence[int],
                   ) -> dict[int, tuple[float, float, float]]:
    """split_k -> (makespan, HBM bytes written, L2 bytes read) of the reduce phase of an
    (m, n) split-K GEMM, for each of `splits` at once: CostModel.split_k_reduce's terms with a
    row per split, each split's tasks dealt round-robin onto its own bins of the vector cores
    (in task order, as the device deals them); the byte sums are whole numbers, exact."""
    if not splits:
        return {}
    c, cores = cm.chip, cm.chip.num_vector_cores
    elems = gemm_reduce_tasks(m, n, c)["num_elems"].astype(np.float64)
    r = cm.reduce_terms(elems, np.array(splits)[:, None])
    core, block = deal(len(elems), cores)
    busy = np.bincount((np.arange(len(splits))[:, None] * cores + core).reshape(-1),
                       weights=r.cycles.reshape(-1),
                       minlength=len(splits) * cores).reshape(len(splits), cores)
    busy += np.where(np.arange(cores) < block,
                     (c.cross_core_sync_cycles + r.fill_drain[:, 0])[:, None], 0.0)
    makespans = busy.max(axis=1).tolist()
    hbm_write = float(r.out_bytes.sum())
    l2_bytes = r.in_bytes.sum(axis=1).tolist()
    return {s: (makespans[i], hbm_write, l2_bytes[i]) for i, s in enumerate(splits)}


# Layouts of a task table's axes: the distinct values with their counts, and each position's
# distinct value, shaped to broadcast as (M cover entry, N tile, K slice). Cached: a search
# meets the same covers (one per GEMM of a token count), N tiles and K slices again and again.

@functools.lru_cache(maxsize=1 << 14)
def _cover_layout(cover: MCover) -> tuple[list[tuple[tuple[int, int], int]], np.ndarray]:
    """([((m_rows, tile), count), ...], int64 (entries, 1, 1) distinct index of each)."""
    entries = Counter((rows, tile) for _, rows, tile in cover)
    index = {entry: j for j, entry in enumerate(entries)}
    return list(entries.items()), np.array([index[rows, tile] for _, rows, tile in cover],
                                           dtype=np.int64).reshape(-1, 1, 1)


@functools.lru_cache(maxsize=1 << 12)
def _tile_layout(n: int, tn: int, k: int, split_k: int,
                 ) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """([(cols, k_len, count), ...]: the distinct (N tile, K slice) pairs of an m-tile's tasks,
    N tiles (full ones, the masked last one) major, K slices (at most three lengths) minor;
    int64 (1, N tiles, K slices) distinct index of each)."""
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
    return kinds, (col_of[:, None] * len(slices) + slice_of)[None]


@functools.lru_cache(maxsize=1 << 12)
def _l1_depths(tn: int, k: int, chip: ChipSpec, operand_bytes: int) -> list[int]:
    """gemm_l1_depth of each tile of the menu of N tile `tn` (keyed by tn: a menu's tile
    shapes are slow to hash)."""
    return [gemm_l1_depth(t, k, chip, operand_bytes) for t in gemm_menu(chip, tn)]
