"""The simulated NPU: executes kernel launches (their numbers are real) and times them.

`Device.launch(kernel, **operands)` runs the kernel's functional implementation, the batched fast
path by default or the task-by-task reference path in strict mode, counts the launch, and times
it: the cost model (npu_sim.cost) prices every task, the tasks are dealt to cores, and the launch
takes its launch overhead plus the busiest core's time (or the shared HBM / L2 bandwidth bound,
whichever is longer). Launches run back to back on one stream. `begin_step()` / `end_step()`
bracket an engine step and return its StepTrace, the device time put behind the serving stack's
host time (`Device(stack=...)`, npu_sim.host). `Device(chip, compute=False)` only times:
launch() returns None, touches no tensor and needs no operands.

How a launch's tasks are dealt to cores and what sets its time: npu_sim.dealing.

Timings are cached per kernel object within a step (a layer's kernels are launched once per
layer), and GEMM / vector timings across steps by shape, so costing a step is a dictionary lookup
per launch plus a few numpy calls per distinct kernel. A timing-only step (`time_launches`) goes
further: what the kernels it shares with other steps add up to is kept per set of them
(npu_sim.step_sums), built, where no timeline is kept, from their GEMM and vector kernels'
LaunchSums without a KernelTiming (`Device._shared_sums`: a new token count's kernels are read
for its template alone), and only its attention kernels are timed and summed, a meta-attention
launch without combine tasks without a KernelTiming (npu_sim.launch_sums; one without verify
chunks priced from its sequences' lengths, npu_sim.cost, and summed in C where it can be); a
step whose one own kernel is a launch of decodes is timed from their lengths alone, without the
kernel (`time_decodes`), and one with prefill chunks too, in C (`time_unsplit`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from npu_sim.cost import CostModel
from npu_sim.cost_attention import DecodeBatch, UnsplitShape
from npu_sim.cost_attention_launch import decode_rows, prices_from_lengths, unsplit_rows
from npu_sim.dealing import dealt, kernel_timing
from npu_sim.hardware import ChipSpec
from npu_sim.host import DEFAULT_STACK, HostProfile, get_stack
from npu_sim.launch_sums import AttentionLaunchSums, mix_launch_sums, vector_launch_sums
from npu_sim.step_sums import (
    AdoptedHead,
    Launches,
    LaunchSums,
    SharedLaunches,
    StepTemplate,
    build_template,
    extend_template,
    merge_seconds,
    step_sums,
)
from npu_sim.tasks import (
    AttentionKernel,
    CollectiveKernel,
    GemmKernel,
    Kernel,
    Primitive,
    VectorKernel,
)
from npu_sim.trace import (
    NUM_STEP_SUMS_SCALARS,
    KernelTiming,
    StepTrace,
    build_step_trace,
    step_sums_row,
    summed_step_trace,
)

if TYPE_CHECKING:
    import torch

    from npu_sim.kernels import PackedWeight
    from npu_sim.kernels.quant import QuantizedWeight
    from npu_sim.kernels.replay import LayerStack, StepOperands

# Distinct GEMM / vector shapes kept across steps: a step's token count takes any value up to
# the token budget (thousands), each with ~10 shapes.
_SHAPE_CACHE_SIZE = 1 << 15
_STEP_CACHE_LIMIT = 4096  # launches outside begin/end_step: forget old kernels eventually
# An engine step is a few hundred launches; a caller that never calls end_step would grow the
# open step forever, so past this many launches it is restarted (its launches dropped).
_MAX_OPEN_LAUNCHES = 1 << 16


_ATTENTION, _ATTENTION_NAME = Primitive.ATTENTION, Primitive.ATTENTION.value  # (read per step)


class Device:
    """One simulated chip. Not thread-safe: one engine thread launches on it."""

    def __init__(self, chip: ChipSpec, strict: bool = False, compute: bool = True,
                 dtype: str = "bf16", stack: str | HostProfile = DEFAULT_STACK,
                 timeline: bool = True) -> None:
        """stack: the serving stack whose host overhead a step pays (npu_sim.host).
        timeline: keep each task's core and start in the timings (what Perfetto traces draw);
        a timing-only simulation leaves them out (much less work and memory)."""
        self.chip = chip
        self.host = get_stack(stack)  # the serving stack's host overhead (npu_sim.host)
        self.timeline = timeline
        self.strict = strict  # reference (task-by-task) execution instead of the fast path
        self.compute = compute  # False: timing only, launch() returns None
        # The functional kernels (and torch) only where numbers are computed.
        self._runs: dict[type, Callable[..., Any]] = {}
        if compute:
            from npu_sim import kernels

            # looked up at each launch, so that a profiler may wrap npu_sim.kernels' functions
            self._runs = {GemmKernel: lambda *a, **k: kernels.run_gemm(*a, **k),
                          AttentionKernel: lambda *a, **k: kernels.run_attention(*a, **k),
                          VectorKernel: lambda *a, **k: kernels.run_vector(*a, **k),
                          CollectiveKernel: _run_collective}
        self.cost_model = CostModel(chip, dtype)  # dtype: the simulated operand dtype
        # a timing-only step's attention launch, summed from its rows (in C where it can be)
        self._attention_sums = AttentionLaunchSums(self.cost_model)
        # launches and tasks per primitive, ever (`num_launches`, `num_tasks`): as they come,
        # but for the shared launches of timing-only steps, counted as steps per template and
        # folded in when read (or when they are many): a step's template holds a handful of
        # primitives, and a simulation times tens of thousands of steps
        self._num_launches: Counter[Primitive] = Counter()
        self._num_tasks: Counter[Primitive] = Counter()
        self._template_steps: dict[StepTemplate, int] = {}  # steps not yet folded in
        self.total_sim_s = 0.0  # sum of the ended steps' sim_s
        self._launches: list[Kernel] = []  # this step's launches, in order
        # id(kernel) -> (kernel, timing): kernels without a shape key (attention), this step's
        self._step_cache: dict[int, tuple[Kernel, KernelTiming]] = {}
        # ... and kernels with one (GEMM, vector, collective), across steps: the lowering reuses
        # their objects for every step of a token count (the entry keeps the kernel, so its id
        # is not reused while cached)
        self._kernel_cache: dict[int, tuple[Kernel, KernelTiming]] = {}
        self._shape_cache: OrderedDict[tuple[Any, ...], KernelTiming] = OrderedDict()
        # ... and what templates read of GEMM and vector kernels' timings where no timeline is
        # kept (`_shared_sums`), by kernel
        self._kernel_sums: dict[int, tuple[Kernel, LaunchSums]] = {}
        # timing-only steps: what their shared launches add up to (npu_sim.step_sums)
        self._step_templates: dict[int, StepTemplate] = {}  # by id of their SharedLaunches
        self._head_templates: dict[int, StepTemplate] = {}  # by id of their SharedLaunches.head
        # ... and those built elsewhere (adopt_head_template), by id of the head standing for
        # each: never dropped (a head without kernels cannot be summed again)
        self._adopted_heads: dict[int, StepTemplate] = {}
        self._step_sums_size = NUM_STEP_SUMS_SCALARS + chip.num_cube_cores + chip.num_vector_cores
        self._peak_flops = chip.peak_flops(dtype)  # (read every step: its f-string lookup once)

    # ------------------------------------------------------------------------- host facts

    @staticmethod
    def fast_fp32_available() -> bool:
        """Whether fp32 launches run on the CPU fast path's C kernels (else on ATen)."""
        from npu_sim.kernels import native

        return native.lib() is not None

    @staticmethod
    def pack_weight(w: torch.Tensor, weight_format: str = "fp32") -> PackedWeight | torch.Tensor:
        """A GEMM weight (N, K) laid out for this device's fast path in `weight_format` (fp32,
        bf16: npu_sim.kernels.gemm), or `w` itself where no packed layout applies; launch GEMMs
        with either."""
        from npu_sim.kernels import pack_weight

        return pack_weight(w, weight_format)

    @staticmethod
    def pack_quantized(q: QuantizedWeight) -> PackedWeight | torch.Tensor:
        """Block-quantized weights (Q4_1 / Q8_0) for the fast path, or their fp32
        dequantization where the C kernels are off."""
        from npu_sim.kernels.gemm import pack_quantized

        return pack_quantized(q)

    # ------------------------------------------------------------------------------ launch

    def launch(self, kernel: Kernel, **operands: Any) -> torch.Tensor | None:
        """Run `kernel` on `operands` (see npu_sim.kernels for each primitive's operands; none
        are needed in timing-only mode) and record the launch; its timing is looked up when the
        step ends (a step launches a few hundred kernels, of a dozen distinct ones).

        Returns the kernel's output tensor, or None for kernels that write in place and in
        timing-only mode.
        """
        kind = type(kernel)
        if kind not in _TASK_COUNTS:
            raise TypeError(f"not a kernel: {kind.__name__}")
        run = self._runs.get(kind)
        out = run(kernel, self.strict, **operands) if run is not None else None
        self._count(kernel, 1)
        if len(self._launches) >= _MAX_OPEN_LAUNCHES:
            self.begin_step()
        self._launches.append(kernel)
        return out

    def replay(self, stack: LayerStack, launches: Sequence[tuple[Sequence[Kernel], int]],
               attention: AttentionKernel, step: StepOperands) -> torch.Tensor | None:
        """Run a prepared layer stack (npu_sim.kernels.replay) over a step, recording the
        launches it stands for, `launches` = (kernels in order, times the run repeats), as
        launch() would one by one; returns the stack's output, or None, having run and
        recorded nothing, in strict or timing-only mode or where the stack declines the step
        (then launch them one by one)."""
        if self.strict or not self.compute:
            return None
        out = stack.run(attention, step)
        if out is None:
            return None
        for kernels, times in launches:
            for kernel in kernels:
                self._count(kernel, times)
        recorded = [kernel for kernels, times in launches for kernel in kernels * times]
        if len(self._launches) + len(recorded) > _MAX_OPEN_LAUNCHES:
            self.begin_step()
        self._launches += recorded
        return out

    def _count(self, kernel: Kernel, times: int) -> None:
        """Count `times` launches of `kernel` (and its tasks)."""
        self._num_launches[kernel.primitive] += times
        self._num_tasks[kernel.primitive] += times * _TASK_COUNTS[type(kernel)](kernel)

    @property
    def num_launches(self) -> Counter[Primitive]:
        """Launches per primitive, ever."""
        self._fold_template_steps()
        return self._num_launches

    @property
    def num_tasks(self) -> Counter[Primitive]:
        """Tasks executed per primitive, ever."""
        self._fold_template_steps()
        return self._num_tasks

    def _fold_template_steps(self) -> None:
        """Count the shared launches of the timing-only steps counted by template so far."""
        for template, num_steps in self._template_steps.items():
            self._add_counts(template.shared_counts, num_steps)
        self._template_steps.clear()

    def _add_counts(self, counts: Iterable[tuple[Primitive, int, int]], times: int = 1) -> None:
        """Count `times` each of (primitive, launches, tasks)."""
        for primitive, num_launches, num_tasks in counts:
            self._num_launches[primitive] += times * num_launches
            self._num_tasks[primitive] += times * num_tasks

    @property
    def last_timing(self) -> KernelTiming | None:
        """The timing of the latest launch of the open step (None before the first)."""
        return self._timing(self._launches[-1]) if self._launches else None

    def time_launches(self, shared: SharedLaunches, varying: Sequence[Kernel],
                      num_requests: int = 0) -> StepTrace:
        """The StepTrace of a whole step, timing only: what begin_step(), one launch() per launch
        and end_step(num_requests) would report (the same sums in the same order), without a
        timeline (`StepTrace.kernels` is empty). The step is given as each of its kernels with
        its launches, in order of first launch: `shared` lists those it shares with other steps
        and None for each of its own, `varying`, in order (the attention kernels, the only ones
        the device does not cache across steps: no primitive may be in both). `shared` is an
        object reused by every step that shares those kernels: what they add up to is kept per
        object, and per its head (npu_sim.step_sums). Launches not yet ended are forgotten."""
        template = self._step_template(shared)
        return self._counted_step(template, self._varying_sums(template, varying), num_requests)

    def time_decodes(self, shared: SharedLaunches, decodes: DecodeBatch,
                     num_requests: int = 0) -> StepTrace:
        """`time_launches(shared, (kernel,), num_requests)` of a step whose one own kernel is
        the meta-attention `kernel` of a batch of decodes, none split, that `decodes` says
        (engine.lowering_unsplit.lower_decodes: the kernel's lengths and dealt order), timed
        from them without the kernel: the same StepTrace, bit for bit (`_launch_sums` prices
        such a kernel from the same rows: cost_attention_launch.unsplit_rows calls
        decode_rows). Needs the cost model's row memo (CostModel.memo_rows), as pricing from
        lengths does."""
        template = self._step_template(shared)
        (num_launches,) = template.varying_counts
        sums = self._attention_sums(decode_rows(self.cost_model, decodes))
        return self._counted_step(template, [(sums, num_launches)], num_requests)

    def time_unsplit(self, shared: SharedLaunches, start_pos: np.ndarray,
                     num_tokens: np.ndarray | None, shape: UnsplitShape,
                     num_requests: int = 0) -> StepTrace | None:
        """`time_launches(shared, (kernel,), num_requests)` of a step whose one own kernel is the
        meta-attention `kernel` engine.lowering_unsplit.lower_unsplit makes of its sequences'
        lengths (num_tokens query tokens from start_pos, int64; num_tokens None: a token each,
        decodes, as `time_decodes` times them), timed from the lengths alone in C
        (AttentionLaunchSums.unsplit): the same StepTrace, bit for bit. None where that
        declines (no C library, a tile to split, a chunk of no token): the caller lowers the
        kernel. Needs the row memo, as time_decodes does."""
        template = self._step_templates.get(id(shared))  # (_step_template, inline: per step)
        if template is None or template.launches is not shared:
            template = self._step_template(shared)
        (num_launches,) = template.varying_counts
        # (the step's sums in the same call: npu_sim.step_sums.step_sums' in C)
        timed = self._attention_sums.unsplit_step(start_pos, num_tokens, shape, template,
                                                  num_launches)
        if timed is None:
            return None
        seconds, num_tasks, sums = timed  # (sums: a reused scratch array; the trace below
        #   copies what it keeps of it)
        self._count_step(template, ((_ATTENTION, num_launches, num_launches * num_tasks),))
        return self._traced_step(template, sums, merge_seconds(
            template, {_ATTENTION_NAME: num_launches * seconds}), num_requests)

    def _counted_step(self, template: StepTemplate,
                      pairs: list[tuple[KernelTiming | LaunchSums, int]],
                      num_requests: int) -> StepTrace:
        """`_summed_step`, the step's launches and tasks counted first."""
        self._count_step(template, [(t.primitive, n, n * t.num_tasks) for t, n in pairs])
        return self._summed_step(template, pairs, num_requests)

    def _count_step(self, template: StepTemplate,
                    own: Iterable[tuple[Primitive, int, int]]) -> None:
        """Count a timing-only step's launches and tasks: its template's shared ones, as a
        step of the template (folded in when read), then its own kernels' (primitive,
        launches, tasks)."""
        steps = self._template_steps
        steps[template] = steps.get(template, 0) + 1
        if len(steps) > _SHAPE_CACHE_SIZE:  # (the entries hold their templates)
            self._fold_template_steps()
        self._add_counts(own)

    def end_planned_step(self, shared: SharedLaunches, varying: Sequence[Kernel],
                         num_requests: int = 0) -> StepTrace:
        """end_step(num_requests) of a step whose launches since begin_step() were, kernel for
        kernel, those `shared` and `varying` list (`time_launches`' arguments, from the plan the
        step ran: engine.lowering.step_launch_counts): the same StepTrace from the sums kept
        per set of shared launches instead of a walk over the few hundred launches recorded.
        Where the device keeps timelines, or the launches recorded are not as many as the
        plan's (a draft model launched too), it is end_step itself."""
        template = None if self.timeline else self._step_template(shared)
        if template is None or len(self._launches) != template.num_launches:
            return self.end_step(num_requests)
        return self._summed_step(template, self._varying_sums(template, varying), num_requests)

    def _step_template(self, shared: SharedLaunches) -> StepTemplate:
        """What `shared`'s launches add up to, built on its first step (npu_sim.step_sums)."""
        return _kept(self._step_templates, shared, lambda: extend_template(
            self.head_template(shared.head), shared,
            [(self._shared_sums(k), n) for k, n in shared.tail], self._step_sums_size))

    def _varying_sums(self, template: StepTemplate, varying: Sequence[Kernel],
                      ) -> list[tuple[KernelTiming | LaunchSums, int]]:
        """The step's own kernels' sums with their launch counts, timed afresh: they are new
        kernels (a step cache would be dropped at the step's end anyway)."""
        return [(self._launch_sums(kernel), n)
                for kernel, n in zip(varying, template.varying_counts, strict=True)]

    def _summed_step(self, template: StepTemplate,
                     pairs: list[tuple[KernelTiming | LaunchSums, int]],
                     num_requests: int) -> StepTrace:
        """The step's StepTrace from its template and its own kernels' sums; ends the step."""
        sums, seconds = step_sums(template, pairs, self._step_sums_size)
        return self._traced_step(template, sums, seconds, num_requests)

    def _traced_step(self, template: StepTemplate, sums: np.ndarray,
                     seconds: dict[str, float], num_requests: int) -> StepTrace:
        """The StepTrace of a step of `template` from its sums and seconds per primitive
        (npu_sim.step_sums.step_sums'); ends the step."""
        self.begin_step()
        c = self.chip
        trace = summed_step_trace(c.name, c.clock_hz, self.host, num_requests, c.num_cube_cores,
                                  self._peak_flops, sums, template.num_launches, seconds)
        self.total_sim_s += trace.sim_s
        return trace

    def _launch_sums(self, kernel: Kernel) -> KernelTiming | LaunchSums:
        """What a step's sums read of `kernel`'s timing: `time(kernel)`, or for a meta-attention
        launch without combine tasks (every launch of a simulation but those with split KV
        spans), its LaunchSums without the rest of the KernelTiming
        (npu_sim.launch_sums.mix_launch_sums): one without verify chunks from its rows, priced
        straight from its lengths (AttentionKernel.unsplit), in C where it can be."""
        if (isinstance(kernel, AttentionKernel) and kernel.task_group is None
                and not kernel.num_partial_slots):
            if prices_from_lengths(self.cost_model, kernel):
                return self._attention_sums(unsplit_rows(self.cost_model, kernel))
            return mix_launch_sums(self.cost_model, self.cost_model.attention(kernel)[0])
        return self.time(kernel)

    def head_template(self, head: Launches) -> StepTemplate:
        """The template of the head of shared launches (npu_sim.step_sums), built on its first
        step: every step of the head's token count extends it by its own tail."""
        adopted = self._adopted_heads.get(id(head))
        if adopted is not None and adopted.launches is head:
            return adopted
        return _kept(self._head_templates, head, lambda: build_template(
            head, [(None if k is None else self._shared_sums(k), n) for k, n in head],
            self._step_sums_size))

    def adopt_head_template(self, template: StepTemplate) -> Launches:
        """A head of shared launches standing for `template`: what `head_template` returned
        for a head on a device of the same chip, dtype and stack elsewhere (another process:
        engine.head_prefetch). Steps whose SharedLaunches have it as their head are timed as
        with that head, bit for bit; it holds no kernels (an empty AdoptedHead)."""
        head = AdoptedHead()
        self._adopted_heads[id(head)] = replace(template, launches=head)
        return head

    def begin_step(self) -> None:
        """Start a step: forget launches not yet reported (and the per-step timing cache)."""
        self._launches = []
        self._step_cache.clear()

    def end_step(self, num_requests: int = 0) -> StepTrace:
        """The StepTrace of the launches since begin_step (or the last end_step), for a batch of
        `num_requests` requests (the stack's per-request host time); with the launches in order
        (`StepTrace.kernels`) only where the device keeps timelines."""
        c = self.chip
        # each distinct kernel timed once (counted in C: a step is a few hundred launches)
        ids = list(map(id, self._launches))
        per_kernel = Counter(ids)  # in order of first launch
        kernels = dict(zip(ids, self._launches, strict=True))
        timings = {key: self._timing(kernels[key]) for key in per_kernel}
        trace = build_step_trace(
            c.name, c.clock_hz, self.host, num_requests, c.num_cube_cores, c.num_vector_cores,
            self._peak_flops,
            ((timings[key], n) for key, n in per_kernel.items()),
            [timings[key] for key in ids] if self.timeline else ())
        self.total_sim_s += trace.sim_s
        self.begin_step()
        return trace

    def _timing(self, kernel: Kernel) -> KernelTiming:
        entry = self._kernel_cache.get(id(kernel)) or self._step_cache.get(id(kernel))
        if entry is not None and entry[0] is kernel:  # timed before (this step, or any step)
            return entry[1]
        key = _shape_key(kernel)
        timing = self._shape_cache.get(key) if key else None
        if timing is not None and timing.kernel.tasks is not kernel.tasks:  # a reused id
            timing = None
        if timing is None:
            timing = self.time(kernel)
            if key:
                self._shape_cache[key] = timing
                if len(self._shape_cache) > _SHAPE_CACHE_SIZE:
                    self._shape_cache.popitem(last=False)
        elif key:
            self._shape_cache.move_to_end(key)
        if key:  # its timing is a function of its shape: keep it across steps
            if len(self._kernel_cache) >= _SHAPE_CACHE_SIZE:
                self._kernel_cache.clear()
            self._kernel_cache[id(kernel)] = (kernel, timing)
        else:
            if len(self._step_cache) >= _STEP_CACHE_LIMIT:
                self._step_cache.clear()
            self._step_cache[id(kernel)] = (kernel, timing)
        return timing

    # ------------------------------------------------------------------------------ timing

    def time(self, kernel: Kernel) -> KernelTiming:
        """Cost one launch of `kernel` (not recorded, nothing computed)."""
        return kernel_timing(kernel, self.chip, self.cost_model, self.timeline)

    def _shared_sums(self, kernel: Kernel) -> KernelTiming | LaunchSums:
        """What a template reads of a shared kernel's timing (npu_sim.step_sums): `_timing`'s,
        or on a device without timelines, for a GEMM or vector kernel, the LaunchSums of
        `time(kernel)` bit for bit (the same `dealt`, the same row; a vector kernel of the
        lowering's table in C: npu_sim.launch_sums.vector_launch_sums), without a
        KernelTiming: a new token count's kernels are timed once, for its template, and never
        read again. Kept by kernel (the entry holds it, so its id is not reused while kept)."""
        entry = self._kernel_cache.get(id(kernel)) or self._kernel_sums.get(id(kernel))
        if entry is not None and entry[0] is kernel:
            return entry[1]
        if self.timeline or not isinstance(kernel, (GemmKernel, VectorKernel)):
            return self._timing(kernel)
        sums = (vector_launch_sums(self.cost_model, kernel)
                if isinstance(kernel, VectorKernel) else None)  # (in C where it can be)
        if sums is not None:
            return self._keep_sums(kernel, sums)
        s = dealt(kernel, self.chip, self.cost_model, False)
        row = step_sums_row([s.cycles, s.cube_active, s.vector_active, s.hbm_read + s.hbm_write,
                             s.flops, s.cube_macs, s.useful_cube_macs], s.cube_busy, s.vector_busy)
        return self._keep_sums(kernel, LaunchSums(
            kernel.primitive, kernel.primitive.value, s.cycles / self.chip.clock_hz, s.num_tasks,
            row))

    def _keep_sums(self, kernel: Kernel, sums: LaunchSums) -> LaunchSums:
        """`sums`, kept as `_shared_sums(kernel)`'s."""
        if len(self._kernel_sums) >= _SHAPE_CACHE_SIZE:
            self._kernel_sums.clear()
        self._kernel_sums[id(kernel)] = (kernel, sums)
        return sums

