"""One launch priced and dealt to the AI cores: the cost model's task costs (npu_sim.cost) put on
cores, phase after phase, and summed into a KernelTiming (npu_sim.device times launches with it).

Dealing tasks to cores (block_dim = min(tasks, cores)):
- GEMM tasks on the AICs and vector / combine / split-K reduce tasks on the AIVs round-robin in
  table order (task i on core i mod block_dim), as catlass and ATB kernels walk
  `taskIdx += coreNum`; a second phase (combine, reduce) starts when the first has ended;
- meta-attention tasks, already sorted heaviest first by the lowering, in the paper's symmetric
  round-robin 1..N, N..1 (XYS 4.3.1), each on an AIC and its AIVs;
- split-baseline attention: whole task groups (a core's run of the PFA / IFA split) round-robin
  in order;
- collectives (tensor parallelism) run no AI-core task: they hold the stream for their time over
  HCCS (npu_sim.collectives).

A launch takes its launch overhead plus the busiest core's time, or the shared HBM / L2
bandwidth bound where that is longer (`makespan`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from npu_sim.collectives import bytes_moved, collective_seconds
from npu_sim.cost import CostModel, Unit
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import AttentionKernel, CollectiveKernel, GemmKernel, Kernel, VectorKernel
from npu_sim.trace import KernelTiming


def kernel_timing(kernel: Kernel, chip: ChipSpec, cm: CostModel, timeline: bool) -> KernelTiming:
    """One launch of `kernel` on `chip`, priced by `cm` (nothing computed); with each task's
    unit, core, start and cycles where `timeline`."""
    if isinstance(kernel, CollectiveKernel):
        return _collective_timing(kernel, chip)
    s = dealt(kernel, chip, cm, timeline)
    return KernelTiming(
        primitive=kernel.primitive, name=kernel.name, shape=_shape_label(kernel),
        pipeline=s.pipeline, cycles=s.cycles, seconds=s.cycles / chip.clock_hz,
        launch_cycles=s.launch_cycles, block_dim=s.block_dim, bound=s.bound,
        cube_busy_cycles=_frozen(s.cube_busy), vector_busy_cycles=_frozen(s.vector_busy),
        cube_active_cycles=s.cube_active, vector_active_cycles=s.vector_active,
        hbm_read_bytes=s.hbm_read, hbm_write_bytes=s.hbm_write, flops=s.flops,
        cube_macs=s.cube_macs, useful_cube_macs=s.useful_cube_macs,
        num_tasks=s.num_tasks, kernel=kernel, **s.timeline)


def deal(num_tasks: int, num_cores: int, symmetric: bool = False,
         groups: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(core of each task, block_dim): see the module docstring. Without groups the cores are
    a function of the task count: read-only arrays, cached."""
    if groups is not None:
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        block = min(len(first), num_cores)
        return rank[inverse] % max(block, 1), block
    return _round_robin(num_tasks, num_cores, symmetric)


@functools.lru_cache(maxsize=512)  # task counts of a run: the attention kernels' vary most
def _round_robin(num_tasks: int, num_cores: int, symmetric: bool) -> tuple[np.ndarray, int]:
    i = np.arange(num_tasks)
    block = min(num_tasks, num_cores)
    if not symmetric or block == 0:
        core = i % max(block, 1)
    else:
        p = i % (2 * block)
        core = np.where(p < block, p, 2 * block - 1 - p)
    core.flags.writeable = False
    return core, block


