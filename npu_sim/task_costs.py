"""What the cost model (npu_sim.cost) returns for one phase of a kernel: `TaskCosts`, the tasks'
cycles and the launch's sums, and `Unit`, where its tasks run.

Its own module because every pricing module (npu_sim.cost_gemm, npu_sim.cost_vector,
npu_sim.cost_attention_launch) builds these and npu_sim.cost, which binds those modules'
functions to CostModel, imports them: the types sit below both, without an import cycle.
npu_sim.cost re-exports both names, the public entry point for the device and the traces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


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


def empty_costs(unit: Unit, pipeline: str) -> TaskCosts:
    """TaskCosts of a phase without tasks, on `unit`, its pipeline named `pipeline`."""
    cycles = np.zeros(0)
    cycles.flags.writeable = False  # shared by every launch without such tasks
    return TaskCosts(unit, cycles, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, pipeline)
