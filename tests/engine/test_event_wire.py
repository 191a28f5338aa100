"""engine.event_wire: every event the engine process sends comes out of the pipe's framing as it
went in (a step's as MessagePack, the rest pickled)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.engine_loop import Admitted, Compiled, Deliver, Died, Stepped
from engine.event_wire import EventWire
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import FinishReason, RequestRejected
from engine.stats import (
    FinishedRequestStats,
    GrammarStats,
    IterationStats,
    RequestMetrics,
    SchedulerStats,
    SpecDecodingStats,
)
from npu_sim.hardware import get_chip
from npu_sim.host import DEFAULT_STACK, get_stack
from npu_sim.trace import StepTrace, summed_step_trace

METRICS = RequestMetrics(queue_s=0.01, ttft_s=0.1, e2e_s=1.5, ttft_sim_s=0.02, e2e_sim_s=0.3,
                         num_prompt_tokens=15, num_output_tokens=128, queue_sim_s=0.001,
                         prefill_s=0.09, decode_s=1.4, inference_s=1.49)


def a_trace() -> StepTrace:
    chip = get_chip("910b2")
    sums = np.arange(7 + chip.num_cube_cores + chip.num_vector_cores, dtype=np.float64) + 1.0
    return summed_step_trace(chip.name, chip.clock_hz, get_stack(DEFAULT_STACK), 3,
                             chip.num_cube_cores, 3e14, sums, 10, {"gemm": 1e-3, "vector": 2e-4})


def a_step(trace: StepTrace | None) -> Stepped:
    outputs = [
        RequestOutput("cmpl-a-0", (34,), "2", None, None, 15, 122),
        RequestOutput("cmpl-b-0", (2073, 11), " full\u00e9\U0001f642", (
            TokenLogprob(2073, -0.25, 1, ((2073, -0.25), (11, -1.5))),
            TokenLogprob(11, -3.0, 4)), FinishReason.LENGTH, 7, 2, METRICS),
        RequestOutput("cmpl-c-0", (), "", None, FinishReason.ABORT, 3, 0),
    ]
    stats = SchedulerStats(num_running_reqs=16, num_waiting_reqs=2, kv_cache_usage=0.0879,
                           num_preemptions=1, num_free_blocks=332, prefix_cache_queries=510,
                           prefix_cache_hits=32)
    iteration = IterationStats(
        num_prompt_tokens=7, num_generation_tokens=16, num_preempted_reqs=0, step_s=0.0157,
        step_sim_s=0.0026, ttfts_s=(0.1,), ttfts_sim_s=(0.02,),
        inter_token_latencies_s=(0.0166,) * 16, inter_token_latencies_sim_s=(0.0026,) * 16,
        finished=(FinishedRequestStats("length", METRICS, max_tokens=2, n=3),), trace=trace,
        spec=SpecDecodingStats(4, 12, 7, (4, 2, 1)), grammar=GrammarStats((0.5, 0.25), 3))
    return Stepped(outputs, stats, iteration)


@pytest.mark.parametrize("with_trace", [True, False])
def test_a_step_crosses_whole(with_trace: bool) -> None:
    wire = EventWire()
    trace = a_trace() if with_trace else None
    event = a_step(trace)
    frame = wire.encode(event)
    assert frame[:1] == b"S"
    back = EventWire().decode(frame)  # (the other side has a wire of its own)
    assert type(back) is Stepped
    assert back.outputs == event.outputs and back.stats == event.stats
    assert type(back.outputs[1].finish_reason) is FinishReason
    assert isinstance(back.outputs[1].new_logprobs[0].top, tuple)
    assert back.iteration_stats is not None and event.iteration_stats is not None
    assert dataclasses.replace(back.iteration_stats, trace=None) == dataclasses.replace(
        event.iteration_stats, trace=None)
    if trace is None:
        assert back.iteration_stats.trace is None
        return
    got = back.iteration_stats.trace
    assert type(got) is StepTrace
    for field in dataclasses.fields(StepTrace):
        value, expected = getattr(got, field.name), getattr(trace, field.name)
        assert (np.array_equal(value, expected) if isinstance(expected, np.ndarray)
                else value == expected), field.name


def test_a_step_without_stats_crosses_whole() -> None:
    event = Stepped([], SchedulerStats(0, 0, 0.0, 0, 400), None)
    assert EventWire().decode(EventWire().encode(event)) == event


@pytest.mark.parametrize("event", [
    Admitted(),
    Deliver("cmpl-x-0", RequestOutput("cmpl-x-0", (), "", None, FinishReason.ABORT, 3, 0)),
    Compiled(7, None),
    Died("the engine loop failed: boom"),
])
def test_other_events_are_pickled(event: object) -> None:
    frame = EventWire().encode(event)  # type: ignore[arg-type]
    assert frame[:1] == b"P"
    assert EventWire().decode(frame) == event


def test_errors_inside_events_keep_their_type_and_fields() -> None:
    wire = EventWire()
    back = wire.decode(wire.encode(Deliver("cmpl-x-0", RequestRejected(
        "too long", param="max_tokens", code="context_length_exceeded"))))
    assert isinstance(back, Deliver) and isinstance(back.item, RequestRejected)
    assert (str(back.item), back.item.param, back.item.code) == (
        "too long", "max_tokens", "context_length_exceeded")