def dealt(kernel: Kernel, chip: ChipSpec, cm: CostModel, timeline: bool) -> Dealt:
    """A GEMM, vector or attention launch's phases priced by `cm`, dealt to `chip`'s cores and
    summed; with each task's core and start where `timeline`."""
    c = chip
    groups, symmetric = None, False
    if isinstance(kernel, GemmKernel):
        phases = [cm.gemm(kernel), cm.gemm_reduce(kernel)]
        launch_s = c.cube_launch_s
    elif isinstance(kernel, VectorKernel):
        phases = [cm.vector(kernel)]
        launch_s = c.vector_launch_s
    elif isinstance(kernel, AttentionKernel):
        phases = list(cm.attention(kernel))
        launch_s = c.cube_launch_s
        groups, symmetric = kernel.task_group, kernel.task_group is None
    else:
        raise TypeError(f"not a kernel: {type(kernel).__name__}")

    cube_busy = np.zeros(c.num_cube_cores)
    vector_busy = np.zeros(c.num_vector_cores)
    units, cores, starts, durations = [], [], [], []
    offset = 0.0  # phases run one after the other
    block_dim = 0
    # the phases' sums, in phase order
    hbm_read = hbm_write = l2_bytes = cube_active = vector_active = flops = 0.0
    cube_macs = useful_cube_macs = 0.0
    num_tasks = 0
    for i, phase in enumerate(phases):
        hbm_read += phase.hbm_read_bytes
        hbm_write += phase.hbm_write_bytes
        l2_bytes += phase.l2_bytes
        cube_active += phase.cube_active_cycles
        vector_active += phase.vector_active_cycles
        flops += phase.flops
        cube_macs += phase.cube_macs
        useful_cube_macs += phase.useful_cube_macs
        n = len(phase.cycles)
        num_tasks += n
        if n == 0:
            continue
        on_aiv = phase.unit == Unit.AIV
        core, block = deal(n, c.num_vector_cores if on_aiv else c.num_cube_cores,
                           symmetric and i == 0, groups if i == 0 else None)
        busy = np.bincount(core, weights=phase.cycles,
                           minlength=c.num_vector_cores if on_aiv else c.num_cube_cores)
        busy[:block] += phase.core_overhead_cycles
        if timeline:
            units.append(np.full(n, phase.unit, dtype=np.int8))
            cores.append(core)
            starts.append(_starts(core, phase.cycles) + phase.core_overhead_cycles + offset)
            durations.append(phase.cycles)
        if on_aiv:
            vector_busy += busy
        else:
            cube_busy += busy
            block_dim = max(block_dim, block)
            if phase.unit == Unit.MIX:
                vector_busy += np.repeat(busy, cm.aivs)[: c.num_vector_cores]
        if on_aiv and block_dim == 0:
            block_dim = block
        offset += float(busy.max())

    span, bound, stretch = makespan(offset, hbm_read + hbm_write, l2_bytes, c)
    if stretch != 1.0:  # (times 1.0 changes no bit)
        cube_busy, vector_busy = cube_busy * stretch, vector_busy * stretch
    launch_cycles = launch_s * c.clock_hz
    return Dealt(
        pipeline=phases[0].pipeline, cycles=launch_cycles + span,
        launch_cycles=launch_cycles, block_dim=block_dim, bound=bound,
        cube_busy=cube_busy, vector_busy=vector_busy, cube_active=cube_active,
        vector_active=vector_active, hbm_read=hbm_read, hbm_write=hbm_write, flops=flops,
        cube_macs=cube_macs, useful_cube_macs=useful_cube_macs, num_tasks=num_tasks,
        timeline=(_task_timeline(units, cores, starts, durations, stretch)
                  if timeline else _NO_TIMELINE))


class Dealt(NamedTuple):
    """A launch priced and dealt (`dealt`): KernelTiming's values but its labels, the
    busy arrays writable, the per-task timeline as KernelTiming's fields."""

    pipeline: str
    cycles: float
    launch_cycles: float
    block_dim: int
    bound: str
    cube_busy: np.ndarray
    vector_busy: np.ndarray
    cube_active: float
    vector_active: float
    hbm_read: float
    hbm_write: float
    flops: float
    cube_macs: float
    useful_cube_macs: float
    num_tasks: int
    timeline: dict[str, np.ndarray]


def _shape_label(kernel: Kernel) -> str:
    """KernelTiming.shape of a GEMM, vector or attention kernel."""
    if isinstance(kernel, GemmKernel):
        return f"M={kernel.m} N={kernel.n} K={kernel.k}" + (
            f" (valid M={kernel.valid_m})" if kernel.valid_m is not None else "")
    if isinstance(kernel, VectorKernel):
        return f"{kernel.op.value} {kernel.num_rows}x{kernel.row_len}"
    assert isinstance(kernel, AttentionKernel)
    return (f"seqs={kernel.num_seqs} tokens={kernel.num_tokens} "
            f"tasks={kernel.num_tasks}+{kernel.num_combine_tasks}")


