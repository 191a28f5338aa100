"""Resident memory stays bounded: what the process frees goes back to the OS when it piles up
(the server's process: the HTTP front end, and the engine too where its loop runs on a thread).

glibc keeps freed memory for reuse: up to the trim threshold at the top of the heap (256 MiB:
engine.allocator.keep_freed_tensor_memory, so that a step's large temporaries do not page-fault
every step) and, below the top, every free page between chunks still in use. Below the mmap
threshold that function raises to 32 MiB, a request's short-lived buffers (a 4 MiB body, the list
of its million token ids, the tokenizer's encodings of a long text) come from the heap, scattered
among long-lived objects, so after a burst of big requests their pages stay resident.
`watch_resident_memory` looks at the resident set every CHECK_INTERVAL_S and, once it has grown
by more than TRIM_GROWTH_BYTES over its low point since the last trim (TrimTrigger), hands the
heap's free pages back (malloc_trim, on a worker thread: glibc locks one arena at a time, so the
process's other threads wait at most for one arena's walk; where the engine loop shares the
process, its next step may page-fault once). Memory
in use is never touched: after a trim, what remains is the new low point, so growth that is real
(KV pages touched for the first time, caches filling) costs one trim per TRIM_GROWTH_BYTES, not
one per look. The resident set thus stays within TRIM_GROWTH_BYTES of what is in use, plus what
a trim cannot reach: the top of the one arena besides the main one (allocator.MALLOC_ARENAS).

Measured on the default model (benchmarks/memory_soak.py; README, Reliability and limits): 1575
MiB after load, 1651 after 10,000 mixed calls, 2046 right after 20 bodies of 4 MiB and 1687 once
a trim gave back 359 MiB. With glibc's default heaps the bodies left 1861 to 2079 MiB, watcher or
not (its trims gave back 17 to 65 MiB).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from engine.allocator import can_release_freed_memory, release_freed_memory

logger = logging.getLogger("xyserve")

CHECK_INTERVAL_S = 5.0  # wall seconds between looks at the resident set
TRIM_GROWTH_BYTES = 256 << 20  # growth of the resident set over its low point that triggers a
#   trim: the freed memory glibc may keep at a heap's top anyway (keep_freed_tensor_memory)


def resident_bytes() -> int | None:
    """The process's resident set in bytes (Linux /proc/self/statm); None where unreadable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class TrimTrigger:
    """When to trim: the resident set's low point since the last trim, and how far above it the
    resident set may go before freed memory is handed back."""

    def __init__(self, resident_bytes: int, growth_bytes: int = TRIM_GROWTH_BYTES) -> None:
        self.floor_bytes = resident_bytes  # the lowest resident set seen since the last trim
        self.growth_bytes = growth_bytes

    def should_trim(self, resident_bytes: int) -> bool:
        """Whether the resident set `resident_bytes` calls for a trim (else it may lower the
        floor)."""
        if resident_bytes - self.floor_bytes > self.growth_bytes:
            return True
        self.floor_bytes = min(self.floor_bytes, resident_bytes)
        return False

    def trimmed(self, resident_bytes: int) -> None:
        """A trim left `resident_bytes` resident: all of it in use, the new floor."""
        self.floor_bytes = resident_bytes


async def watch_resident_memory(
        interval_s: float = CHECK_INTERVAL_S, growth_bytes: int = TRIM_GROWTH_BYTES, *,
        read_resident: Callable[[], int | None] = resident_bytes,
        release: Callable[[], bool] = release_freed_memory,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Run until cancelled: every `interval_s`, read the resident set and, when the trigger says
    so, release the heap's freed memory on a worker thread. Returns at once where the resident
    set cannot be read."""
    start = read_resident()
    if start is None:
        return
    trigger = TrimTrigger(start, growth_bytes)
    while True:
        await sleep(interval_s)
        before = read_resident()
        if before is None or not trigger.should_trim(before):
            continue
        await asyncio.to_thread(release)
        after = read_resident() or before
        trigger.trimmed(after)
        logger.debug("returned %.0f MiB of freed memory to the OS (resident %.0f -> %.0f MiB)",
                     (before - after) / 2**20, before / 2**20, after / 2**20)


def start_memory_watch() -> asyncio.Task[None] | None:
    """The watcher as a task of the running loop, or None where nothing can be released (no
    glibc malloc_trim)."""
    if not can_release_freed_memory():
        return None
    return asyncio.create_task(watch_resident_memory(), name="xyserve-memory-watch")


async def stop_memory_watch(task: asyncio.Task[None] | None) -> None:
    """Cancel the watcher and wait for it (a trim in flight finishes on its thread)."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})  # its cancellation stays its own, not the caller's