# Tasks a launch runs, by kernel type (attention: its tasks and combine tasks; a GEMM: its tile
# tasks and split-K reduce tasks; a collective none on the cores).
_TASK_COUNTS: dict[type, Callable[[Any], int]] = {
    GemmKernel: lambda k: len(k.tasks) + _len(k.reduce_tasks),
    AttentionKernel: lambda k: k.num_tasks + k.num_combine_tasks,
    VectorKernel: lambda k: len(k.tasks),
    CollectiveKernel: lambda k: 0,
}


def _kept(templates: dict[int, StepTemplate], launches: SharedLaunches | Launches,
          build: Callable[[], StepTemplate]) -> StepTemplate:
    """The template kept for `launches` (by id: the template holds them, so their id names them
    while it is kept), else build()'s, kept; the cache emptied first when full."""
    template = templates.get(id(launches))
    if template is None or template.launches is not launches:
        if len(templates) >= _SHAPE_CACHE_SIZE:
            templates.clear()
        template = templates[id(launches)] = build()
    return template


def _run_collective(kernel: CollectiveKernel, strict: bool,
                    x: torch.Tensor | None = None) -> torch.Tensor | None:
    """A collective on this one simulated rank: the identity for a group of one. A group of
    several needs every rank's data, which one simulated card does not hold: tensor-parallel
    steps are simulated timing-only."""
    if kernel.world_size > 1:
        raise RuntimeError(f"{kernel.name}: a {kernel.world_size}-NPU collective cannot be "
                           f"computed on one simulated card; run tensor parallelism timing-only")
    return x


def _len(tasks: np.ndarray | None) -> int:
    return 0 if tasks is None else len(tasks)


def _shape_key(kernel: Kernel) -> tuple[Any, ...] | None:
    """Cross-step cache key of kernels whose cost depends on shapes only. The task table's
    identity is part of it (lowering caches tables by shape; the cached timing keeps its kernel,
    hence the table, alive, and a hit checks it is the very same table)."""
    if isinstance(kernel, GemmKernel):
        return ("gemm", kernel.name, kernel.m, kernel.n, kernel.k, kernel.valid_m, kernel.menu,
                kernel.weights, id(kernel.tasks))
    if isinstance(kernel, VectorKernel):
        return ("vector", kernel.name, kernel.op, kernel.num_rows, kernel.row_len,
                kernel.valid_rows, id(kernel.tasks))
    if isinstance(kernel, CollectiveKernel):
        return ("collective", kernel.name, kernel.op, kernel.num_bytes, kernel.world_size,
                id(kernel.tasks))
    return None