def makespan(cores_cycles: float, hbm_bytes: float, l2_bytes: float, c: ChipSpec,
              ) -> tuple[float, str, float]:
    """(makespan in cycles, what set it, stretch) of a launch whose phases keep the cores busy
    `cores_cycles` and that moves these HBM and L2 bytes: the longest of the cores' time and
    the shared HBM and L2 bandwidth bounds (the first of equals: "cores", "hbm", "l2"); the
    cores wait on the bandwidth, their busy cycles stretched by makespan / cores_cycles."""
    hbm_bound = hbm_bytes / (c.hbm_bytes_per_s / c.clock_hz)
    l2_bound = l2_bytes / (c.l2_bytes_per_s / c.clock_hz)
    makespan, bound = cores_cycles, "cores"
    if hbm_bound > makespan:
        makespan, bound = hbm_bound, "hbm"
    if l2_bound > makespan:
        makespan, bound = l2_bound, "l2"
    return makespan, bound, makespan / cores_cycles if cores_cycles else 1.0


def _starts(core: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """Start of each task on its core when each core runs its tasks in table order."""
    order = np.argsort(core, kind="stable")
    sorted_cycles = cycles[order]
    before = np.cumsum(sorted_cycles) - sorted_cycles  # exclusive prefix sum over all tasks
    sorted_core = core[order]
    first = np.searchsorted(sorted_core, sorted_core, side="left")  # each core's first task
    start = np.empty_like(before)
    start[order] = before - before[first]
    return start


def _collective_timing(kernel: CollectiveKernel, c: ChipSpec) -> KernelTiming:
    """A collective holds the stream for its ring time; no AI core runs a task of it."""
    seconds = collective_seconds(kernel.op, kernel.num_bytes, kernel.world_size, c)
    moved = bytes_moved(kernel.op, kernel.num_bytes, kernel.world_size)
    none = _frozen(np.zeros(0))
    return KernelTiming(
        primitive=kernel.primitive, name=kernel.name,
        shape=f"{kernel.op.value} {kernel.num_bytes} B x{kernel.world_size}",
        pipeline=f"hccs-{kernel.op.value}", cycles=seconds * c.clock_hz, seconds=seconds,
        launch_cycles=min(seconds, c.collective_launch_s) * c.clock_hz, block_dim=0,
        bound="hccs", cube_busy_cycles=_frozen(np.zeros(c.num_cube_cores)),
        vector_busy_cycles=_frozen(np.zeros(c.num_vector_cores)), cube_active_cycles=0.0,
        vector_active_cycles=0.0, hbm_read_bytes=moved, hbm_write_bytes=moved, flops=0.0,
        cube_macs=0.0, useful_cube_macs=0.0, num_tasks=0,
        task_unit=_frozen(np.zeros(0, dtype=np.int8)),
        task_core=_frozen(np.zeros(0, dtype=np.int64)), task_start_cycles=none,
        task_cycles=none, kernel=kernel)


def _task_timeline(units: list[np.ndarray], cores: list[np.ndarray], starts: list[np.ndarray],
                   durations: list[np.ndarray], stretch: float) -> dict[str, np.ndarray]:
    """KernelTiming's per-task fields from the phases' pieces."""
    return {"task_unit": _frozen(_cat(units, np.int8)),
            "task_core": _frozen(_cat(cores, np.int64)),
            "task_start_cycles": _frozen(_cat(starts, np.float64) * stretch),
            "task_cycles": _frozen(_cat(durations, np.float64) * stretch)}


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# A timing-only device keeps no per-task timeline: every timing shares these empty arrays.
_NO_TIMELINE = {"task_unit": _frozen(np.zeros(0, dtype=np.int8)),
                "task_core": _frozen(np.zeros(0, dtype=np.int64)),
                "task_start_cycles": _frozen(np.zeros(0)), "task_cycles": _frozen(np.zeros(0))}
