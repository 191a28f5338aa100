"""What the simulated device reports: a KernelTiming per launch, a StepTrace per engine step, and
a Chrome trace-event (Perfetto) timeline of a step.

Times are simulated: cycles at the chip's clock and seconds derived from them (`*_cycles`,
`*_s`). Arrays are read-only numpy arrays shared between the repeated launches of one kernel.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npu_sim.cost import Unit
from npu_sim.host import HostProfile
from npu_sim.tasks import AttentionKernel, GemmKernel, Kernel, Primitive, VectorKernel


class _cached:
    """functools.cached_property without its per-instance lock (Python 3.11 takes one on every
    first read, a cost per timing that a simulation pays tens of thousands of times): the first
    read stores the value in the instance's __dict__, where later reads find it."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func, self.__doc__ = func, func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


@dataclass(frozen=True, eq=False)
class KernelTiming:
    """One launch as the cost model and the core scheduler timed it."""

    primitive: Primitive  # the meta primitive: gemm | vector | attention
    name: str  # the kernel's name in the model ("qkv_proj", "attention", "input_norm", ...)
    shape: str  # what it computes, e.g. "M=200 N=12288 K=4096" (trace slice names)
    pipeline: str  # how it was modelled: gemm | vector | attention-{2,3,4}stage
    cycles: float  # launch overhead + makespan of its tasks, at the chip clock
    seconds: float  # cycles / clock_hz
    launch_cycles: float  # the kernel-launch overhead within `cycles`
    block_dim: int  # cores its tasks were dealt to (AICs for gemm/attention, AIVs for vector)
    bound: str  # what set the makespan: "cores" (per-core pipelines), "hbm" or "l2" (shared bw)
    cube_busy_cycles: np.ndarray  # (num_cube_cores,) cycles each AIC was occupied
    vector_busy_cycles: np.ndarray  # (num_vector_cores,) cycles each AIV was occupied
    cube_active_cycles: float  # cycles the cube units computed (padding included), all AICs
    vector_active_cycles: float  # cycles the vector units computed, all AIVs
    hbm_read_bytes: float  # bytes read from HBM
    hbm_write_bytes: float  # bytes written to HBM
    flops: float  # useful floating-point operations (valid rows, causally visible scores)
    cube_macs: float  # MACs the cube issued, masked and padded rows included
    useful_cube_macs: float  # of those, on real rows and columns
    num_tasks: int  # tasks timed (attention: attention + combine tasks)
    # per task, in task-table order (attention tasks, then combine tasks), for timelines:
    task_unit: np.ndarray  # int8: 0 = AIC, 1 = AIV, 2 = AIC + its AIVs (npu_sim.cost.Unit)
    task_core: np.ndarray  # int64: the AIC (unit 0, 2) or AIV (unit 1) index that ran it
    task_start_cycles: np.ndarray  # float64: start, counted from the end of the launch overhead
    task_cycles: np.ndarray  # float64: how long it occupied its core
    kernel: Kernel  # the launched kernel (labels for trace slices; not part of the timing)

    @property
    def hbm_bytes(self) -> float:
        """Bytes moved between the chip and HBM."""
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def padding_waste(self) -> float:
        """Fraction of issued cube MACs spent on padding (0 for vector kernels)."""
        return 1.0 - self.useful_cube_macs / self.cube_macs if self.cube_macs else 0.0

    @_cached
    def primitive_name(self) -> str:
        """primitive.value, read once (an enum's value is a Python-level property; a step
        reads it per kernel)."""
        return self.primitive.value

    @_cached
    def step_sums(self) -> np.ndarray:
        """float64 (_NUM_SCALARS + num_cube_cores + num_vector_cores,): what one launch adds to
        its step's sums (count_step_trace), the scalars in _SCALARS order, then the busy
        cycles of every AIC and AIV. Read-only, built once per timing (timings are shared by
        the launches of a kernel and, through the device's caches, across steps)."""
        row = step_sums_row([getattr(self, name) for name in _SCALARS], self.cube_busy_cycles,
                            self.vector_busy_cycles)
        row.flags.writeable = False
        return row


# The scalars a step sums over its launches (KernelTiming.step_sums), in this order.
_SCALARS = ("cycles", "cube_active_cycles", "vector_active_cycles", "hbm_bytes", "flops",
            "cube_macs", "useful_cube_macs")
NUM_STEP_SUMS_SCALARS = len(_SCALARS)


