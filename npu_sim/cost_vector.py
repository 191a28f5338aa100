"""Vector-kernel pricing of the cost model (npu_sim.cost): the element-wise and row-wise
primitives on the AIVs (embedding, norms, RoPE, SiLU-mul, KV writes, pad copies), from each
op's bytes in and out and fp32 vector passes per row element.

Functions of the CostModel (its chip, operand bytes, vector lanes); CostModel binds `vector`
as its method. The assumptions behind them are in npu_sim.cost's docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from npu_sim.task_costs import TaskCosts, Unit, empty_costs
from npu_sim.tasks import CopyOp, VectorKernel, VectorOp
from npu_sim.tiling import vector_tasks

if TYPE_CHECKING:
    from npu_sim.cost import CostModel

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


def vector(cm: CostModel, k: VectorKernel) -> TaskCosts:
    """k's tasks on the AIVs, each double-buffered behind the previous one on its core."""
    c, t = cm.chip, k.tasks
    n = len(t)
    if not n:
        return empty_costs(Unit.AIV, "vector")
    uniform = uniform_terms(cm, k)
    if uniform is not None:
        # two tasks' terms repeated (the same values as the general path's, hence the same
        # arrays and the same sums; the rows' sums as each row summed alone)
        first, last = uniform
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
        cycles, comp, in_bytes, out_bytes, ops, fill = _vector_terms(
            cm, k, rows_in, rows_f, np.maximum)
        comp_sum, in_sum = float(comp.sum()), float(in_bytes.sum())
        out_sum, ops_sum = float(out_bytes.sum()), float(ops.sum())
        fill_drain = float(fill[0])
    return TaskCosts(
        unit=Unit.AIV, cycles=cycles,
        core_overhead_cycles=c.gm_latency_cycles + fill_drain, cube_active_cycles=0.0,
        vector_active_cycles=comp_sum, hbm_read_bytes=in_sum, hbm_write_bytes=out_sum,
        l2_bytes=0.0, flops=ops_sum, cube_macs=0.0, useful_cube_macs=0.0,
        pipeline="vector")


def uniform_terms(cm: CostModel, k: VectorKernel,
                  ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(its first task's, its last task's) `_vector_terms`, Python floats, where k's table is
    the lowering's (npu_sim.tiling.vector_tasks: every task but the last of its first task's
    rows, so every task but the last has the first's terms); None for any other table."""
    t = k.tasks
    if not len(t) or k.valid_rows is not None or t is not vector_tasks(k.num_rows, k.row_len,
                                                                       cm.chip):
        return None
    rows = t["num_rows"]
    return (_vector_terms(cm, k, float(rows[0]), float(rows[0]), max),
            _vector_terms(cm, k, float(rows[-1]), float(rows[-1]), max))


def _vector_terms(cm: CostModel, k: VectorKernel, rows_in: Any, rows: Any,
                  maximum: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
    """(cycles, vector compute cycles, bytes in, bytes out, ops, fill and drain cycles) of
    vector tasks of k reading rows_in rows and writing rows rows: float64 arrays with numpy's
    maximum, or floats with Python's max (the same IEEE operations, the same values)."""
    c, b = cm.chip, cm.bytes
    in_f, out_f, ops_f, per_task_in = _VECTOR_OPS[k.op]
    in_bytes = (rows_in * in_f + per_task_in) * k.row_len * b
    out_bytes = rows * out_f * k.row_len * b
    ops = rows * ops_f * k.row_len
    mte2 = in_bytes / c.aiv_mte2_hbm_bytes_per_cycle
    comp = ops / cm.lanes32
    mte3 = out_bytes / c.mte3_bytes_per_cycle
    slowest = maximum(maximum(mte2, comp), mte3)
    return (c.task_dispatch_cycles + slowest, comp, in_bytes, out_bytes, ops,
            mte2 + comp + mte3 - slowest)
