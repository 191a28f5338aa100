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
`CostedCandidates.cube_costs` gives a candidate's cube phase, CostModel.gemm of its kernel bit
for bit, from the same rows: what the search keeps of its winners for the device (a kernel
priced once); its sums that are not of whole numbers are taken over its tasks in table order,
as CostModel.gemm takes them.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from npu_sim.cost import CostModel, TaskCosts, Unit
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
    return CostedCandidates(cm, m, candidates).cycles


class CostedCandidates:
    """The candidates of several GEMM shapes of m rows, (n, k, tiling) each, costed together:
    `cycles`, each one's launch cycles (shapes_launch_cycles), and `cube_costs(i)`, the
    cube phase of candidate i (CostModel.gemm of the kernel its tiling builds, bit for bit)."""

    def __init__(self, cm: CostModel, m: int,
                 candidates: Sequence[tuple[int, int, Tiling]]) -> None:
        c, b = cm.chip, cm.bytes
        cores = c.num_cube_cores
        rows: list[tuple[int, ...]] = []  # the distinct rows: GemmTerms inputs, count, candidate
        # per candidate: its first row, its cover entries' distinct entry and its (N tile,
        # K slice) pairs' distinct kind (the task table's two axes), how many kinds it has
        first_rows: list[int] = []
        layouts: list[tuple[np.ndarray, np.ndarray]] = []  # (relative row, core) of each task
        # per (n, k, tn, smallest tm): all it reads from HBM
        hbm_traffic: dict[tuple[int, int, int, int], float] = {}
        for i, (n, k, (menu, cover, split_k)) in enumerate(candidates):
            entries, pattern = _cover_layout(cover)
            kinds = _tile_layout(n, menu[0].tn, k, split_k)[0]
            fits = _l1_depths(menu[0].tn, k, c, b)
            first_rows.append(len(rows))
            rows += [(menu[tile].tm, menu[tile].tn, menu[tile].tk, fits[tile], m_rows, cols,
                      k_len, num_entries * num_kind, i)
                     for (m_rows, tile), num_entries in entries
                     for cols, k_len, num_kind in kinds]
            layouts.append(_task_layout(pattern, n, menu[0].tn, k, split_k, cores))
            if (n, k, menu[0].tn, menu[-1].tm) not in hbm_traffic:
                hbm_traffic[n, k, menu[0].tn, menu[-1].tm] = cm.gemm_hbm_traffic(m, n, k, menu)
        # (whole numbers: read as int64, the fast way, then made float64 exactly)
        table = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64).reshape(
            len(rows), -1).astype(np.float64)
        tm, tn, tk, fit, m_rows, n_cols, k_len, counts = table[:, :8].T
        candidate = table[:, 8].astype(np.int64)
        num = len(candidates)
        split = np.array([s for _, _, (_, _, s) in candidates])
        mte2_bytes = (m_rows + n_cols) * k_len * b
        total = np.bincount(candidate, weights=mte2_bytes * counts, minlength=num)
        hbm_read = np.minimum(total, [hbm_traffic[n, k, menu[0].tn, menu[-1].tm]
                                      for n, k, (menu, _, _) in candidates])
        inv_rate = cm._mte2_inv_rate(hbm_read / total)
        terms = cm.gemm_terms(tm, tn, tk, fit, k_len, m_rows, n_cols, split[candidate] > 1,
                              mte2_bytes, inv_rate[candidate])
        written = np.bincount(candidate, weights=terms.out_bytes * counts, minlength=num)
        # each candidate's rows are contiguous, from its first
        overhead = np.maximum.reduceat(terms.overlapped_fix, np.array(first_rows))

        # cube phase: each candidate's tasks, in table order, dealt round-robin onto its own
        # bins of the cores
        task_row, task_bin, num_tasks = _task_rows(first_rows, layouts, cores)
        busy = np.bincount(task_bin, weights=terms.cycles[task_row],
                           minlength=num * cores).reshape(num, cores)
        block = np.minimum(num_tasks, cores)
        busy += np.where(np.arange(cores) < block[:, None],
                         (c.gm_latency_cycles + overhead)[:, None], 0.0)
        offset = busy.max(axis=1)
        # split-K: a partial written to L2, then the reduce phase (none: zeros, which change
        # no sum)
        is_split = split > 1
        hbm_write = np.where(is_split, 0.0, written)
        l2_bytes = total - hbm_read + np.where(is_split, written, 0.0)
        splits: dict[int, dict[int, None]] = {}  # per n: the split-K factors its tilings use
        for n, _, (_, _, s) in candidates:
            if s > 1:
                splits.setdefault(n, {})[s] = None
        if splits:
            reduce = {n: _reduce_phases(cm, m, n, list(ss)) for n, ss in splits.items()}
            phase = np.array([reduce[n][s] if s > 1 else (0.0, 0.0, 0.0)
                              for n, _, (_, _, s) in candidates])
            offset = offset + phase[:, 0]
            hbm_write = hbm_write + phase[:, 1]
            l2_bytes = l2_bytes + phase[:, 2]
        hbm_bound = (hbm_read + hbm_write) / (c.hbm_bytes_per_s / c.clock_hz)
        l2_bound = l2_bytes / (c.l2_bytes_per_s / c.clock_hz)
        launch_cycles = c.cube_launch_s * c.clock_hz
        self.cycles: list[float] = (
            launch_cycles + np.maximum(np.maximum(offset, hbm_bound), l2_bound)).tolist()
        # what cube_costs reads
        self._gm_latency_cycles = c.gm_latency_cycles
        self._cycles, self._task_row, self._overhead = terms.cycles, task_row, overhead
        self._first_task = (np.cumsum(num_tasks) - num_tasks).tolist()
        self._num_tasks = num_tasks.tolist()
        self._rows = [*first_rows, len(rows)]  # candidate i's rows: [i] .. [i + 1]
        self._total, self._hbm_read, self._written = total, hbm_read, written
        self._split = is_split.tolist()
        self._active = terms.cube * terms.chunks  # per task of the row: cube active cycles
        self._macs = tm * tn * terms.kc * terms.chunks  # and MACs issued
        self._useful = m_rows * n_cols * k_len * counts  # useful MACs of the row's tasks

    def cube_costs(self, i: int) -> TaskCosts:
        """CostModel.gemm of candidate i's kernel, bf16 weights (see the module docstring):
        its tasks' cycles and the sums over its tasks in table order where they are not
        whole; the useful MACs and the byte sums, whole numbers, over its rows."""
        first = self._first_task[i]
        rows = self._task_row[first:first + self._num_tasks[i]]
        cycles = self._cycles[rows]
        cycles.flags.writeable = False  # kept (CostModel.keep_gemm)
        hbm_read = float(self._hbm_read[i])
        written = float(self._written[i])
        useful = float(self._useful[self._rows[i]:self._rows[i + 1]].sum())
        return TaskCosts(
            unit=Unit.AIC, cycles=cycles,
            core_overhead_cycles=self._gm_latency_cycles + float(self._overhead[i]),
            cube_active_cycles=float(self._active[rows].sum()),
            vector_active_cycles=0.0, hbm_read_bytes=hbm_read,
            hbm_write_bytes=0.0 if self._split[i] else written,
            l2_bytes=float(self._total[i]) - hbm_read + (written if self._split[i] else 0.0),
            flops=2.0 * useful, cube_macs=float(self._macs[rows].sum()),
            useful_cube_macs=useful, pipeline="gemm")


