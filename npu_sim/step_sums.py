"""A timing-only step's sums from a template of the launches it shares with other steps.

A step launches the same GEMM, vector (and collective) kernels as every step of its token
count and sampled rows (the lowering and the device cache them by shape), plus attention kernels
of its own, the only ones timed afresh. count_step_trace adds the launches' rows
(KernelTiming.step_sums times their counts) in launch order; a `StepTemplate` keeps what the
shared launches contribute: the sum of the rows before the first attention launch (added in
order, once), the rows from there on with the attention rows blank, the seconds per primitive
of the shared kernels, and their launch and task counts. A step fills its attention rows in and
accumulates from the first of them: the same additions in the same order as count_step_trace,
hence the same sums bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from npu_sim.tasks import Primitive
from npu_sim.trace import KernelTiming

# The kernels a step does not share (no shape key in the device's caches): a template leaves
# their rows blank. Every launch of a primitive is shared or none is, so the seconds summed per
# primitive never mix the two.
VARYING = Primitive.ATTENTION

TemplateKey = tuple[tuple[int | None, int], ...]  # (id of a shared timing or None, count)


@dataclass(frozen=True, eq=False)
class StepTemplate:
    """What the shared launches of a step contribute to its sums (see the module docstring)."""

    shared: tuple[KernelTiming, ...]  # the shared timings: held, so the ids in keys stay theirs
    prefix: np.ndarray | None  # rows before the first varying launch, accumulated; None: none
    rest: np.ndarray  # (launches from the first varying one on, sums): rows times counts,
    #   the varying launches' rows zero
    varying_rows: tuple[int, ...]  # the varying launches' rows in `rest`, in launch order
    primitive_names: tuple[str, ...]  # every primitive's name, in order of first launch
    shared_seconds: dict[str, float]  # seconds per shared primitive, summed in launch order
    num_launches: int  # launches in the step
    # (primitive, launches, tasks) of the shared kernels, primitives in order of first launch
    shared_counts: tuple[tuple[Primitive, int, int], ...]


def template_key(pairs: Sequence[tuple[KernelTiming, int]]) -> TemplateKey:
    """The key of the template of a step's (timing, count) pairs, in launch order."""
    return tuple((None if t.primitive is VARYING else id(t), n) for t, n in pairs)


def build_template(pairs: Sequence[tuple[KernelTiming, int]], size: int) -> StepTemplate:
    """The template of a step's (timing, count) pairs; `size`: the length of a step_sums row."""
    varying = [i for i, (t, _) in enumerate(pairs) if t.primitive is VARYING]
    first = varying[0] if varying else len(pairs)
    rows = np.zeros((len(pairs), size))
    names: dict[str, None] = {}
    seconds: dict[str, float] = {}
    counts: dict[Primitive, list[int]] = {}
    for i, (t, n) in enumerate(pairs):
        names[t.primitive_name] = None
        if t.primitive is VARYING:
            continue
        rows[i] = t.step_sums * float(n)
        seconds[t.primitive_name] = seconds.get(t.primitive_name, 0.0) + n * t.seconds
        entry = counts.setdefault(t.primitive, [0, 0])
        entry[0] += n
        entry[1] += n * t.num_tasks
    prefix = np.add.accumulate(rows[:first], axis=0)[-1] if first else None
    return StepTemplate(
        shared=tuple(t for t, _ in pairs if t.primitive is not VARYING), prefix=prefix,
        rest=rows[first:], varying_rows=tuple(i - first for i in varying),
        primitive_names=tuple(names), shared_seconds=seconds,
        num_launches=sum(n for _, n in pairs),
        shared_counts=tuple((p, n, tasks) for p, (n, tasks) in counts.items()))


def step_sums(template: StepTemplate, varying: Sequence[tuple[KernelTiming, int]],
              size: int) -> tuple[np.ndarray, dict[str, float]]:
    """(sums, seconds per primitive name) of a step of `template` whose varying launches, in
    launch order, are `varying` (timing, count) pairs: count_step_trace's, bit for bit."""
    if not len(template.rest):  # nothing varies: the prefix is everything
        sums = np.zeros(size) if template.prefix is None else template.prefix
    else:
        rows = template.rest.copy()
        for i, (t, n) in zip(template.varying_rows, varying, strict=True):
            rows[i] = t.step_sums * float(n)
        if template.prefix is not None:
            rows[0] += template.prefix
        sums = np.add.accumulate(rows, axis=0)[-1]
    seconds: dict[str, float] = {}
    for t, n in varying:
        seconds[t.primitive_name] = seconds.get(t.primitive_name, 0.0) + n * t.seconds
    shared = template.shared_seconds
    return sums, {name: shared[name] if name in shared else seconds[name]
                  for name in template.primitive_names}
