"""The resident-memory watcher: when it trims (TrimTrigger), and that its loop trims exactly then,
on fake readings (no clock, no sleeping); plus the real pieces it stands on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from engine.allocator import (
    can_release_freed_memory,
    keep_freed_tensor_memory,
    limit_malloc_arenas,
    release_freed_memory,
)
from server.memory import TrimTrigger, resident_bytes, watch_resident_memory

MiB = 1 << 20


def test_trims_only_beyond_the_growth_over_the_low_point() -> None:
    trigger = TrimTrigger(1000 * MiB, growth_bytes=256 * MiB)
    assert not trigger.should_trim(1256 * MiB)  # at the bound: kept
    assert trigger.should_trim(1257 * MiB)
    assert trigger.floor_bytes == 1000 * MiB  # a trim is only asked for, not assumed


def test_the_low_point_follows_the_resident_set_down() -> None:
    trigger = TrimTrigger(1000 * MiB, growth_bytes=256 * MiB)
    assert not trigger.should_trim(800 * MiB)
    assert trigger.floor_bytes == 800 * MiB
    assert not trigger.should_trim(1000 * MiB)  # back up by 200 MiB: under the bound
    assert trigger.floor_bytes == 800 * MiB
    assert trigger.should_trim(1100 * MiB)  # 300 MiB over the new low point


def test_what_a_trim_leaves_is_the_new_floor() -> None:
    """Memory in use that a trim cannot give back asks for no second trim at the next look."""
    trigger = TrimTrigger(1000 * MiB, growth_bytes=256 * MiB)
    assert trigger.should_trim(1600 * MiB)
    trigger.trimmed(1500 * MiB)  # 100 MiB went back; 1500 MiB is in use
    assert not trigger.should_trim(1500 * MiB)
    assert not trigger.should_trim(1700 * MiB)
    assert trigger.should_trim(1800 * MiB)


class Stop(Exception):
    """Raised by the fake reader when its readings run out: ends the watcher's loop."""


def run_watcher(readings: list[int | None], released: list[int | None]) -> list[int]:
    """Runs the watcher over `readings` (one at its start, then one per look and one after each
    trim); a trim pops the next of `released` as what the reader then sees. Returns the looks
    (indices into the readings before each trim) at which it trimmed."""
    pending: Iterator[int | None] = iter(readings)
    looks: list[int] = []
    seen: list[int | None] = []

    def read() -> int | None:
        for value in pending:
            seen.append(value)
            return value
        raise Stop

    def release() -> bool:
        looks.append(len(seen) - 1)
        after = released.pop(0)
        nonlocal pending
        pending = iter([after, *pending])
        return True

    async def no_sleep(_: float) -> None:
        pass

    with pytest.raises(Stop):
        asyncio.run(watch_resident_memory(5.0, 256 * MiB, read_resident=read, release=release,
                                          sleep=no_sleep))
    return looks


def test_watcher_trims_when_the_trigger_says_and_rebases_on_what_is_left() -> None:
    readings = [1000 * MiB, 1100 * MiB, 1300 * MiB,  # start, under, over: trim
                1250 * MiB, 1500 * MiB, 1600 * MiB]  # over 1250 by 250, then by 350: trim
    looks = run_watcher(readings, released=[1250 * MiB, 1300 * MiB])
    assert looks == [2, 6]  # the reading of 1300 MiB, then of 1600 MiB (after the inserted 1250)


def test_watcher_skips_unreadable_looks_and_stops_where_nothing_is_readable() -> None:
    assert run_watcher([1000 * MiB, None, 2000 * MiB], released=[1000 * MiB]) == [2]
    asyncio.run(watch_resident_memory(read_resident=lambda: None))  # returns at once


def test_freed_heap_memory_stays_resident_until_trimmed() -> None:
    """The premise: 128 MiB of request-sized buffers interleaved with survivors stay resident
    after they are freed (glibc keeps free pages between chunks in use), and a trim gives them
    back."""
    if not can_release_freed_memory():
        pytest.skip("no malloc_trim in this C library")
    base = resident_bytes()
    assert base is not None
    buffers, survivors = [], []
    for i in range(2048):
        buffers.append(bytes([i % 256]) * (64 << 10))  # from the heap: under any mmap threshold
        survivors.append(bytes([i % 256]) * 600)  # malloc'ed too (over pymalloc's 512 bytes)
    del buffers
    freed = resident_bytes()
    release_freed_memory()
    trimmed = resident_bytes()
    assert freed is not None and trimmed is not None
    assert freed - base > 96 * MiB
    assert freed - trimmed > 96 * MiB
    assert len(survivors) == 2048


@pytest.mark.parametrize("variable", ["MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_"])
def test_the_users_malloc_tunables_win(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Where the user tuned glibc (MALLOC_ARENA_MAX=1, say), the engine's tuning stays off."""
    monkeypatch.setenv(variable, "1")
    assert not keep_freed_tensor_memory()
    assert limit_malloc_arenas() == (variable != "MALLOC_ARENA_MAX")