def step_sums_row(scalars: Sequence[float], cube_busy_cycles: np.ndarray,
                  vector_busy_cycles: np.ndarray) -> np.ndarray:
    """float64 row of what one launch adds to its step's sums (KernelTiming.step_sums): the
    scalars, in _SCALARS order, then every AIC's and every AIV's busy cycles."""
    return np.concatenate((scalars, cube_busy_cycles, vector_busy_cycles))


@dataclass(frozen=True, eq=False)
class StepTrace:
    """One engine step on the simulated device: kernels back to back, plus host overhead."""

    chip: str  # ChipSpec.name
    clock_hz: float  # the chip clock the cycles count
    sim_s: float  # host_s + device_s: what the step costs on the simulated clock
    device_s: float  # sum of the kernels' seconds (one stream, launches in order)
    host_s: float  # host time the step exposes, sim_s - device_s (npu_sim.host; 0 if empty)
    num_launches: int  # kernel launches in the step
    cube_busy_s: np.ndarray  # (num_cube_cores,) seconds each AIC was occupied
    vector_busy_s: np.ndarray  # (num_vector_cores,) seconds each AIV was occupied
    cube_utilization: float  # cube active cycles / (AICs x device cycles), in [0, 1]
    vector_utilization: float  # vector active cycles / (AIVs x device cycles), in [0, 1]
    hbm_bytes: float  # bytes read from and written to HBM
    flops: float  # useful floating-point operations
    mfu: float  # flops / (cube peak FLOP/s x device_s): model FLOPs utilization, in [0, 1]
    padding_waste_ratio: float  # 1 - useful / issued cube MACs over the step, in [0, 1]
    kernel_s_by_primitive: Mapping[str, float]  # "gemm" | "vector" | "attention" -> seconds
    kernels: tuple[KernelTiming, ...]  # every launch in order (a replayed layer repeats objects)
    kernel_start_s: tuple[float, ...]  # device-time start of each launch, from the step start


def build_step_trace(chip_name: str, clock_hz: float, host: HostProfile, num_requests: int,
                     num_cube_cores: int, num_vector_cores: int, peak_flops: float,
                     counts: Iterable[tuple[KernelTiming, int]],
                     launches: Sequence[KernelTiming] = ()) -> StepTrace:
    """Aggregate a step's launches, given as (timing, times launched) in order of first launch,
    a timing possibly in several pairs (kernels of one shape share one): each distinct timing
    summed once, times its count, and the device time put behind the stack's host time for
    `num_requests` requests. `launches`, every launch in order, feed the timeline only."""
    merged: dict[int, list[Any]] = {}
    for timing, n in counts:
        entry = merged.get(id(timing))
        if entry is None:
            merged[id(timing)] = [timing, n]
        else:
            entry[1] += n
    return count_step_trace(chip_name, clock_hz, host, num_requests, num_cube_cores,
                            num_vector_cores, peak_flops, merged.values(), launches)


def count_step_trace(chip_name: str, clock_hz: float, host: HostProfile, num_requests: int,
                     num_cube_cores: int, num_vector_cores: int, peak_flops: float,
                     counts: Iterable[Sequence[Any]],
                     launches: Sequence[KernelTiming] = ()) -> StepTrace:
    """Aggregate (timing, times launched) pairs into a step's trace; `launches`, the launches
    in order, only feed the timeline (`kernels`, `kernel_start_s`; empty = no timeline)."""
    counts = list(counts)
    by_primitive: dict[str, float] = {}
    for timing, n in counts:
        key = timing.primitive_name
        by_primitive[key] = by_primitive.get(key, 0.0) + n * timing.seconds
    # Every sum at once: (launches, sums) rows times their counts, added up launch by launch
    # (an accumulate, so each sum is the sequential one, in the order of `counts`).
    sums = np.zeros(len(_SCALARS) + num_cube_cores + num_vector_cores)
    if counts:
        rows = np.array([timing.step_sums for timing, _ in counts])
        rows *= np.array([float(n) for _, n in counts])[:, None]
        sums = np.add.accumulate(rows, axis=0)[-1]
    return summed_step_trace(chip_name, clock_hz, host, num_requests, num_cube_cores,
                             peak_flops, sums, sum(n for _, n in counts), by_primitive,
                             launches)


def _step_trace(**fields: Any) -> StepTrace:
    """StepTrace(**fields), every field given, without the frozen dataclass's __init__ (an
    object.__setattr__ per field: 1.8 us of a timing-only step's ~4 us trace, once per
    simulated step); tests/npu_sim/test_trace.py holds the two equal."""
    trace = object.__new__(StepTrace)
    trace.__dict__.update(fields)
    return trace


