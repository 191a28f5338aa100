"""The CPUs this process may use, without torch (the CLI's --help, the simulator read them).

`usable_cores`: the affinity mask's CPUs (containers and taskset narrow it); `cgroup_cpu_quota`:
a container's CPU quota (--cpus), which the mask does not show; `second_core_free`: whether a
helper process may have a core of its own (the simulator's head-template worker,
engine.head_prefetch).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask; containers and taskset narrow it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs this process's cgroup may use (cgroup v2's cpu.max, else v1's CFS quota), or
    None where there is no quota (or no cgroup file to read)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def second_core_free() -> bool:
    """Whether a worker may be forked onto a core of its own: Linux, at least two cores this
    process may run on, and a cgroup CPU quota (a container's --cpus) of two or more, if any."""
    if sys.platform != "linux" or usable_cores() < 2:
        return False
    quota = cgroup_cpu_quota()
    return quota is None or quota >= 2.0
