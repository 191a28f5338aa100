"""Per-task cost model of the Da Vinci tile pipeline: cycles each task occupies its core.

Vectorized over a kernel's task table (numpy, no loop per task). The result, `TaskCosts`, is what
the device deals to cores (npu_sim.device) and turns into a KernelTiming.

Assumptions, in one place (numbers come from ChipSpec, whose comments cite them):
- Cores and units. A GEMM task runs on one AIC, a vector task on one AIV, an attention task on one
  AIC and its AIVs (a "mix" task: 1 AIC + 2 AIV on the 910B). Within a core the units are
  independent pipelines (MTE2, MTE1, cube, fixpipe on the AIC; MTE2, vector, MTE3 on the AIV)
  synchronised by flags, so a double-buffered loop runs at its slowest stage:
  time = sum of the stages of one step + (steps - 1) * slowest stage (fill + steady + drain).
- GEMM task: K is streamed in GM->L1 chunks (npu_sim.tiling.gemm_l1_depth). MTE2 reads only the
  valid rows of A and valid columns of B (virtual padding); a bucket-padded kernel's padded rows
  are real memory and are read. MTE1 moves and the cube computes the full tile (tm x tn, K padded
  to the fractal): masked rows still occupy the cube, which is the padding waste. The fixpipe
  writes the valid corner back; it overlaps the next task only when L0C holds two tiles. A
  split-K task streams its K slice only and writes an fp32 partial to the workspace (L2); the
  reduce phase on the AIVs (after an all-core sync) reads the split_k partials from L2 and
  writes the output: its time, L2 traffic and the sync are the price of filling the cores.
- GM read rates: an AIC's MTE2 reads HBM at ChipSpec.mte2_hbm_bytes_per_cycle (catlass's 80 GB/s)
  and L2 at the INI's l2_rate; an AIV's at aiv_mte2_hbm_bytes_per_cycle (the INI's ddr_rate).
  All cores together are bound by the HBM's and the L2's aggregate bandwidth (npu_sim.device).
- Where GEMM bytes come from: an operand's first read is from HBM; re-reads (A by every N tile,
  B by every M tile) hit L2 when the offline-tuned swizzle (XYS 4.3.2) can block the loop over L2:
  HBM traffic = A * ceil(N / Nb) + B * ceil(M / Mb) for the best L2 block (Mb + Nb rows of K
  fitting in half the L2; the other half holds outputs and everyone else's data). Each task's MTE2
  then runs at the byte-weighted mix of the per-core HBM and L2 rates.
- Weight-only quantized GEMM (W8A16, W4A16: GemmKernel.weights): the weights stream from HBM as
  integers with their group scales (fewer bytes: what a decode step, bound by the weight stream,
  gains), and the AIC's AIVs widen each chunk (ANTIQUANT_PASSES vector passes a weight) into a
  16-bit tile handed to the cube through L2: a mix task, the slower of the two pipelines.
- Vector task: GM->UB, compute in fp32 (vector_lanes / 2 elements per cycle per pass), UB->GM.
  Consecutive tasks on a core overlap through double-buffered queues: each task costs its slowest
  stage, and each core pays one task's fill and drain. All vector traffic is HBM traffic
  (inter-kernel reuse through L2 is not modelled, for any primitive).
- Attention task (one Q tile x one KV span): per KV chunk (npu_sim.tiling.attention_kv_chunk),
  QK on the cube -> S to GM/L2 -> softmax on the AIVs (half the rows each) -> P to GM/L2 -> PV on
  the cube, with an online-softmax update on the AIVs in the 4-stage variant; every handoff costs
  a cross-core sync in the pipeline fill, the steady state runs at the slowest unit. The 2-stage
  variant (decode-only launches, XYS 5.2.2) does QK + softmax on the AIVs, which load K while the
  AIC loads V. 3-stage vs 4-stage follows XYS Eq. 1: 3-stage when L2 holds the intermediates of
  the first wave, L2 > alpha * sum(kvLen * tileRows) with alpha the bytes of S (fp32) + P (fp16).
  KV is read from HBM once per (sequence, KV head); re-reads by other Q tiles hit L2 in
  proportion to how much of that sequence's KV fits in half the L2. S (fp32) and P (fp16) are
  written to and read back from L2, never HBM (XYS 5.2.1); so are partial outputs.
  Combine tasks run on the AIVs after the attention tasks (a second phase).
- Masks beyond causality (token trees): a small N x N block loaded once per task and applied on
  the AIVs before softmax, or the split baseline's full mask streamed with the scores
  (npu_sim.cost_mask).
- FLOPs are useful work: 2 per MAC of valid rows and columns; attention counts the scores its
  causal mask keeps. Padding waste = 1 - useful cube MACs / issued cube MACs (masked rows and
  columns, padded keys, bucket rows).
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from npu_sim.cost_attention import (
    ATTN_L2_ALPHA,
    AttentionRows,
    DecodeBatch,
    RowMemo,
    attention_rows,
)
from npu_sim.cost_mask import MaskCost, mask_cost
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import (
    WEIGHT_QUANT,
    AttentionKernel,
    CopyOp,
    GemmKernel,
    TileShape,
    VectorKernel,
    VectorOp,
    WeightQuant,
)
from npu_sim.tiling import ACCUM_BYTES, attention_kv_chunk, gemm_l1_depth, vector_tasks

L2_SHARE = 0.5  # fraction of L2 one kernel's operand reuse may count on (see the docstring)
COMBINE_OPS = 3.0  # per partial output element: weight by exp(lse - max), accumulate
# Vector passes that widen one weight (AscendC antiquant): int8 cast and scale; int4 cast, offset
# and scale.
ANTIQUANT_PASSES = {8: 2, 4: 3}
DECODE_STAGES = 2  # a launch of decodes only, QK on the vector cores: the 2-stage pipeline

# Vector ops: (input elements, output elements, fp32 vector passes) per row element, and input
# elements read once per task (the norm weight). ROPE's cos/sin rows (2 x head_dim per token,
# ~3% of its bytes for a 7B model) are left out.
_VECTOR_OPS: dict[VectorOp | CopyOp, tuple[float, float, float, int]] = {
    VectorOp.EMBED: (1, 1, 0, 0),  # gather rows through UB
    VectorOp.RMSNORM: (1, 1, 5, 1),  # cast, square-sum, scale, weight, cast
    VectorOp.ADD_RMSNORM: (2, 2, 6, 1),  # + residual add; writes residual and output
    VectorOp.ROPE: (1, 1, 4, 0),  # two multiplies, rotate-half, add
    VectorOp.SILU_MUL: (1, 0.5, 2.5, 0),  # exp, add, reciprocal, two multiplies over half
    VectorOp.KV_WRITE: (1, 1, 0, 0),  # copy into cache slots
    CopyOp.PAD_COPY: (1, 1, 0, 0),  # valid rows in; all rows out (the zero fill)
}


class Unit(enum.IntEnum):
    """Where a task runs."""

    AIC = 0  # one cube core
    AIV = 1  # one vector core
    MIX = 2  # one cube core with its vector cores (attention)


@dataclass(frozen=True, eq=False)
class TaskCosts:
    """The cost model's verdict on one phase of a kernel, before its tasks are dealt to cores."""

    unit: Unit  # where the tasks run
    cycles: np.ndarray  # float64 (num_tasks,): cycles each task occupies its core(s)
    core_overhead_cycles: float  # paid once by every core that runs a task (pipeline fill)
    cube_active_cycles: float  # cycles the cube units compute, summed over tasks
    vector_active_cycles: float  # cycles the vector units compute, summed over AIVs
    hbm_read_bytes: float  # bytes read from HBM
    hbm_write_bytes: float  # bytes written to HBM
    l2_bytes: float  # GM traffic served by L2 (the aggregate L2 bandwidth bound)
    flops: float  # useful floating-point operations
    cube_macs: float  # MACs the cube issued, padding included
    useful_cube_macs: float  # of those, on real rows and columns
    pipeline: str  # which pipeline the model ran: "gemm", "vector", "attention-3stage", ...


