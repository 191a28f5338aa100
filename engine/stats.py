"""Plain per-step statistics the engine emits; only `server/metrics.py` turns them into series.

Nothing here imports prometheus_client: the engine records numbers, the server exports them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's queues and KV cache, taken after a step."""

    num_running_reqs: int  # requests in the running batch (admitted, holding KV blocks)
    num_waiting_reqs: int  # requests queued for admission, preempted ones included
    kv_cache_usage: float  # fraction of KV blocks in use, in [0, 1]
    num_preemptions: int  # preemptions since the scheduler started (cumulative, a counter)
    num_free_blocks: int  # KV blocks free right now
