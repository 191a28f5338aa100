"""engine.frozen: the boundary types built once per step without their __init__ are the
instances their constructors build: every field set, the same values, still frozen."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from engine.frozen import build_frozen
from engine.output_processor import _StepStats
from engine.outputs import SchedulerOutput
from engine.scheduler import Scheduler
from engine.stats import IterationStats

MakeScheduler = Callable[..., Scheduler]


def _assert_constructed(built: Any) -> None:
    """`built` has exactly its class's fields and equals what the constructor makes of them."""
    cls = type(built)
    fields = {f.name: getattr(built, f.name) for f in dataclasses.fields(cls)}
    assert set(vars(built)) == set(fields), cls.__name__
    assert built == cls(**fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, next(iter(fields)), None)


def test_build_frozen_is_the_constructor() -> None:
    out = build_frozen(SchedulerOutput, chunks=(), preempted_ids=("a",), finished_ids=(),
                       new_requests=(), num_drafts_to_propose={}, kv_transfer_ids=(),
                       num_decodes=0)
    _assert_constructed(out)


def test_a_step_builds_whole_scheduler_outputs(make_scheduler: MakeScheduler,
                                                make_request: Callable[..., Any]) -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 6))
    _assert_constructed(scheduler.schedule())
    _assert_constructed(scheduler.schedule())  # (an empty one too: nothing left to run)


def test_a_step_builds_whole_iteration_stats() -> None:
    stats = _StepStats([])
    stats.itls_s.append(0.5)
    built = stats.build(0.01, 0.002, None)
    assert isinstance(built, IterationStats) and built.inter_token_latencies_s == (0.5,)
    _assert_constructed(built)
