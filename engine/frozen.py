"""Frozen dataclasses built without their __init__, for the few built once per engine step.

A frozen dataclass's generated __init__ sets each field with object.__setattr__ (a frozen
class forbids plain assignment): ~1.7 us for IterationStats' thirteen fields, where filling
the instance's __dict__ at once takes ~0.6. The engine builds a SchedulerOutput and an
IterationStats every step; a simulation makes tens of thousands of steps, so that is ~1.5% of
its wall time. The instance is the same (frozen as ever: its __setattr__ still refuses), as
long as every field is given: tests/engine/test_frozen.py holds each such use to that.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def build_frozen(cls: type[T], **fields: Any) -> T:
    """`cls(**fields)` for a frozen dataclass without __post_init__ or slots, given every one
    of its fields (defaults are not filled in)."""
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance
