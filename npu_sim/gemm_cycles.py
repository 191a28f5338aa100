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
Those numpy calls (~40 on arrays of ~120 rows and ~7,500 tasks: ~190 us a search, most of it
the calls' own cost, once per new token count of a simulation) are one call of a C library
(npu_sim/gemm_candidates.c, built by native_build) where it can be built: every float
operation numpy's, in its order, and gemm_hbm_traffic's own arithmetic (tests/npu_sim/
test_gemm_cycles.py holds the two to equality). Without it, numpy.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import native_build
from npu_sim.cost import CostModel, TaskCosts, Unit
from npu_sim.cost_gemm import gemm_hbm_traffic, gemm_terms, l2_blocks, reduce_terms
from npu_sim.dealing import deal
from npu_sim.gemm_layout import CandidateLayout, Tiling, candidate_layout, cover_layout
from npu_sim.tiling import ACCUM_BYTES, gemm_reduce_tasks

_P, _I = ctypes.c_void_p, ctypes.c_int64
# One small source of its own: `CostedCandidates._price` in one call (see the C file).
_LIBRARY = native_build.Library(
    "gemm_candidates", (pathlib.Path(__file__).with_name("gemm_candidates.c"),), (),
    # (-ffp-contract=off: no fused multiply-add where numpy rounds a product, then a sum)
    ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"),
    {"xy_price_candidates": (None, [_I, _P, _P, _P, _P, _P, _I, _P, _I, _P, _P, _I, _P, _I, _P,
                                    _P, _P, _P, _P, _P])},
    "the tiling search's C candidate pricing")


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
        c = cm.chip
        phase = None  # (makespan, HBM bytes written, L2 bytes read) of each reduce phase
        if layout.reduce:
            reduce = {n: _reduce_phases(cm, m, n, ss) for n, ss in layout.reduce.items()}
            phase = np.array([reduce[n][s] if s > 1 else (0.0, 0.0, 0.0)
                              for n, s in zip(layout.columns, layout.split, strict=True)])
        library = native_build.loaded(_LIBRARY)
        if library is not None:
            self._price_c(library, cm, m, layout, entry_rows, phase)
        else:
            self._price_numpy(cm, m, layout, entry_rows, phase)
        # what cube_costs reads
        self._gm_latency_cycles = c.gm_latency_cycles
        self._task_row = layout.task_row
        self._first_task, self._num_tasks = layout.first_task, layout.num_tasks
        self._rows = [*layout.first_rows, len(layout.row_entry)]  # candidate i's rows
        self._split = [s > 1 for s in layout.split]

    def _price_numpy(self, cm: CostModel, m: int, layout: CandidateLayout,
                     entry_rows: Sequence[int], phase: np.ndarray | None) -> None:
        """`_price` in numpy (see the module docstring)."""
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
        if phase is not None:
            offset = offset + phase[:, 0]
            hbm_write = hbm_write + phase[:, 1]
            l2_bytes = l2_bytes + phase[:, 2]
        hbm_bound = (hbm_read + hbm_write) / (c.hbm_bytes_per_s / c.clock_hz)
        l2_bound = l2_bytes / (c.l2_bytes_per_s / c.clock_hz)
        launch_cycles = c.cube_launch_s * c.clock_hz
        self.cycles: list[float] = (
            launch_cycles + np.maximum(np.maximum(offset, hbm_bound), l2_bound)).tolist()
        self._cycles, self._overhead = terms.cycles, overhead
        self._total, self._hbm_read, self._written = total, hbm_read, written
        self._active = terms.cube * terms.chunks  # per task of the row: cube active cycles
        self._macs = tm * tn * terms.kc * terms.chunks  # and MACs issued
        self._useful = m_rows * n_cols * k_len * counts  # useful MACs of the row's tasks

    def _price_c(self, library: ctypes.CDLL, cm: CostModel, m: int, layout: CandidateLayout,
                 entry_rows: Sequence[int], phase: np.ndarray | None) -> None:
        """`_price_numpy` in one call of gemm_candidates.c: the same arrays, bit for bit."""
        args = _c_args(cm, layout)
        r = args.num_rows
        # per row m_rows, cycles, active, macs, useful; per candidate total, hbm_read, written,
        # overhead, launch
        out = np.empty(5 * (r + args.num))
        entries = np.array(entry_rows, dtype=np.float64)
        phase = None if phase is None else np.ascontiguousarray(phase, dtype=np.float64)
        # the C's scratch, this call's own (ctypes lets go of the GIL: another thread may be
        # pricing the same layout): each distinct shape's traffic, then the cores' busy cycles
        scratch = np.empty(args.scratch_size)
        at = scratch.ctypes.data
        library.xy_price_candidates(
            m, *args.layout, entries.ctypes.data, *args.tasks, args.traffic,
            None if phase is None else phase.ctypes.data, args.consts, out.ctypes.data, at,
            at + 8 * args.num_traffic)
        _, self._cycles, self._active, self._macs, self._useful = out[:5 * r].reshape(5, r)
        self._total, self._hbm_read, self._written, self._overhead, launch = out[
            5 * r:].reshape(5, args.num)
        self.cycles = launch.tolist()

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


class _TrafficArgs(ctypes.Structure):
    """gemm_candidates.c's traffic_args: the distinct (n, k, N tile) of a layout's candidates
    and their L2 blocks (npu_sim.cost_gemm.gemm_hbm_traffic's)."""

    _fields_ = [("num", _I), ("shape", _P), ("rows_fit", _P), ("blocks", _P),
                ("num_blocks", _I), ("of", _P), ("bytes", _I), ("l2_cap", ctypes.c_double)]


@dataclass(frozen=True, eq=False)
class _CArgs:
    """What xy_price_candidates reads of a layout and its cost model, whatever the token count
    (addresses): built once per layout (the search keeps one for every token count of its
    covers' tiles and patterns)."""

    num_rows: int
    num: int  # candidates
    layout: tuple[int, ...]  # the arguments static_ .. row_entry
    tasks: tuple[int, ...]  # the arguments candidate .. cores
    traffic: int  # tr: a _TrafficArgs
    consts: int  # k: float64 (NUM_K,), gemm_candidates.c's constants in its order
    num_traffic: int  # distinct (n, k, N tile): the C's traffic scratch
    scratch_size: int  # float64s of scratch a call needs: traffic, then busy (candidates x cores)
    held: tuple[Any, ...]  # what the addresses point into


@functools.lru_cache(maxsize=1 << 9)  # (the search keeps as many plans, one layout each)
def _c_args(cm: CostModel, layout: CandidateLayout) -> _CArgs:
    """The arguments of xy_price_candidates that depend on the layout and `cm` only."""
    c = cm.chip
    f, i, b = np.float64, np.int64, np.bool_
    for a, dtype in ((layout.static, f), (layout.partial, b), (layout.row_entry, i),
                     (layout.candidate, i), (layout.first_row, i), (layout.task_row, i),
                     (layout.task_bin, i), (layout.dealt, b), (layout.traffic_of, i)):
        assert a.flags.c_contiguous and a.dtype == dtype, (a.dtype, a.flags.c_contiguous)
    shapes, rows_fit, blocks = [], [], []
    for n, k, menu in layout.traffic:  # as gemm_hbm_traffic takes them
        rows_fit.append(cm.l2_cap // (k * cm.bytes))
        shapes.append((n, k, menu[0].tn, len(blocks) // 2))
        blocks += [x for pair in l2_blocks(rows_fit[-1], n, menu[0].tn, menu[-1].tm)
                   for x in pair]
    arrays = (np.array(shapes, dtype=np.int64), np.array(rows_fit, dtype=np.float64),
              np.array(blocks or [0], dtype=np.int64))
    traffic = _TrafficArgs(len(shapes), *(a.ctypes.data for a in arrays), len(blocks) // 2,
                           layout.traffic_of.ctypes.data, cm.bytes, cm.l2_cap)
    consts = np.array([cm.bytes, c.cube_k, c.mte1_l0a_bytes_per_cycle,
                       c.mte1_l0b_bytes_per_cycle, cm.macs, c.fixpipe_bytes_per_cycle,
                       c.l0c_bytes, ACCUM_BYTES, c.task_dispatch_cycles, c.gm_latency_cycles,
                       c.mte2_hbm_bytes_per_cycle, c.mte2_l2_bytes_per_cycle,
                       c.hbm_bytes_per_s / c.clock_hz, c.l2_bytes_per_s / c.clock_hz,
                       c.cube_launch_s * c.clock_hz], dtype=np.float64)
    num_rows, num = len(layout.row_entry), len(layout.is_split)
    return _CArgs(
        num_rows=num_rows, num=num,
        layout=(layout.static.ctypes.data, layout.partial.ctypes.data,
                layout.row_entry.ctypes.data),
        tasks=(layout.candidate.ctypes.data, num_rows, layout.first_row.ctypes.data, num,
               layout.task_row.ctypes.data, layout.task_bin.ctypes.data, len(layout.task_row),
               layout.dealt.ctypes.data, c.num_cube_cores),
        traffic=ctypes.addressof(traffic), consts=consts.ctypes.data,
        num_traffic=len(shapes), scratch_size=len(shapes) + num * c.num_cube_cores,
        held=(layout, arrays, traffic, consts))