def summed_step_trace(chip_name: str, clock_hz: float, host: HostProfile, num_requests: int,
                      num_cube_cores: int, peak_flops: float, sums: np.ndarray,
                      num_launches: int, by_primitive: dict[str, float],
                      launches: Sequence[KernelTiming] = ()) -> StepTrace:
    """A step's trace from its launches' sums (KernelTiming.step_sums times their counts, added
    in launch order), launch count and seconds per primitive name (count_step_trace). Keeps
    no view of `sums` (Device.time_unsplit passes a scratch array it reuses)."""
    num_vector_cores = len(sums) - len(_SCALARS) - num_cube_cores
    cycles, cube_active, vector_active, hbm, flops, macs, useful = sums[:len(_SCALARS)].tolist()
    busy_s = sums[len(_SCALARS):] / clock_hz  # every AIC's, then every AIV's (one division)
    device_s = cycles / clock_hz
    sim_s = max(host.step_s(device_s, num_launches, num_requests), device_s)
    starts = np.cumsum([0.0] + [t.seconds for t in launches[:-1]]).tolist() if launches else []
    return _step_trace(
        chip=chip_name, clock_hz=clock_hz, sim_s=sim_s, device_s=device_s,
        host_s=sim_s - device_s, num_launches=num_launches,
        cube_busy_s=busy_s[:num_cube_cores], vector_busy_s=busy_s[num_cube_cores:],
        cube_utilization=cube_active / (num_cube_cores * cycles) if cycles else 0.0,
        vector_utilization=vector_active / (num_vector_cores * cycles) if cycles else 0.0,
        hbm_bytes=hbm, flops=flops,
        mfu=flops / (peak_flops * device_s) if device_s else 0.0,
        padding_waste_ratio=1.0 - useful / macs if macs else 0.0,
        kernel_s_by_primitive=by_primitive, kernels=tuple(launches),
        kernel_start_s=tuple(starts),
    )


# ------------------------------------------------------------------------------ Perfetto

def task_label(kernel: Kernel, i: int) -> str:
    """Slice name of task i: primitive, kernel name and the task's shape."""
    if isinstance(kernel, GemmKernel):
        if i >= len(kernel.tasks):  # split-K reduce tasks follow the cube tasks
            r = kernel.reduce_tasks[i - len(kernel.tasks)]
            return f"gemm-reduce {kernel.name} {int(r['num_elems'])} x{kernel.split_k}"
        t = kernel.tasks[i]
        s = kernel.menu[int(t["tile"])]
        split = f" k{int(t['k_split'])}/{kernel.split_k}" if kernel.split_k > 1 else ""
        return (f"gemm {kernel.name} {s.tm}x{s.tn}x{int(t['k_len'])} "
                f"({int(t['m_rows'])}x{int(t['n_cols'])} valid){split}")
    if isinstance(kernel, VectorKernel):
        t = kernel.tasks[i]
        return f"vector {kernel.name} {int(t['num_rows'])}x{kernel.row_len}"
    assert isinstance(kernel, AttentionKernel)
    if i >= len(kernel.tasks):
        c = kernel.combine_tasks[i - len(kernel.tasks)]
        return f"combine seq{int(c['seq'])} h{int(c['kv_head'])} x{int(c['num_slots'])}"
    t = kernel.tasks[i]
    keys = (int(t["kv_block_end"]) - int(t["kv_block_start"])) * kernel.block_size
    return (f"attention q{int(t['tile_rows'])} ({int(t['q_rows'])} tok) x kv{keys} "
            f"seq{int(t['seq'])} h{int(t['kv_head'])}")


