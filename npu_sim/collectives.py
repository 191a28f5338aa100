"""Collectives of a tensor-parallel group over HCCS: latency + bytes / bandwidth.

A 910B node's 8 NPUs form an HCCS full mesh (ChipSpec.hccs_*). HCCL runs an all-reduce of a
B-byte tensor over n ranks as a ring schedule, reduce-scatter then all-gather: 2 (n - 1) steps,
each moving B / n bytes per rank; an all-gather of a B-byte output is n - 1 such steps. In the
full mesh a rank drives all its n - 1 links at once, so each step runs at (n - 1) x the achieved
link rate; the measured busbw grows with n accordingly (CC1: 18 / 45 / 126 GB/s at 2 / 4 / 8
cards, ~(n - 1) x 17 GB/s), which a ring over single links would keep flat. So

    t = collective_launch_s + steps x (hccs_latency_s + (B / n) / ((n - 1) x link x efficiency))

and a large message's algbw (B / t) tends to n x link / 2 for all-reduce, n x link for
all-gather. Calibration (CC1, CC2) fits the efficiency; latency and launch cost are MSM's.

A point-to-point copy (P/D disaggregation moving a request's KV from a prefill NPU to a decode
NPU) uses one link: an HCCS link of the mesh inside a node, or the NPU's RoCE NIC between nodes:

    t = collective_launch_s + link latency + B / (link rate x efficiency)
"""

from __future__ import annotations

from typing import Literal

from npu_sim.hardware import ChipSpec
from npu_sim.tasks import CollectiveOp

Link = Literal["hccs", "roce"]  # inside one node's HCCS mesh, or between nodes over RoCE


def ring_steps(op: CollectiveOp, world_size: int) -> int:
    """Ring steps of `op` over `world_size` ranks."""
    n = world_size - 1
    return 2 * n if op is CollectiveOp.ALL_REDUCE else n


def collective_seconds(op: CollectiveOp, num_bytes: float, world_size: int,
                       chip: ChipSpec) -> float:
    """Seconds of one `op` over `world_size` NPUs of one node, `num_bytes` the whole tensor
    (all-reduce) or the whole output (all-gather); 0 for a group of one."""
    if world_size < 1 or world_size > chip.hccs_ranks:
        raise ValueError(f"a tensor-parallel group is 1 to {chip.hccs_ranks} NPUs of one node "
                         f"({chip.name}'s HCCS mesh), got {world_size}")
    if world_size == 1:
        return 0.0
    step_bw = (world_size - 1) * chip.hccs_link_bytes_per_s * chip.hccs_efficiency
    per_step = chip.hccs_latency_s + num_bytes / world_size / step_bw
    return chip.collective_launch_s + ring_steps(op, world_size) * per_step


def algbw_bytes_per_s(op: CollectiveOp, num_bytes: float, world_size: int,
                      chip: ChipSpec) -> float:
    """Algorithm bandwidth as collective benchmarks report it: message bytes / time."""
    return num_bytes / collective_seconds(op, num_bytes, world_size, chip)


def bytes_moved(op: CollectiveOp, num_bytes: float, world_size: int) -> float:
    """Bytes one rank sends (= receives) over HCCS in the ring schedule."""
    return ring_steps(op, world_size) * num_bytes / world_size if world_size > 1 else 0.0


def p2p_seconds(num_bytes: float, link: Link, chip: ChipSpec) -> float:
    """Seconds to copy `num_bytes` from one NPU to another over one `link` (module docstring)."""
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be non-negative, got {num_bytes}")
    if link == "hccs":
        rate, latency = chip.hccs_link_bytes_per_s * chip.hccs_efficiency, chip.hccs_latency_s
    elif link == "roce":
        rate, latency = chip.roce_bytes_per_s * chip.roce_efficiency, chip.roce_latency_s
    else:
        raise ValueError(f"unknown link {link!r} (hccs, roce)")
    return chip.collective_launch_s + latency + num_bytes / rate
