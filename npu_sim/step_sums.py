"""A timing-only step's sums from a template of the launches it shares with other steps.

A step launches the same GEMM, vector (and collective) kernels as every step of its token
count and sampled rows (the lowering and the device cache them by shape), plus attention kernels
of its own, the only ones timed afresh. count_step_trace adds the launches' rows
(KernelTiming.step_sums times their counts) in launch order; a `StepTemplate` keeps what the
shared launches contribute: the sum of the rows before the first of the step's own launches
(added in order, once), the rows from there on with the step's own rows blank, the seconds per
primitive of the shared kernels, and their launch and task counts. A step fills its own rows in
and accumulates from the first of them: the same additions in the same order as
count_step_trace, hence the same sums bit for bit.

The shared launches come in two parts (`SharedLaunches`): a head that every step of a token
count shares (the layers, the step's own kernels among them) and a tail of the sampled rows'
kernels. A template is its head's template extended by the tail (`extend_template`): the
head's rows, sums and counts kept, the tail's added after them, in launch order as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from npu_sim.tasks import Kernel, Primitive
from npu_sim.trace import KernelTiming

# Kernels with their launches, in order of first launch, None for each of the step's own kernels.
Launches = tuple[tuple[Kernel | None, int], ...]


@dataclass(frozen=True, eq=False)
class SharedLaunches:
    """A step's kernels with their launches, in order of first launch, None for each of the
    step's own kernels (Device.time_launches): one object per set of shared kernels, the device
    keeping sums per object and per head (by identity)."""

    head: Launches  # the first launches: one tuple for every step that shares them
    tail: Launches  # the launches after them; none of the step's own kernels, no head kernel

    def __iter__(self) -> Iterator[tuple[Kernel | None, int]]:
        """head, then tail."""
        return itertools.chain(self.head, self.tail)


class AdoptedHead(tuple):  # type: ignore[type-arg]
    """The head of shared launches whose template was built elsewhere
    (Device.adopt_head_template): empty, an identity the device keeps that template by."""

    __slots__ = ()


class LaunchSums(NamedTuple):
    """What step_sums reads of one launch's KernelTiming, for a launch timed without one
    (Device.time_launches: a meta-attention launch without combine tasks): the same values."""

    primitive: Primitive
    primitive_name: str  # primitive.value
    seconds: float
    num_tasks: int
    step_sums: np.ndarray  # KernelTiming.step_sums


@dataclass(frozen=True, eq=False)
class StepTemplate:
    """What the shared launches of a step contribute to its sums (see the module docstring)."""

    launches: SharedLaunches | Launches  # what it was built from (held: its id keys it)
    varying_counts: tuple[int, ...]  # launches of each of the step's own kernels, in order
    prefix: np.ndarray | None  # rows before the first own kernel, accumulated; None: none
    rest: np.ndarray  # (kernels from the first own one on, sums): rows times launches, the
    #   own kernels' rows zero
    varying_rows: tuple[int, ...]  # the own kernels' rows in `rest`, in order
    primitive_names: tuple[str | None, ...]  # shared primitives' names in order of first
    #   launch, None where the own kernels' primitives come
    shared_seconds: dict[str, float]  # seconds per shared primitive, summed in launch order
    num_launches: int  # launches in the step
    # (primitive, launches, tasks) of the shared kernels, primitives in order of first launch
    shared_counts: tuple[tuple[Primitive, int, int], ...]


def build_template(launches: SharedLaunches | Launches,
                   pairs: Sequence[tuple[KernelTiming | LaunchSums | None, int]],
                   size: int) -> StepTemplate:
    """The template of `launches`, whose kernels' (timing or None, launches) are `pairs`;
    `size`: the length of a step_sums row. (A shared kernel's LaunchSums, or KernelTiming:
    what step_sums reads of it.)"""
    varying = [i for i, (t, _) in enumerate(pairs) if t is None]
    first = varying[0] if varying else len(pairs)
    rows = np.zeros((len(pairs), size))
    names: dict[str | None, None] = {}
    seconds: dict[str, float] = {}
    counts: dict[Primitive, list[int]] = {}
    for i, (t, n) in enumerate(pairs):
        if t is None:
            names[None] = None
            continue
        rows[i] = _add_shared(t, n, names, seconds, counts)
    prefix = np.add.accumulate(rows[:first], axis=0)[-1] if first else None
    return StepTemplate(
        launches=launches, varying_counts=tuple(pairs[i][1] for i in varying), prefix=prefix,
        rest=rows[first:],
        varying_rows=tuple(i - first for i in varying), primitive_names=tuple(names),
        shared_seconds=seconds, num_launches=sum(n for _, n in pairs),
        shared_counts=tuple((p, n, tasks) for p, (n, tasks) in counts.items()))


def extend_template(head: StepTemplate, launches: SharedLaunches,
                    tail: Sequence[tuple[KernelTiming | LaunchSums, int]],
                    size: int) -> StepTemplate:
    """build_template(launches, pairs, size), where `head` is the template of launches.head
    and `tail` the (timing, launches) of launches.tail's kernels (pairs: the head's, then
    `tail`): the head's rows and sums kept, the tail's added after them in order."""
    names = dict.fromkeys(head.primitive_names)
    seconds = dict(head.shared_seconds)
    counts = {p: [n, tasks] for p, n, tasks in head.shared_counts}
    rows = np.zeros((len(tail), size))
    for i, (t, n) in enumerate(tail):
        rows[i] = _add_shared(t, n, names, seconds, counts)
    prefix, rest = head.prefix, head.rest
    if head.varying_rows:  # the tail comes after the first own kernel: rows of `rest`
        rest = np.concatenate((rest, rows))
    elif len(tail):  # no own kernel at all: the prefix goes on accumulating
        start = () if prefix is None else (prefix[None],)
        prefix = np.add.accumulate(np.concatenate((*start, rows)), axis=0)[-1]
    return StepTemplate(
        launches=launches, varying_counts=head.varying_counts, prefix=prefix, rest=rest,
        varying_rows=head.varying_rows, primitive_names=tuple(names),
        shared_seconds=seconds, num_launches=head.num_launches + sum(n for _, n in tail),
        shared_counts=tuple((p, n, tasks) for p, (n, tasks) in counts.items()))


def _add_shared(t: KernelTiming | LaunchSums, n: int, names: dict[str | None, None],
                seconds: dict[str, float], counts: dict[Primitive, list[int]]) -> np.ndarray:
    """Count `n` launches of a shared kernel timed `t` into a template's primitive names,
    seconds and (launches, tasks) per primitive, in launch order; its step_sums row."""
    names[t.primitive_name] = None
    seconds[t.primitive_name] = seconds.get(t.primitive_name, 0.0) + n * t.seconds
    entry = counts.setdefault(t.primitive, [0, 0])
    entry[0] += n
    entry[1] += n * t.num_tasks
    return t.step_sums * float(n)


def step_sums(template: StepTemplate,
              varying: Sequence[tuple[KernelTiming | LaunchSums, int]],
              size: int) -> tuple[np.ndarray, dict[str, float]]:
    """(sums, seconds per primitive name) of a step of `template` whose own kernels, in order,
    are `varying` (timing, launches) pairs: count_step_trace's, bit for bit. ValueError if one
    of their primitives is also a shared kernel's (the seconds per primitive would mix)."""
    if not len(template.rest):  # no own kernels: the prefix is everything
        sums = np.zeros(size) if template.prefix is None else template.prefix
    else:
        rows = template.rest.copy()
        for i, (t, n) in zip(template.varying_rows, varying, strict=True):
            np.multiply(t.step_sums, float(n), out=rows[i])  # (the product, in place)
        if template.prefix is not None:
            rows[0] += template.prefix
        sums = np.add.accumulate(rows, axis=0)[-1]
    seconds: dict[str, float] = {}  # the own kernels', per primitive name in launch order
    for t, n in varying:
        name = t.primitive_name
        seconds[name] = seconds.get(name, 0.0) + n * t.seconds
    return sums, merge_seconds(template, seconds)


def merge_seconds(template: StepTemplate, own_seconds: dict[str, float]) -> dict[str, float]:
    """A step's seconds per primitive name: its template's shared ones, and `own_seconds`
    (its own kernels', summed per name in launch order) where they first come. ValueError
    where a primitive is both (the seconds per primitive would mix)."""
    shared = template.shared_seconds
    for name in own_seconds:
        if name in shared:
            raise ValueError(f"{name}: kernels both shared and a step's own")
    by_primitive: dict[str, float] = {}
    for name in template.primitive_names:
        if name is None:
            by_primitive.update(own_seconds)  # first launches of own primitives: dict order kept
        else:
            by_primitive[name] = shared[name]
    return by_primitive