class GemmTerms(NamedTuple):
    """Per-task terms of GEMM tasks (CostModel.gemm_terms), float64 arrays."""

    cycles: np.ndarray  # cycles the task occupies its AIC
    chunks: np.ndarray  # GM->L1 chunks its K is streamed in
    kc: np.ndarray  # K per chunk, padded to the cube fractal
    cube: np.ndarray  # cube cycles per chunk
    out_bytes: np.ndarray  # bytes the fixpipe writes (output or fp32 partial)
    overlapped_fix: np.ndarray  # fixpipe cycles where L0C double-buffers (else 0): the core's
    #   last task's write-back, not hidden behind a next task


class ReduceTerms(NamedTuple):
    """Per-task terms of split-K reduce tasks (CostModel.reduce_terms), float64 arrays."""

    cycles: np.ndarray  # cycles the task occupies its AIV (its slowest stage)
    fill_drain: np.ndarray  # its other stages: a core's first task fills, last drains
    comp: np.ndarray  # vector compute cycles
    in_bytes: np.ndarray  # partial bytes read from L2
    out_bytes: np.ndarray  # output bytes written


def _empty(unit: Unit, pipeline: str) -> TaskCosts:
    cycles = np.zeros(0)
    cycles.flags.writeable = False  # shared by every launch without such tasks
    return TaskCosts(unit, cycles, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, pipeline)


_NO_COMBINE = _empty(Unit.AIV, "combine")  # an attention launch without split tiles

# CostModel.gemm of kernels priced ahead (CostModel.keep_gemm), by id of their task table:
# (the table, held so that its id names it while kept; CostModel._gemm_key; the costs).
# Emptied when full: sized for the GEMMs of thousands of token counts (a long simulation's).
_KEPT_GEMMS: dict[int, tuple[np.ndarray, tuple[Any, ...], TaskCosts]] = {}
_KEPT_GEMMS_LIMIT = 1 << 14