def perfetto_events(step: StepTrace, num_cube_cores: int, num_vector_cores: int,
                    ) -> list[dict[str, Any]]:
    """Chrome trace events of a step: one thread (track) per AI core used, a complete ("X")
    slice per task; AIC c is tid c, AIV v is tid num_cube_cores + v; times in microseconds."""
    us_per_cycle = 1e6 / step.clock_hz
    aivs_per_aic = max(1, num_vector_cores // num_cube_cores)
    events: list[dict[str, Any]] = []
    used: set[int] = set()
    per_kernel: dict[int, list[tuple[str, list[int], float, float]]] = {}
    for timing, start_s in zip(step.kernels, step.kernel_start_s, strict=True):
        tasks = per_kernel.get(id(timing))
        if tasks is None:  # labels and tracks once per distinct kernel (layers repeat them)
            tasks = []
            for i in range(timing.num_tasks):
                unit, core = int(timing.task_unit[i]), int(timing.task_core[i])
                if unit == Unit.AIC:
                    tids = [core]
                elif unit == Unit.AIV:
                    tids = [num_cube_cores + core]
                else:  # attention: the AIC and the AIVs it drives
                    tids = [core] + [num_cube_cores + core * aivs_per_aic + j
                                     for j in range(aivs_per_aic)]
                used.update(tids)
                tasks.append((task_label(timing.kernel, i), tids,
                              float(timing.task_start_cycles[i]) * us_per_cycle,
                              float(timing.task_cycles[i]) * us_per_cycle))
            per_kernel[id(timing)] = tasks
        base_us = start_s * 1e6 + timing.launch_cycles * us_per_cycle
        args = {"kernel": timing.name, "pipeline": timing.pipeline}
        cat = timing.primitive.value
        for name, tids, start_us, dur_us in tasks:
            ts, dur = round(base_us + start_us, 4), round(dur_us, 4)
            events.extend({"name": name, "cat": cat, "ph": "X", "pid": 0, "tid": tid, "ts": ts,
                           "dur": dur, "args": args} for tid in tids)
    meta: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0,
                                   "args": {"name": f"NPU {step.chip} (simulated)"}}]
    for tid in sorted(used):
        label = f"AIC {tid}" if tid < num_cube_cores else f"AIV {tid - num_cube_cores}"
        meta.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                     "args": {"name": label}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid,
                     "args": {"sort_index": tid}})
    return meta + events


def write_perfetto(step_trace: StepTrace, path: str | Path) -> Path:
    """Write `step_trace` as Chrome trace-event JSON (loads in ui.perfetto.dev and
    chrome://tracing); returns the path written."""
    num_cube = len(step_trace.cube_busy_s)
    num_vector = len(step_trace.vector_busy_s)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"traceEvents": perfetto_events(step_trace, num_cube, num_vector),
           "displayTimeUnit": "ns",
           "otherData": {"chip": step_trace.chip, "sim_s": step_trace.sim_s,
                         "device_s": step_trace.device_s, "host_s": step_trace.host_s}}
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return path


class StepsTimeline:
    """Several steps in one Chrome trace-event file, each at its start on the simulated clock
    (host time included), plus a track of the steps themselves.

    Streamed: `add` appends a step's events to the file (the JSON array format, whose closing
    bracket is optional, so the file loads in ui.perfetto.dev while it grows); `close` ends it
    as plain JSON.
    """

    STEPS_PID = 1  # the process whose one track shows a slice per step

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.num_steps = 0
        self._tracks: set[tuple[str, int]] = set()  # (metadata name, tid) written already
        self._closed = False
        self.path.write_text("[" + json.dumps(
            {"name": "process_name", "ph": "M", "pid": self.STEPS_PID,
             "args": {"name": "engine steps"}}, separators=(",", ":")))

    def add(self, step_trace: StepTrace, start_s: float, label: str) -> None:
        """Append `step_trace`, starting `start_s` simulated seconds into the run."""
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        offset_us = start_s * 1e6
        out: list[dict[str, Any]] = [{
            "name": label, "cat": "step", "ph": "X", "pid": self.STEPS_PID, "tid": 0,
            "ts": round(offset_us, 4), "dur": round(step_trace.sim_s * 1e6, 4),
            "args": {"sim_s": step_trace.sim_s, "device_s": step_trace.device_s,
                     "host_s": step_trace.host_s, "num_launches": step_trace.num_launches}}]
        events = perfetto_events(step_trace, len(step_trace.cube_busy_s),
                                 len(step_trace.vector_busy_s))
        for event in events:
            if event["ph"] == "M":
                key = (event["name"], int(event.get("tid", -1)))
                if key in self._tracks:
                    continue
                self._tracks.add(key)
                out.append(event)
            else:
                out.append({**event, "ts": round(event["ts"] + offset_us, 4)})
        with self.path.open("a") as f:
            for event in out:
                f.write("," + json.dumps(event, separators=(",", ":")))
        self.num_steps += 1

    def close(self) -> None:
        """End the array (the file is then plain JSON)."""
        if not self._closed:
            with self.path.open("a") as f:
                f.write("]\n")
            self._closed = True