def _task_rows(first_rows: list[int], layouts: list[tuple[np.ndarray, np.ndarray]],
               cores: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct row of each task, its bin: its candidate x cores + its core; tasks per
    candidate) of the candidates' task tables one after the other, each candidate's rows from
    its first and its tasks laid out by `_task_layout`."""
    num_tasks = np.array([len(relative) for relative, _ in layouts])
    task_row = np.concatenate([relative for relative, _ in layouts]) + np.repeat(first_rows,
                                                                              num_tasks)
    task_bin = np.concatenate([core for _, core in layouts]) + np.repeat(
        np.arange(0, len(layouts) * cores, cores), num_tasks)
    return task_row, task_bin, num_tasks


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
# distinct value, in table order (M cover entries; an entry's N tiles x K slices). Cached: a search
# meets the same covers (one per GEMM of a token count), N tiles and K slices again and again.

@functools.lru_cache(maxsize=1 << 14)
def _cover_layout(cover: MCover) -> tuple[list[tuple[tuple[int, int], int]], bytes]:
    """([((m_rows, tile), count), ...], the distinct index of each entry: int64 bytes, what
    `_task_layout` keys its layouts by, shared by the covers of the same pattern)."""
    entries = Counter((rows, tile) for _, rows, tile in cover)
    index = {entry: j for j, entry in enumerate(entries)}
    return list(entries.items()), np.array([index[rows, tile] for _, rows, tile in cover],
                                           dtype=np.int64).tobytes()


# A long simulation meets some hundreds of (cover pattern, N tile, K split) layouts: a token
# count's GEMMs are priced with the layouts of its neighbours' (same tiles, other rows).
@functools.lru_cache(maxsize=1 << 12)
def _task_layout(pattern: bytes, n: int, tn: int, k: int, split_k: int, cores: int,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(row of each task relative to its candidate's first, its core) of the task table of a
    cover whose entries are `pattern` (`_cover_layout`'s) over `n` columns in tiles of `tn`,
    K split in `split_k`, in table order (cover entry major, then N tile, then K slice: row
    entry x kinds + kind), dealt round-robin onto `cores` as the device deals them
    (npu_sim.device.deal). Read-only."""
    kinds, kind_of = _tile_layout(n, tn, k, split_k)
    entry_of = np.frombuffer(pattern, dtype=np.int64)
    relative = (entry_of[:, None] * len(kinds) + kind_of).reshape(-1)
    relative.flags.writeable = False
    return relative, deal(len(relative), cores)[0]


@functools.lru_cache(maxsize=1 << 12)
def _tile_layout(n: int, tn: int, k: int, split_k: int,
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