@functools.lru_cache(maxsize=1 << 12)
def _l2_blocks(rows_fit: float, n: int, tn: int, smallest_tm: int) -> tuple[tuple[int, int], ...]:
    """(Mb, reads of A) of the L2 blocks of Mb = smallest_tm x a power of two rows of A that
    leave room for at least one N tile (`CostModel.gemm_hbm_traffic`: Nb, the widest multiple
    of tn fitting rows_fit rows next to Mb, shrinks as Mb grows), Mb ascending: what an
    (m, n, k) GEMM's blocking tries for every m (the blocks below m), cached per (n, k)."""
    out = []
    mb = smallest_tm
    while (nb := (rows_fit - mb) // tn * tn) >= tn:
        out.append((mb, math.ceil(n / nb)))
        mb *= 2
    return tuple(out)


class CostModel:
    """Costs kernels on one chip for one operand dtype: fp16 or bf16 (2-byte operands, what a
    served model runs), or fp32 (4-byte operands on the cube at its fp32 rate, the calibration
    set's fp32 GEMM rows)."""

    def __init__(self, chip: ChipSpec, dtype: str = "bf16") -> None:
        if dtype not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"simulated dtype must be fp16, bf16 or fp32, got {dtype!r}")
        self.chip = chip
        self.dtype = dtype
        self.bytes = 4 if dtype == "fp32" else 2  # operand and activation bytes
        self.macs = chip.cube_macs_per_cycle(dtype)
        self.lanes32 = chip.vector_lanes / 2  # fp32 elements per vector pass per cycle
        self.aivs = chip.num_vector_cores // chip.num_cube_cores  # AIVs per AIC
        self.l2_cap = chip.l2_bytes * L2_SHARE
        # attention rows priced so far, per (pipeline stages, group size, head_dim); False
        # prices every row afresh (the reference the memo is tested against)
        self.memo_rows = True
        self._row_memos: dict[tuple[int, int, int], RowMemo] = {}

    def _mte2_inv_rate(self, hbm_fraction: Any, aiv: bool = False) -> Any:
        """Cycles per byte of an MTE2 stream (of an AIC, or an AIV) of which `hbm_fraction`
        misses L2."""
        c = self.chip
        hbm_rate = c.aiv_mte2_hbm_bytes_per_cycle if aiv else c.mte2_hbm_bytes_per_cycle
        return hbm_fraction / hbm_rate + (1.0 - hbm_fraction) / c.mte2_l2_bytes_per_cycle

    # ------------------------------------------------------------------------------- GEMM

    def gemm(self, k: GemmKernel) -> TaskCosts:
        c, b, t = self.chip, self.bytes, k.tasks
        if not len(t):
            return _empty(Unit.AIC, "gemm")
        kept = _KEPT_GEMMS.get(id(t))
        if kept is not None and kept[0] is t and kept[1] == self._gemm_key(k):
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
        hbm_read = min(total, self.gemm_hbm_traffic(k.m, k.n, k.k, k.menu))
        partial = t["k_split"] >= 0  # split-K: an fp32 partial to the workspace (L2)
        quant = WEIGHT_QUANT.get(k.weights)
        if quant is None:
            g = self.gemm_terms(tm, tn, tk, fit, k_len, rows, cols, partial, mte2_bytes,
                                self._mte2_inv_rate(hbm_read / total))
            cycles, unit, vector_active, l2_read = g.cycles, Unit.AIC, 0.0, total - hbm_read
        else:
            g, cycles, vector_active, hbm_read, l2_read = self._quantized_terms(
                quant, tm, tn, tk, fit, k_len, rows, cols, partial, hbm_read / total)
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

    def keep_gemm(self, k: GemmKernel, costs: TaskCosts) -> None:
        """Keep `costs` as gemm(k), for this cost model and any other of the same chip, operand
        bytes and MAC rate (what gemm depends on): the tiling search prices its winners' cube
        phases along with every candidate (npu_sim.gemm_cycles), so the kernels the lowering
        builds from them need not be priced again. Kept by the identity of k's task table."""
        if len(_KEPT_GEMMS) >= _KEPT_GEMMS_LIMIT:
            _KEPT_GEMMS.clear()
        _KEPT_GEMMS[id(k.tasks)] = (k.tasks, self._gemm_key(k), costs)

    def _gemm_key(self, k: GemmKernel) -> tuple[Any, ...]:
        """What gemm(k) depends on besides k's task table."""
        return (self.chip, self.bytes, self.macs, k.m, k.n, k.k, k.menu, k.valid_m, k.weights)

    def _quantized_terms(self, quant: WeightQuant, tm: np.ndarray, tn: np.ndarray,
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
        c, b = self.chip, self.bytes
        a_bytes = rows * k_len * b
        weights = cols * k_len  # weights each task multiplies
        # AIC: A as the 16-bit GEMM reads it, the widened weights from L2
        mte2_bytes = a_bytes + weights * b
        mte2_inv_rate = (a_bytes * self._mte2_inv_rate(hbm_fraction)
                         + weights * b / c.mte2_l2_bytes_per_cycle) / mte2_bytes
        g = self.gemm_terms(tm, tn, tk, fit, k_len, rows, cols, partial, mte2_bytes,
                            mte2_inv_rate)
        # AIVs (self.aivs per AIC share the tile): integers in, widened weights out to L2
        quant_bytes = weights * quant.bytes_per_weight
        read = quant_bytes * self._mte2_inv_rate(hbm_fraction, aiv=True) / self.aivs
        widen = weights * ANTIQUANT_PASSES[quant.bits] / c.vector_lanes / self.aivs
        write = weights * b / c.mte3_bytes_per_cycle / self.aivs
        steady = np.maximum(np.maximum(read, widen), write)
        first_chunk = (read + widen + write) / g.chunks  # before the cube has a tile
        cycles = first_chunk + np.maximum(g.cycles, c.task_dispatch_cycles + steady)
        streamed = float((a_bytes + quant_bytes).sum())
        widened = float(weights.sum()) * b  # written to L2 by the AIVs, read by the AIC
        return (g, cycles, float(widen.sum()) * self.aivs, hbm_fraction * streamed,
                (1.0 - hbm_fraction) * streamed + 2.0 * widened)

    def gemm_terms(self, tm: np.ndarray, tn: np.ndarray, tk: np.ndarray, fit: np.ndarray,
                   k_len: np.ndarray, rows: np.ndarray, cols: np.ndarray, partial: np.ndarray,
                   mte2_bytes: np.ndarray, mte2_inv_rate: float | np.ndarray) -> GemmTerms:
        """The per-task terms of GEMM tasks (float64 arrays of any one shape, elementwise: the
        same values for a task whichever other tasks are costed with it): tm, tn, tk of its
        tile, fit its tile's GM->L1 depth (npu_sim.tiling.gemm_l1_depth), k_len its K, rows and
        cols its valid rows and columns, partial whether it writes a split-K partial,
        mte2_bytes the bytes its MTE2 reads; mte2_inv_rate the launch's cycles per MTE2 byte
        (or each task's)."""
        c, b = self.chip, self.bytes
        depth = np.minimum(fit, np.ceil(k_len / tk) * tk)
        chunks = np.ceil(k_len / depth)
        kc = np.ceil(k_len / chunks / c.cube_k) * c.cube_k  # K per chunk, fractal-padded
        mte2 = mte2_bytes / chunks * mte2_inv_rate
        mte1 = tm * kc * b / c.mte1_l0a_bytes_per_cycle + kc * tn * b / c.mte1_l0b_bytes_per_cycle
        cube = tm * tn * kc / self.macs
        steps = kc / tk  # L0 steps per chunk, MTE1 and cube double-buffered
        l0 = np.maximum(mte1, cube) + np.minimum(mte1, cube) / steps
        body = mte2 + l0 + (chunks - 1) * np.maximum(mte2, l0)
        out_bytes = rows * cols * np.where(partial, ACCUM_BYTES, b)
        fix = out_bytes / c.fixpipe_bytes_per_cycle
        l0c_double = 2 * tm * tn * ACCUM_BYTES <= c.l0c_bytes
        cycles = c.task_dispatch_cycles + np.where(l0c_double, np.maximum(body, fix), body + fix)
        return GemmTerms(cycles=cycles, chunks=chunks, kc=kc, cube=cube, out_bytes=out_bytes,
                         overlapped_fix=np.where(l0c_double, fix, 0))

    def gemm_reduce(self, k: GemmKernel) -> TaskCosts:
        """The split-K reduce phase: each AIV sums its element range of the split_k fp32 partials
        (read from L2) in order and writes the bf16 / fp16 result. Its core overhead is the
        all-core sync between the cube and the vector phase (catlass MultiCoreSplitkMatmul)."""
        if k.reduce_tasks is None:
            return _empty(Unit.AIV, "gemm-reduce")
        return self.split_k_reduce(k.reduce_tasks, k.split_k)

    def split_k_reduce(self, t: np.ndarray, split_k: int) -> TaskCosts:
        """gemm_reduce of the GEMM_REDUCE_TASK table `t` joining `split_k` partials."""
        c = self.chip
        if not len(t) or split_k <= 1:
            return _empty(Unit.AIV, "gemm-reduce")
        r = self.reduce_terms(t["num_elems"].astype(np.float64), split_k)
        return TaskCosts(
            unit=Unit.AIV, cycles=r.cycles,
            core_overhead_cycles=c.cross_core_sync_cycles + float(r.fill_drain[0]),
            cube_active_cycles=0.0, vector_active_cycles=float(r.comp.sum()),
            hbm_read_bytes=0.0, hbm_write_bytes=float(r.out_bytes.sum()),
            l2_bytes=float(r.in_bytes.sum()),
            flops=0.0,  # the GEMM's 2 M N K already counts these adds
            cube_macs=0.0, useful_cube_macs=0.0, pipeline="gemm-reduce")

    def reduce_terms(self, elems: np.ndarray, split_k: Any) -> ReduceTerms:
        """The per-task terms of split-K reduce tasks (elementwise, broadcasting): `elems`
        output elements each (float64), the sum of `split_k` fp32 partials read from L2 (split_k
        - 1 adds and a cast per element), double-buffered through UB."""
        c = self.chip
        in_bytes = split_k * elems * ACCUM_BYTES
        ops = split_k * elems
        out_bytes = elems * self.bytes
        mte2 = in_bytes / c.mte2_l2_bytes_per_cycle
        comp = ops / self.lanes32
        mte3 = out_bytes / c.mte3_bytes_per_cycle
        slowest = np.maximum(np.maximum(mte2, comp), mte3)
        return ReduceTerms(cycles=c.task_dispatch_cycles + slowest,
                           fill_drain=mte2 + comp + mte3 - slowest, comp=comp,
                           in_bytes=in_bytes, out_bytes=out_bytes)

    def gemm_hbm_traffic(self, m: int, n: int, k: int, menu: tuple[TileShape, ...]) -> float:
        """HBM bytes of A and B of an (m, n, k) GEMM tiled from `menu`, for the best L2 blocking
        (see the module docstring): over the blocks of Mb rows of A, Mb = m or a power of two
        times the smallest tm below m, each with the widest multiple of the N tile that L2
        still holds next to them (Nb), of A read ceil(n / Nb) times and B ceil(m / Mb) times."""
        b, tn = self.bytes, menu[0].tn
        a_bytes, b_bytes, panel = m * k * b, n * k * b, k * b
        if a_bytes + b_bytes <= self.l2_cap:
            return float(a_bytes + b_bytes)
        rows_fit = self.l2_cap // panel  # rows of A plus rows of B an L2 block holds
        best = math.inf  # (whole numbers: the same least whichever order they are tried in)
        for mb, a_reads in _l2_blocks(rows_fit, n, tn, menu[-1].tm):
            if mb >= m:
                break
            best = min(best, a_bytes * a_reads + b_bytes * math.ceil(m / mb))
        nb = (rows_fit - m) // tn * tn
        if nb >= tn:
            best = min(best, a_bytes * math.ceil(n / nb) + b_bytes)
        if best == math.inf:  # K so deep that no block fits: every task streams its panels
            return math.inf
        return float(best)

    # ----------------------------------------------------------------------------- vector

    def vector(self, k: VectorKernel) -> TaskCosts:
        c, t = self.chip, k.tasks
        n = len(t)
        if not n:
            return _empty(Unit.AIV, "vector")
        if k.valid_rows is None and t is vector_tasks(k.num_rows, k.row_len, c):
            # the lowering's table: every task but the last of its first task's rows, so two
            # tasks' terms, Python floats, repeated (the same values as the general path's, hence
            # the same arrays and the same sums; the rows' sums as each row summed alone)
            rows = t["num_rows"]
            first = self._vector_terms(k, float(rows[0]), float(rows[0]), max)
            last = self._vector_terms(k, float(rows[-1]), float(rows[-1]), max)
            terms = np.repeat(np.array([first[:5], last[:5]]).T, (n - 1, 1), axis=1)
            cycles = terms[0]
            comp_sum, in_sum, out_sum, ops_sum = np.add.reduce(terms[1:], axis=1).tolist()
            fill_drain = first[5]
        else:
            rows_f = t["num_rows"].astype(np.float64)
            rows_in = rows_f
            if k.valid_rows is not None:
                rows_in = np.clip(k.valid_rows - t["row_start"], 0, t["num_rows"]).astype(
                    np.float64)
            cycles, comp, in_bytes, out_bytes, ops, fill = self._vector_terms(
                k, rows_in, rows_f, np.maximum)
            comp_sum, in_sum = float(comp.sum()), float(in_bytes.sum())
            out_sum, ops_sum = float(out_bytes.sum()), float(ops.sum())
            fill_drain = float(fill[0])
        return TaskCosts(
            unit=Unit.AIV, cycles=cycles,
            core_overhead_cycles=c.gm_latency_cycles + fill_drain, cube_active_cycles=0.0,
            vector_active_cycles=comp_sum, hbm_read_bytes=in_sum, hbm_write_bytes=out_sum,
            l2_bytes=0.0, flops=ops_sum, cube_macs=0.0, useful_cube_macs=0.0,
            pipeline="vector")

    def _vector_terms(self, k: VectorKernel, rows_in: Any, rows: Any,
                      maximum: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
        """(cycles, vector compute cycles, bytes in, bytes out, ops, fill and drain cycles) of
        vector tasks of k reading rows_in rows and writing rows rows: float64 arrays with numpy's
        maximum, or floats with Python's max (the same IEEE operations, the same values)."""
        c, b = self.chip, self.bytes
        in_f, out_f, ops_f, per_task_in = _VECTOR_OPS[k.op]
        in_bytes = (rows_in * in_f + per_task_in) * k.row_len * b
        out_bytes = rows * out_f * k.row_len * b
        ops = rows * ops_f * k.row_len
        mte2 = in_bytes / c.aiv_mte2_hbm_bytes_per_cycle
        comp = ops / self.lanes32
        mte3 = out_bytes / c.mte3_bytes_per_cycle
        slowest = maximum(maximum(mte2, comp), mte3)
        return (c.task_dispatch_cycles + slowest, comp, in_bytes, out_bytes, ops,
                mte2 + comp + mte3 - slowest)

    # -------------------------------------------------------------------------- attention

    def attention_stages(self, k: AttentionKernel) -> int:
        """2, 3 or 4: the pipeline variant of this launch (see the module docstring)."""
        u = k.unsplit
        if k.vector_qk and (u.prefill is None if u is not None else len(k.seqs) and bool(
                (k.seqs["q_len"] == 1).all())):
            return DECODE_STAGES
        if k.task_group is not None:  # the split baseline: FlashAttention-style online softmax
            return 4
        n = self.chip.num_cube_cores
        if u is not None and u.tile_work is not None and k.task_shape is not None:
            # the first tasks' tile rows x blocks
            keys_x_rows = int(u.tile_work.take(k.task_shape[:n]).sum()) * k.block_size
        else:
            first = k.leading_tasks(n)
            keys = (first["kv_block_end"] - first["kv_block_start"]) * k.block_size
            keys_x_rows = (keys * first["tile_rows"]).sum()
        in_flight = float(keys_x_rows) * ATTN_L2_ALPHA  # (whole numbers: the same either way)
        return 3 if self.chip.l2_bytes > in_flight else 4

    def attention(self, k: AttentionKernel) -> tuple[TaskCosts, TaskCosts]:
        """(attention tasks on AIC + AIVs, combine tasks on AIVs)."""
        if self._prices_from_lengths(k):
            return self._unsplit_attention(k), self._combine(k)
        stages = self.attention_stages(k)
        pipeline = f"attention-{stages}stage"
        if not k.num_tasks:
            return _empty(Unit.MIX, pipeline), self._combine(k)
        c, b, g, d = self.chip, self.bytes, k.group_size, k.head_dim
        # Price each distinct task shape once where the lowering lists them (the same work on
        # every KV head): the arrays below are per row of `t`, each row standing for `weight`
        # tasks. Trees' masks are priced per task.
        by_shape = k.task_shape is not None and k.shapes is not None and not k.tree_masks
        t, weight = (k.shapes, k.num_kv_heads) if by_shape else (k.tasks, 1)
        # a shape per sequence (each sequence one tile over all its KV, in sequence order): its
        # KV is read once, all of it from HBM (what _attention_hbm_fraction gives: exactly 1.0)
        per_seq = by_shape and len(t) == len(k.seqs)
        seqs = k.seqs if per_seq else k.seqs[t["seq"]]
        horizon = seqs["start_pos"] + t["q_offset"] + t["q_rows"]  # keys the last row sees
        k_end = np.minimum(t["kv_block_end"] * k.block_size, horizon)
        keys = np.maximum(k_end - t["kv_block_start"] * k.block_size, 0).astype(np.float64)
        q_rows = t["q_rows"].astype(np.float64)
        heads = g if k.task_heads is None else k.task_heads[:, 1].astype(np.float64)
        tile_rows = t["tile_rows"].astype(np.float64)
        horizon_reached = k_end >= horizon  # the span reaches the causal diagonal of its tile
        final = t["partial_slot"] < 0
        # Every row's K and V bytes, 2 keys d b, is a whole number, and so is their sum (far
        # below 2^53): summing the keys and scaling is the same sum, exactly.
        total_kv = weight * (2 * float(keys.sum()) * d * b)
        if per_seq:
            hbm_fraction = None  # all of it from HBM
        else:
            context = (k.seqs["start_pos"] + k.seqs["q_len"]).astype(np.float64)
            hbm_fraction = self._attention_hbm_fraction(
                k, t["seq"], 2 * keys * d * b * weight, context)[t["seq"]]
        mask = None
        if k.tree_masks:
            kl = keys / np.maximum(np.ceil(keys / attention_kv_chunk(c)), 1)  # keys per chunk
            mask = mask_cost(k, c, self.lanes32, q_rows, heads, keys, kl, horizon_reached)
        if self.memo_rows and mask is None and k.task_heads is None:  # rows seen before: memo
            terms = self._row_memo(stages, g, d).rows(self, keys, q_rows, tile_rows, final,
                                                      horizon_reached, hbm_fraction)
        else:
            terms = np.stack(attention_rows(
                self, stages, keys, q_rows, heads, tile_rows, final, horizon_reached,
                np.ones(len(keys)) if hbm_fraction is None else hbm_fraction, d, mask))
        cycles = terms[0].take(k.task_shape) if by_shape else terms[0]  # per task, to deal
        main = self._attention_costs(d, cycles, stages, terms, weight, total_kv, mask)
        return main, self._combine(k)

    def _prices_from_lengths(self, k: AttentionKernel) -> bool:
        """Whether `attention(k)` prices k from its lengths (`_unsplit_attention`): a
        meta-kernel launch that says them (AttentionKernel.unsplit), with the row memo on."""
        return (k.unsplit is not None and k.task_shape is not None and self.memo_rows
                and k.task_heads is None and not k.tree_masks and len(k.task_shape) > 0)

    def _unsplit_attention(self, k: AttentionKernel) -> TaskCosts:
        """`attention(k)[0]` of a launch none of whose tiles is split, priced from its lengths
        (AttentionKernel.unsplit): each tile, a shape, is over all the keys its last row sees,
        a final output; a decode's is one token over its context, all of its KV from HBM (the
        HBM fraction `_attention_hbm_fraction` gives a sequence of one tile: exactly 1.0), the
        rows RowMemo keeps in its decode tables; a prefill chunk's tiles share its sequence's
        fraction, and the memo keeps them by their numbers. Each row's terms are what
        `attention` prices it at (elementwise), in the same (tile) order: the same sums."""
        u = k.unsplit
        assert u is not None and k.task_shape is not None
        g, d, weight = k.group_size, k.head_dim, k.num_kv_heads
        stages = self.attention_stages(k)
        p = u.prefill
        if p is None:  # a tile per sequence, over its context
            # (its tiles' tasks dealt a tile's KV heads in a row: task_shape repeats the order)
            return self.decode_attention(DecodeBatch(u.context_lens, k.task_shape[::weight],
                                                     u.decode_tile_rows, g, d, weight), stages)
        memo = self._row_memo(stages, g, d)
        keys = u.context_lens.repeat(u.num_tiles)
        keys[list(p.position)] = p.keys
        # the prefill tiles' columns are replaced below (a decode table of every key up to the
        # longest costs fewer calls than leaving them out)
        terms = memo.decode_terms(self, float(u.decode_tile_rows), keys)
        # a few tiles: Python numbers, keys `attention`'s equal
        seq_keys: dict[int, list[int]] = {}  # each prefill sequence's tiles' keys
        for s, n in zip(p.seq, p.keys, strict=True):
            seq_keys.setdefault(s, []).append(n)
        # `_attention_hbm_fraction`'s: exactly 1.0 for a sequence of one tile; else from its
        # tiles' K/V bytes and its whole KV's, whole numbers (exact in any order)
        fraction = {s: 1.0 if len(n) == 1 else self._hbm_fraction(
            float(2 * sum(n) * d * self.bytes * weight),
            float(u.context_lens.item(s) * weight * d * self.bytes * 2), min, max)
            for s, n in seq_keys.items()}
        columns = memo.columns(self, [
            (n, q, r, True, True, fraction[s])
            for n, q, r, s in zip(p.keys, p.q_rows, p.tile_rows, p.seq, strict=True)])
        terms[:, list(p.position)] = memo.terms_at(columns)
        return self._unsplit_costs(stages, terms, keys, d, weight, terms[0].take(k.task_shape))

    def decode_attention(self, batch: DecodeBatch, stages: int = DECODE_STAGES) -> TaskCosts:
        """`attention(k)[0]` of a meta-kernel launch of decodes only, none of whose tiles is
        split, said by `batch` (its kernel's lengths and dealt order), as `_unsplit_attention`
        prices such a kernel (it calls this): each decode's row from the RowMemo's decode table
        of its context length. stages: the launch's pipeline (`attention_stages`: 2 for the
        meta-kernel's decodes)."""
        keys = batch.context_lens
        memo = self._row_memo(stages, batch.group_size, batch.head_dim)
        terms = memo.decode_terms(self, float(batch.tile_rows), keys)
        weight = batch.num_kv_heads
        # (a tile's tasks, one per KV head, dealt in a row: the order's rows repeated)
        cycles = terms[0].take(batch.order).repeat(weight)
        return self._unsplit_costs(stages, terms, keys, batch.head_dim, weight, cycles)

    def _unsplit_costs(self, stages: int, terms: np.ndarray, keys: np.ndarray, head_dim: int,
                       weight: int, cycles: np.ndarray) -> TaskCosts:
        """`_attention_costs` of an unsplit launch's tiles, priced `terms`, over `keys` (int64,
        per tile), each tile a shape of `weight` tasks, whose cycles in dealt order are
        `cycles`."""
        # the keys' sum, a whole number below 2^53: the float64 sum `attention` takes, exactly
        total_kv = weight * (2 * float(np.add.reduce(keys)) * head_dim * self.bytes)
        return self._attention_costs(head_dim, cycles, stages, terms, weight, total_kv, None)

    def _row_memo(self, stages: int, group_size: int, head_dim: int) -> RowMemo:
        memo = self._row_memos.get((stages, group_size, head_dim))
        if memo is None:
            memo = self._row_memos[stages, group_size, head_dim] = RowMemo(stages, group_size,
                                                                           head_dim)
        return memo

    def _attention_costs(self, head_dim: int, cycles: np.ndarray, stages: int,
                         terms: np.ndarray, weight: int, total_kv: float,
                         mask: MaskCost | None) -> TaskCosts:
        """The attention tasks' TaskCosts from `terms` (NUM_TERMS, rows), the rows' terms
        (npu_sim.cost_attention), each row standing for `weight` tasks (a task shape's, or a
        task); cycles: every task's, in the dealt order; total_kv: the K/V bytes all tasks
        read; mask: the rows' mask costs, if any."""
        c, d = self.chip, head_dim
        # every term's sum over the rows in one reduction (each row of `terms` contiguous: the
        # same pairwise sum as summing it alone)
        sums = AttentionRows(*np.add.reduce(terms, axis=1).tolist())
        hbm_kv = weight * sums.kv_hbm_bytes
        vec_active = weight * sums.vector_cycles * self.aivs
        mask_hbm = mask_l2 = 0.0
        if mask is not None:
            vec_active += float(mask.once_select.sum()) * self.aivs
            mask_hbm, mask_l2 = mask.hbm_bytes, mask.l2_bytes
        q_bytes = weight * sums.q_bytes
        cube_mult = 1.0 if stages == 2 else 2.0  # PV, or QK and PV, on the cube
        return TaskCosts(
            unit=Unit.MIX, cycles=cycles, core_overhead_cycles=c.gm_latency_cycles,
            cube_active_cycles=weight * sums.cube_cycles,
            vector_active_cycles=vec_active, hbm_read_bytes=hbm_kv + q_bytes + mask_hbm,
            hbm_write_bytes=weight * sums.out_bytes,
            l2_bytes=(total_kv - hbm_kv) + weight * (sums.s_bytes * 2 + sums.partial_bytes)
            + mask_l2,
            flops=weight * 4.0 * sums.visible_scores * d,
            cube_macs=weight * sums.issued_macs,
            useful_cube_macs=weight * cube_mult * sums.useful_macs * d,
            pipeline=f"attention-{stages}stage")

    def _attention_hbm_fraction(self, k: AttentionKernel, seq: np.ndarray,
                                kv_bytes: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Per sequence, the fraction of its tasks' K/V reads that come from HBM: its KV (all
        heads) once, and the re-reads by its other Q tiles in proportion to how much of that KV
        fits the L2 share. seq, kv_bytes: per task (or task shape, with its tasks' bytes), of
        some of the sequences or all; context: float64 per sequence, its start_pos + q_len."""
        total = np.bincount(seq, weights=kv_bytes, minlength=len(context))
        unique = context * k.num_kv_heads * k.head_dim * self.bytes * 2
        return np.where(total > 0, self._hbm_fraction(total, unique), 1.0)

    def _hbm_fraction(self, total: Any, unique: Any, minimum: Any = np.minimum,
                      maximum: Any = np.maximum) -> Any:
        """`_attention_hbm_fraction` of sequences whose tasks read `total` K/V bytes (more than
        none) of their `unique` bytes of KV: float64 arrays with numpy's minimum and maximum, or
        floats with Python's min and max (the same values)."""
        unique = minimum(total, unique)
        hit = minimum(1.0, self.l2_cap / maximum(unique, 1.0))
        return (unique + (total - unique) * (1.0 - hit)) / maximum(total, 1.0)

    def _combine(self, k: AttentionKernel) -> TaskCosts:
        if not k.num_combine_tasks:
            return _NO_COMBINE
        c, t = self.chip, k.combine_tasks
        rows = t["q_rows"].astype(np.float64) * k.group_size
        slots = t["num_slots"].astype(np.float64)
        in_bytes = slots * rows * (k.head_dim + 1) * ACCUM_BYTES
        ops = slots * rows * k.head_dim * COMBINE_OPS
        out_bytes = rows * k.head_dim * self.bytes
        comp = ops / self.lanes32
        cycles = c.task_dispatch_cycles + in_bytes / c.mte2_l2_bytes_per_cycle + comp + (
            out_bytes / c.mte3_bytes_per_cycle)
        return TaskCosts(
            unit=Unit.AIV, cycles=cycles, core_overhead_cycles=c.cross_core_sync_cycles,
            cube_active_cycles=0.0, vector_active_cycles=float(comp.sum()), hbm_read_bytes=0.0,
            hbm_write_bytes=float(out_bytes.sum()), l2_bytes=float(in_bytes.sum()),
            flops=float(ops.sum()), cube_macs=0.0, useful_cube_macs=0.0, pipeline="combine")
