"""A timing-only step (Device.time_launches over engine.lowering.step_launch_counts, its shared
launches summed once per template: npu_sim.step_sums) reports what launching every kernel and
ending the step reports, bit for bit: meta and split attention, tensor parallelism, steps that
share a token count, and steps that do not; engine.lowering.lower_step_counts gives what
step_launch_counts does."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.arch_presets import get_arch
from engine.lowering import (
    BASELINE_POLICY,
    DEFAULT_POLICY,
    ChunkShape,
    LoweringPolicy,
    lower_step,
    lower_step_counts,
    step_launch_counts,
    step_launches,
)
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.step_sums import LaunchSums, StepTemplate, build_template, extend_template
from npu_sim.tasks import GemmKernel, VectorKernel
from npu_sim.trace import StepTrace

B2 = get_chip("910b2")
SLOW_HBM = dataclasses.replace(B2, name="slow-hbm", hbm_bytes_per_s=B2.hbm_bytes_per_s / 8)
BATCHES = [  # (start_pos, num_tokens) per chunk; the first two share their token count
    [(0, 700), (300, 1), (2000, 1), (50, 17)],
    [(100, 700), (301, 1), (2001, 1), (60, 17)],
    [(5000, 1), (9, 1)],
    [(0, 2048)],
    [(7000, 1), (6000, 1), (12000, 1)],
]


def chunks(specs: list[tuple[int, int]], block_size: int = 128) -> list[ChunkShape]:
    return [ChunkShape(start, n, tuple(range(-(-(start + n) // block_size))))
            for start, n in specs]


@pytest.mark.parametrize("timeline", [True, False])  # (without: shared kernels' LaunchSums)
@pytest.mark.parametrize("model,tp,policy", [("llama-2-7b", 1, DEFAULT_POLICY),
                                             ("llama-2-7b", 1, BASELINE_POLICY),
                                             ("qwen2.5-72b", 4, DEFAULT_POLICY)])
def test_time_launches_reports_what_launching_every_kernel_does(model, tp, policy,
                                                               timeline) -> None:
    arch = get_arch(model)
    timed = Device(B2, compute=False, timeline=timeline)
    launched = Device(B2, compute=False)
    for specs in BATCHES * 2:  # again: the templates are reused
        plan = lower_step(chunks(specs), len(specs), arch, B2, 128, policy, tp=tp)
        a = timed.time_launches(*step_launch_counts(plan, arch.num_layers),
                                num_requests=len(specs))
        launched.begin_step()
        for kernel in step_launches(plan, arch.num_layers):
            launched.launch(kernel)
        b = launched.end_step(num_requests=len(specs))
        assert_same_step_trace(a, b)
    assert timed.num_launches == launched.num_launches
    assert timed.num_tasks == launched.num_tasks
    assert timed.total_sim_s == launched.total_sim_s


@pytest.mark.parametrize("model,tp,policy", [("llama-2-7b", 1, DEFAULT_POLICY),
                                             ("llama-2-7b", 1, BASELINE_POLICY),
                                             ("qwen2.5-72b", 4, DEFAULT_POLICY)])
def test_lower_step_counts_is_step_launch_counts_of_the_plan(model, tp, policy) -> None:
    """The timing-only runner's shortcut: the shared launches of the plan (the very tuple, once
    known) and attention kernels timed alike, first steps and repeated token counts alike."""
    arch = get_arch(model)
    a_device, b_device = Device(B2, compute=False), Device(B2, compute=False)
    for specs in BATCHES * 2:
        a_shared, a_attention = lower_step_counts(chunks(specs), len(specs), arch, B2, 128,
                                                  arch.num_layers, policy, tp=tp)
        plan = lower_step(chunks(specs), len(specs), arch, B2, 128, policy, tp=tp)
        b_shared, b_attention = step_launch_counts(plan, arch.num_layers)
        assert a_shared is b_shared
        assert len(a_attention) == len(b_attention)
        a = a_device.time_launches(a_shared, a_attention, num_requests=len(specs))
        b = b_device.time_launches(b_shared, b_attention, num_requests=len(specs))
        assert (a.sim_s, a.device_s, a.flops, a.hbm_bytes) == (b.sim_s, b.device_s, b.flops,
                                                                b.hbm_bytes)
        assert np.array_equal(a.cube_busy_s, b.cube_busy_s)


@pytest.mark.parametrize("chip", [B2, SLOW_HBM])
@pytest.mark.parametrize("model,tp,policy", [("llama-2-7b", 1, DEFAULT_POLICY),
                                             ("llama-2-7b", 1, BASELINE_POLICY),
                                             ("llama-2-7b", 1, LoweringPolicy(weights="w4a16")),
                                             ("qwen2.5-72b", 4, DEFAULT_POLICY)])
def test_shared_sums_are_the_timings_step_sums(model, tp, policy, chip) -> None:
    """What a template reads of a shared kernel on a device without timelines (its LaunchSums,
    for GEMM and vector kernels) is what it reads of the kernel's KernelTiming, bit for bit:
    single and split-K GEMMs (Qwen's, on four cards), quantized (mix) GEMMs, pad copies, vector
    kernels, collectives, bandwidth-bound launches (stretched busy cycles)."""
    arch = get_arch(model)
    fast, general = Device(chip, compute=False, timeline=False), Device(chip, compute=False)
    kinds = set()
    for specs in BATCHES:
        plan = lower_step(chunks(specs), len(specs), arch, chip, 128, policy, tp=tp)
        shared, _ = step_launch_counts(plan, arch.num_layers)
        for kernel, _ in shared:
            if kernel is None:
                continue
            a, b = fast._shared_sums(kernel), general.time(kernel)
            assert fast._shared_sums(kernel) is a  # kept
            if isinstance(kernel, GemmKernel | VectorKernel):
                assert isinstance(a, LaunchSums)
                kinds.add((type(kernel), kernel.reduce_tasks is not None
                           if isinstance(kernel, GemmKernel) else False, b.bound))
            assert (a.primitive, a.primitive_name, a.seconds, a.num_tasks) == (
                b.primitive, b.primitive_name, b.seconds, b.num_tasks)
            assert a.step_sums.tobytes() == b.step_sums.tobytes()
    assert {kind for kind, *_ in kinds} == {GemmKernel, VectorKernel}
    if chip is SLOW_HBM:
        assert "hbm" in {bound for *_, bound in kinds}


def assert_same_step_trace(a: StepTrace, b: StepTrace) -> None:
    """a and b report the same step, bit for bit (all but the timeline)."""
    for field in ("sim_s", "device_s", "host_s", "num_launches", "cube_utilization",
                  "vector_utilization", "hbm_bytes", "flops", "mfu", "padding_waste_ratio"):
        assert getattr(a, field) == getattr(b, field), field
    assert np.array_equal(a.cube_busy_s, b.cube_busy_s)
    assert np.array_equal(a.vector_busy_s, b.vector_busy_s)
    assert list(a.kernel_s_by_primitive.items()) == list(b.kernel_s_by_primitive.items())


def _same_template(a: StepTemplate, b: StepTemplate) -> None:
    for field in dataclasses.fields(StepTemplate):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None and x.shape == y.shape, field.name
            assert np.array_equal(x, y), field.name  # bit for bit: whole sums, same order
        elif field.name != "launches":
            assert x == y, field.name
    assert list(a.shared_seconds.items()) == list(b.shared_seconds.items())


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("tail_size", [0, 1, 3])
def test_extend_template_is_build_template_of_head_and_tail(own, tail_size) -> None:
    """A head's template extended by a tail is the template of both built at once, with the
    step's own kernels in the head (as the lowering splits them) or none at all."""
    arch = get_arch("llama-2-7b")
    plan = lower_step(chunks(BATCHES[0]), 4, arch, B2, 128)
    device = Device(B2, compute=False)
    shared, _ = step_launch_counts(plan, arch.num_layers)
    pairs = [(None if k is None else device.time(k), n) for k, n in shared]
    if not own:
        pairs = [(t, n) for t, n in pairs if t is not None]
    head, tail = pairs[:len(pairs) - tail_size], pairs[len(pairs) - tail_size:]
    size = device._step_sums_size
    whole = build_template(shared, pairs, size)
    extended = extend_template(build_template(shared.head, head, size), shared, tail, size)
    _same_template(extended, whole)
