"""Per-task cost model of the Da Vinci tile pipeline: cycles each task occupies its core.

Vectorized over a kernel's task table (numpy, no loop per task). The result, `TaskCosts`, is what
the device deals to cores (npu_sim.dealing) and turns into a KernelTiming.

This module is the entry point: `CostModel`, the chip and dtype every formula reads, with the
pricing of each kind of kernel in a module of its own, bound here as the model's methods:
npu_sim.cost_gemm (GEMM cube and split-K reduce phases, L2 blocking, kept costs),
npu_sim.cost_vector (vector kernels), npu_sim.cost_attention_launch (attention launches and
their combine phase; per-row terms and their memo in npu_sim.cost_attention, masks in
npu_sim.cost_mask). `TaskCosts` and `Unit` (npu_sim.task_costs) are importable from here.

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
  All cores together are bound by the HBM's and the L2's aggregate bandwidth (npu_sim.dealing).
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

from typing import Any

from npu_sim import cost_attention_launch, cost_gemm, cost_vector
from npu_sim.cost_attention import RowMemo
from npu_sim.hardware import ChipSpec
from npu_sim.task_costs import TaskCosts, Unit

__all__ = ["L2_SHARE", "CostModel", "TaskCosts", "Unit"]

L2_SHARE = 0.5  # fraction of L2 one kernel's operand reuse may count on (see the docstring)


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

    def mte2_inv_rate(self, hbm_fraction: Any, aiv: bool = False) -> Any:
        """Cycles per byte of an MTE2 stream (of an AIC, or an AIV) of which `hbm_fraction`
        misses L2."""
        c = self.chip
        hbm_rate = c.aiv_mte2_hbm_bytes_per_cycle if aiv else c.mte2_hbm_bytes_per_cycle
        return hbm_fraction / hbm_rate + (1.0 - hbm_fraction) / c.mte2_l2_bytes_per_cycle

    def row_memo(self, stages: int, group_size: int, head_dim: int) -> RowMemo:
        """The memo of attention rows priced so far for (stages, group_size, head_dim)."""
        memo = self._row_memos.get((stages, group_size, head_dim))
        if memo is None:
            memo = self._row_memos[stages, group_size, head_dim] = RowMemo(stages, group_size,
                                                                           head_dim)
        return memo

    # Each kind of kernel's pricing: functions of the model in their own modules, bound as its
    # methods (what the device calls per launch: no call layer in between)
    gemm = cost_gemm.gemm
    gemm_reduce = cost_gemm.gemm_reduce
    keep_gemm = cost_gemm.keep_gemm
    vector = cost_vector.vector
    attention = cost_attention_launch.attention
