"""GEMM tilings' launch cycles without building their kernels: what the tiling search compares.

`gemm_launch_cycles` gives, for each of a shape's candidate tilings, `Device.time(kernel).cycles`
of the GemmKernel it builds (npu_sim.gemm_tiling.GemmTiling.kernel), bit for bit, all
candidates at once:
- A task's terms (npu_sim.cost_gemm.gemm_terms) depend on its M cover entry, its columns
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
What the candidates' tilings fix whatever their covers' valid rows (the distinct rows but for
those, how the tasks map onto them and the cores) is their layout (npu_sim.gemm_layout): the
search keeps it for the next token count of covers of the same tiles and patterns
(`CostedCandidates.of_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from npu_sim.cost import CostModel, TaskCosts, Unit
from npu_sim.cost_gemm import gemm_hbm_traffic, gemm_terms, reduce_terms
from npu_sim.dealing import deal
from npu_sim.gemm_layout import CandidateLayout, Tiling, candidate_layout, cover_layout
from npu_sim.tiling import gemm_reduce_tasks


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
        entry_rows: list[int] = []  # each candidate's distinct entries' valid rows in turn
        entry_base = []
        for _, _, (_, cover, _) in candidates:
            entry_base.append(len(entry_rows))
            entry_rows += cover_layout(cover)[0]
        self._price(cm, m, candidate_layout(candidates, entry_base, cm.chip, cm.bytes),
                    entry_rows)

    @classmethod
    def of_layout(cls, cm: CostModel, m: int, layout: CandidateLayout,
                  entry_rows: Sequence[int]) -> CostedCandidates:
        """CostedCandidates(cm, m, candidates) for the candidates of `layout`
        (npu_sim.gemm_layout.candidate_layout) whose distinct cover entries have these valid
        rows (the indices its rows name): the same costs, whichever candidates it was built
        from."""
        costed = cls.__new__(cls)
        costed._price(cm, m, layout, entry_rows)
        return costed

    def _price(self, cm: CostModel, m: int, layout: CandidateLayout,
               entry_rows: Sequence[int]) -> None:
        c, b = cm.chip, cm.bytes
        cores = c.num_cube_cores
        # the distinct rows, GemmTerms inputs (whole numbers, float64 exactly)
        tm, tn, tk, fit, n_cols, k_len, counts = layout.static
        m_rows = np.array(entry_rows, dtype=np.float64)[layout.row_entry]
        candidate, is_split = layout.candidate, layout.is_split
        num = len(is_split)
        mte2_bytes = (m_rows + n_cols) * k_len * b
        total = np.bincount(candidate, weights=mte2_bytes * counts, minlength=num)
        hbm_read = np.minimum(total, np.array([gemm_hbm_traffic(cm, m, n, k, menu)
                                               for n, k, menu in layout.traffic])[
            layout.traffic_of])
        inv_rate = cm.mte2_inv_rate(hbm_read / total)
        terms = gemm_terms(cm, tm, tn, tk, fit, k_len, m_rows, n_cols, layout.partial,
                           mte2_bytes, inv_rate[candidate])
        written = np.bincount(candidate, weights=terms.out_bytes * counts, minlength=num)
        # each candidate's rows are contiguous, from its first
        overhead = np.maximum.reduceat(terms.overlapped_fix, layout.first_row)

        # cube phase: each candidate's tasks, in table order, dealt round-robin onto its own
        # bins of the cores
        busy = np.bincount(layout.task_bin, weights=terms.cycles[layout.task_row],
                           minlength=num * cores).reshape(num, cores)
        busy += np.where(layout.dealt, (c.gm_latency_cycles + overhead)[:, None], 0.0)
        offset = busy.max(axis=1)
        # split-K: a partial written to L2, then the reduce phase (none: zeros, which change
        # no sum)
        hbm_write = np.where(is_split, 0.0, written)
        l2_bytes = total - hbm_read + np.where(is_split, written, 0.0)
        if layout.reduce:
            reduce = {n: _reduce_phases(cm, m, n, ss) for n, ss in layout.reduce.items()}
            phase = np.array([reduce[n][s] if s > 1 else (0.0, 0.0, 0.0)
                              for n, s in zip(layout.columns, layout.split, strict=True)])
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
        self._cycles, self._task_row, self._overhead = terms.cycles, layout.task_row, overhead
        self._first_task, self._num_tasks = layout.first_task, layout.num_tasks
        self._rows = [*layout.first_rows, len(m_rows)]  # candidate i's rows: [i] .. [i + 1]
        self._total, self._hbm_read, self._written = total, hbm_read, written
        self._split = [s > 1 for s in layout.split]
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


def _reduce_phases(cm: CostModel, m: int, n: int, splits: Sequence[int],
                   ) -> dict[int, tuple[float, float, float]]:
    """split_k -> (makespan, HBM bytes written, L2 bytes read) of the reduce phase of an
    (m, n) split-K GEMM, for each of `splits` at once: npu_sim.cost_gemm.split_k_reduce's
    terms with a row per split, each split's tasks dealt round-robin onto its own bins of the
    vector cores (in task order, as the device deals them); the byte sums are whole numbers,
    exact."""
    if not splits:
        return {}
    c, cores = cm.chip, cm.chip.num_vector_cores
    elems = gemm_reduce_tasks(m, n, c)["num_elems"].astype(np.float64)
    r = reduce_terms(cm, elems, np.array(splits)[:, None])
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
