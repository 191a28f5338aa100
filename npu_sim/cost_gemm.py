"""GEMM pricing of the cost model (npu_sim.cost): the cube phase of a GEMM kernel (16-bit or
weight-only quantized weights), its split-K reduce phase, and the L2 blocking that sets how many
of its operand bytes come from HBM; plus the costs the tiling search keeps for the kernels it
builds (keep_gemm).

Functions of the CostModel (its chip, operand bytes, MAC rate, L2 share); CostModel binds
gemm, gemm_reduce and keep_gemm as its methods. The per-task formulas (gemm_terms,
reduce_terms) and the blocking (gemm_hbm_traffic) are public for the tiling search, which
prices every candidate with them (npu_sim.gemm_cycles). The assumptions behind them are in
npu_sim.cost's docstring.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from npu_sim.task_costs import TaskCosts, Unit, empty_costs
from npu_sim.tasks import WEIGHT_QUANT, GemmKernel, TileShape, WeightQuant
from npu_sim.tiling import ACCUM_BYTES, gemm_l1_depth

if TYPE_CHECKING:
    from npu_sim.cost import CostModel

# Vector passes that widen one weight (AscendC antiquant): int8 cast and scale; int4 cast, offset
# and scale.
ANTIQUANT_PASSES = {8: 2, 4: 3}


class GemmTerms(NamedTuple):
    """Per-task terms of GEMM tasks (gemm_terms), float64 arrays."""

    cycles: np.ndarray  # cycles the task occupies its AIC
    chunks: np.ndarray  # GM->L1 chunks its K is streamed in
    kc: np.ndarray  # K per chunk, padded to the cube fractal
    cube: np.ndarray  # cube cycles per chunk
    out_bytes: np.ndarray  # bytes the fixpipe writes (output or fp32 partial)
    overlapped_fix: np.ndarray  # fixpipe cycles where L0C double-buffers (else 0): the core's
    #   last task's write-back, not hidden behind a next task


class ReduceTerms(NamedTuple):
    """Per-task terms of split-K reduce tasks (reduce_terms), float64 arrays."""

    cycles: np.ndarray  # cycles the task occupies its AIV (its slowest stage)
    fill_drain: np.ndarray  # its other stages: a core's first task fills, last drains
    comp: np.ndarray  # vector compute cycles
    in_bytes: np.ndarray  # partial bytes read from L2
    out_bytes: np.ndarray  # output bytes written


# gemm of kernels priced ahead (keep_gemm), by id of their task table: (the table, held so
# that its id names it while kept; _gemm_key; the costs). Emptied when full: sized for the
# GEMMs of thousands of token counts (a long simulation's).
_KEPT_GEMMS: dict[int, tuple[np.ndarray, tuple[Any, ...], TaskCosts]] = {}
_KEPT_GEMMS_LIMIT = 1 << 14


@functools.lru_cache(maxsize=1 << 12)
def l2_blocks(rows_fit: float, n: int, tn: int, smallest_tm: int) -> tuple[tuple[int, int], ...]:
    """(Mb, reads of A) of the L2 blocks of Mb = smallest_tm x a power of two rows of A that
    leave room for at least one N tile (`gemm_hbm_traffic`: Nb, the widest multiple of tn
    fitting rows_fit rows next to Mb, shrinks as Mb grows), Mb ascending: what an (m, n, k)
    GEMM's blocking tries for every m (the blocks below m), cached per (n, k)."""
    out = []
    mb = smallest_tm
    while (nb := (rows_fit - mb) // tn * tn) >= tn:
        out.append((mb, math.ceil(n / nb)))
        mb *= 2
    return tuple(out)


def gemm(cm: CostModel, k: GemmKernel) -> TaskCosts:
    """The cube phase of k: its GEMM tasks on the AICs (with their AIVs, Unit.MIX, where the
    weights are quantized), or the costs kept for k (keep_gemm)."""
    c, b, t = cm.chip, cm.bytes, k.tasks
    if not len(t):
        return empty_costs(Unit.AIC, "gemm")
    kept = _KEPT_GEMMS.get(id(t))
    if kept is not None and kept[0] is t and kept[1] == _gemm_key(cm, k):
        return kept[2]
    idx = t["tile"]
    tm = np.array([s.tm for s in k.menu], dtype=np.float64)[idx]
    tn = np.array([s.tn for s in k.menu], dtype=np.float64)[idx]
    tk = np.array([s.tk for s in k.menu], dtype=np.float64)[idx]
    k_len = t["k_len"].astype(np.float64)  # K of each task: all of it, or its split-K slice
    fit = np.array([gemm_l1_depth(s, k.k, c, b) for s in k.menu], dtype=np.float64)[idx]
    rows, cols = t["m_rows"].astype(np.float64), t["n_cols"].astype(np.float64)
    mte2_bytes = (rows + cols) * k_len * b  # selective read of the valid rows / columns
    total = float(mte2_bytes.sum())
    hbm_read = min(total, gemm_hbm_traffic(cm, k.m, k.n, k.k, k.menu))
    partial = t["k_split"] >= 0  # split-K: an fp32 partial to the workspace (L2)
    quant = WEIGHT_QUANT.get(k.weights)
    if quant is None:
        g = gemm_terms(cm, tm, tn, tk, fit, k_len, rows, cols, partial, mte2_bytes,
                       cm.mte2_inv_rate(hbm_read / total))
        cycles, unit, vector_active, l2_read = g.cycles, Unit.AIC, 0.0, total - hbm_read
    else:
        g, cycles, vector_active, hbm_read, l2_read = _quantized_terms(
            cm, quant, tm, tn, tk, fit, k_len, rows, cols, partial, hbm_read / total)
        unit = Unit.MIX
    useful = float((k.valid_rows() * t["n_cols"] * t["k_len"]).sum())
    issued = float((tm * tn * g.kc * g.chunks).sum())
    return TaskCosts(
        unit=unit, cycles=cycles,
        core_overhead_cycles=c.gm_latency_cycles + float(g.overlapped_fix.max()),
        cube_active_cycles=float((g.cube * g.chunks).sum()),
        vector_active_cycles=vector_active, hbm_read_bytes=hbm_read,
        hbm_write_bytes=float(g.out_bytes[~partial].sum()),
        l2_bytes=l2_read + float(g.out_bytes[partial].sum()), flops=2.0 * useful,
        cube_macs=issued, useful_cube_macs=useful,
        pipeline="gemm" if quant is None else f"gemm-{k.weights}")


def keep_gemm(cm: CostModel, k: GemmKernel, costs: TaskCosts) -> None:
    """Keep `costs` as gemm(k), for this cost model and any other of the same chip, operand
    bytes and MAC rate (what gemm depends on): the tiling search prices its winners' cube
    phases along with every candidate (npu_sim.gemm_cycles), so the kernels the lowering
    builds from them need not be priced again. Kept by the identity of k's task table."""
    if len(_KEPT_GEMMS) >= _KEPT_GEMMS_LIMIT:
        _KEPT_GEMMS.clear()
    _KEPT_GEMMS[id(k.tasks)] = (k.tasks, _gemm_key(cm, k), costs)


def _gemm_key(cm: CostModel, k: GemmKernel) -> tuple[Any, ...]:
    """What gemm(k) depends on besides k's task table."""
    return (cm.chip, cm.bytes, cm.macs, k.m, k.n, k.k, k.menu, k.valid_m, k.weights)


def _quantized_terms(cm: CostModel, quant: WeightQuant, tm: np.ndarray, tn: np.ndarray,
                     tk: np.ndarray, fit: np.ndarray, k_len: np.ndarray, rows: np.ndarray,
                     cols: np.ndarray, partial: np.ndarray, hbm_fraction: float,
                     ) -> tuple[GemmTerms, np.ndarray, float, float, float]:
    """(cube terms, task cycles, vector active cycles, HBM read bytes, L2 read bytes) of
    GEMM tasks whose weights lie in HBM weight-only quantized (W8A16 / W4A16), as the 910B's
    weight-quant matmul runs them: the AIC's AIVs read each chunk's integers and scales,
    widen them to the operand dtype (ANTIQUANT_PASSES vector passes) and hand the tile to the
    cube through L2; the cube multiplies as for 16-bit weights. Both pipelines run chunk by
    chunk, so a task takes the slower of the two plus the first chunk's widening. HBM and
    L2 shares are those of the 16-bit GEMM's blocking (the same tiles, the same re-reads)."""
    c, b = cm.chip, cm.bytes
    a_bytes = rows * k_len * b
    weights = cols * k_len  # weights each task multiplies
    # AIC: A as the 16-bit GEMM reads it, the widened weights from L2
    mte2_bytes = a_bytes + weights * b
    mte2_inv_rate = (a_bytes * cm.mte2_inv_rate(hbm_fraction)
                     + weights * b / c.mte2_l2_bytes_per_cycle) / mte2_bytes
    g = gemm_terms(cm, tm, tn, tk, fit, k_len, rows, cols, partial, mte2_bytes,
                   mte2_inv_rate)
    # AIVs (cm.aivs per AIC share the tile): integers in, widened weights out to L2
    quant_bytes = weights * quant.bytes_per_weight
    read = quant_bytes * cm.mte2_inv_rate(hbm_fraction, aiv=True) / cm.aivs
    widen = weights * ANTIQUANT_PASSES[quant.bits] / c.vector_lanes / cm.aivs
    write = weights * b / c.mte3_bytes_per_cycle / cm.aivs
    steady = np.maximum(np.maximum(read, widen), write)
    first_chunk = (read + widen + write) / g.chunks  # before the cube has a tile
    cycles = first_chunk + np.maximum(g.cycles, c.task_dispatch_cycles + steady)
    streamed = float((a_bytes + quant_bytes).sum())
    widened = float(weights.sum()) * b  # written to L2 by the AIVs, read by the AIC
    return (g, cycles, float(widen.sum()) * cm.aivs, hbm_fraction * streamed,
            (1.0 - hbm_fraction) * streamed + 2.0 * widened)


def gemm_terms(cm: CostModel, tm: np.ndarray, tn: np.ndarray, tk: np.ndarray, fit: np.ndarray,
               k_len: np.ndarray, rows: np.ndarray, cols: np.ndarray, partial: np.ndarray,
               mte2_bytes: np.ndarray, mte2_inv_rate: float | np.ndarray) -> GemmTerms:
    """The per-task terms of GEMM tasks (float64 arrays of any one shape, elementwise: the
    same values for a task whichever other tasks are costed with it): tm, tn, tk of its
    tile, fit its tile's GM->L1 depth (npu_sim.tiling.gemm_l1_depth), k_len its K, rows and
    cols its valid rows and columns, partial whether it writes a split-K partial,
    mte2_bytes the bytes its MTE2 reads; mte2_inv_rate the launch's cycles per MTE2 byte
    (or each task's)."""
    c, b = cm.chip, cm.bytes
    depth = np.minimum(fit, np.ceil(k_len / tk) * tk)
    chunks = np.ceil(k_len / depth)
    kc = np.ceil(k_len / chunks / c.cube_k) * c.cube_k  # K per chunk, fractal-padded
    mte2 = mte2_bytes / chunks * mte2_inv_rate
    mte1 = tm * kc * b / c.mte1_l0a_bytes_per_cycle + kc * tn * b / c.mte1_l0b_bytes_per_cycle
    cube = tm * tn * kc / cm.macs
    steps = kc / tk  # L0 steps per chunk, MTE1 and cube double-buffered
    l0 = np.maximum(mte1, cube) + np.minimum(mte1, cube) / steps
    body = mte2 + l0 + (chunks - 1) * np.maximum(mte2, l0)
    out_bytes = rows * cols * np.where(partial, ACCUM_BYTES, b)
    fix = out_bytes / c.fixpipe_bytes_per_cycle
    l0c_double = 2 * tm * tn * ACCUM_BYTES <= c.l0c_bytes
    cycles = c.task_dispatch_cycles + np.where(l0c_double, np.maximum(body, fix), body + fix)
    return GemmTerms(cycles=cycles, chunks=chunks, kc=kc, cube=cube, out_bytes=out_bytes,
                     overlapped_fix=np.where(l0c_double, fix, 0))


def gemm_reduce(cm: CostModel, k: GemmKernel) -> TaskCosts:
    """The split-K reduce phase: each AIV sums its element range of the split_k fp32 partials
    (read from L2) in order and writes the bf16 / fp16 result. Its core overhead is the
    all-core sync between the cube and the vector phase (catlass MultiCoreSplitkMatmul)."""
    if k.reduce_tasks is None:
        return empty_costs(Unit.AIV, "gemm-reduce")
    return split_k_reduce(cm, k.reduce_tasks, k.split_k)


def split_k_reduce(cm: CostModel, t: np.ndarray, split_k: int) -> TaskCosts:
    """gemm_reduce of the GEMM_REDUCE_TASK table `t` joining `split_k` partials."""
    c = cm.chip
    if not len(t) or split_k <= 1:
        return empty_costs(Unit.AIV, "gemm-reduce")
    r = reduce_terms(cm, t["num_elems"].astype(np.float64), split_k)
    return TaskCosts(
        unit=Unit.AIV, cycles=r.cycles,
        core_overhead_cycles=c.cross_core_sync_cycles + float(r.fill_drain[0]),
        cube_active_cycles=0.0, vector_active_cycles=float(r.comp.sum()),
        hbm_read_bytes=0.0, hbm_write_bytes=float(r.out_bytes.sum()),
        l2_bytes=float(r.in_bytes.sum()),
        flops=0.0,  # the GEMM's 2 M N K already counts these adds
        cube_macs=0.0, useful_cube_macs=0.0, pipeline="gemm-reduce")


def reduce_terms(cm: CostModel, elems: np.ndarray, split_k: Any) -> ReduceTerms:
    """The per-task terms of split-K reduce tasks (elementwise, broadcasting): `elems`
    output elements each (float64), the sum of `split_k` fp32 partials read from L2 (split_k
    - 1 adds and a cast per element), double-buffered through UB."""
    c = cm.chip
    in_bytes = split_k * elems * ACCUM_BYTES
    ops = split_k * elems
    out_bytes = elems * cm.bytes
    mte2 = in_bytes / c.mte2_l2_bytes_per_cycle
    comp = ops / cm.lanes32
    mte3 = out_bytes / c.mte3_bytes_per_cycle
    slowest = np.maximum(np.maximum(mte2, comp), mte3)
    return ReduceTerms(cycles=c.task_dispatch_cycles + slowest,
                       fill_drain=mte2 + comp + mte3 - slowest, comp=comp,
                       in_bytes=in_bytes, out_bytes=out_bytes)


def gemm_hbm_traffic(cm: CostModel, m: int, n: int, k: int, menu: tuple[TileShape, ...]) -> float:
    """HBM bytes of A and B of an (m, n, k) GEMM tiled from `menu`, for the best L2 blocking
    (see npu_sim.cost's docstring): over the blocks of Mb rows of A, Mb = m or a power of two
    times the smallest tm below m, each with the widest multiple of the N tile that L2
    still holds next to them (Nb), of A read ceil(n / Nb) times and B ceil(m / Mb) times."""
    b, tn = cm.bytes, menu[0].tn
    a_bytes, b_bytes, panel = m * k * b, n * k * b, k * b
    if a_bytes + b_bytes <= cm.l2_cap:
        return float(a_bytes + b_bytes)
    rows_fit = cm.l2_cap // panel  # rows of A plus rows of B an L2 block holds
    best = math.inf  # (whole numbers: the same least whichever order they are tried in)
    for mb, a_reads in l2_blocks(rows_fit, n, tn, menu[-1].tm):
        if mb >= m:
            break
        best = min(best, a_bytes * a_reads + b_bytes * math.ceil(m / mb))
    nb = (rows_fit - m) // tn * tn
    if nb >= tn:
        best = min(best, a_bytes * math.ceil(n / nb) + b_bytes)
    if best == math.inf:  # K so deep that no block fits: every task streams its panels
        return math.inf
    return float(best)
