"""Timing harness: lower one step of any model shape on hand-made chunks and time it on a
timing-only Device. For sweeps and tests; the engine's own timing-only path is its runner.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.arch import ModelArch
from engine.arch_presets import get_arch
from engine.config import DEFAULT_NPU
from engine.lowering import DEFAULT_POLICY, ChunkShape, LoweringPolicy, lower_step, step_launches
from npu_sim.device import Device
from npu_sim.hardware import ChipSpec, get_chip
from npu_sim.trace import StepTrace


def fake_chunks(specs: Sequence[tuple[int, int]], block_size: int) -> list[ChunkShape]:
    """ChunkShapes for (start_pos, num_tokens) pairs, with disjoint consecutive block tables."""
    chunks, next_block = [], 0
    for start_pos, num_tokens in specs:
        n = -(-(start_pos + num_tokens) // block_size)
        chunks.append(ChunkShape(start_pos, num_tokens, tuple(range(next_block, next_block + n))))
        next_block += n
    return chunks


def time_step(arch: ModelArch | str, specs: Sequence[tuple[int, int]],
              chip: ChipSpec | str = DEFAULT_NPU, *, block_size: int = 128,
              num_sampled: int | None = None, policy: LoweringPolicy = DEFAULT_POLICY,
              device: Device | None = None, dtype: str = "bf16", tp: int = 1) -> StepTrace:
    """Lower and time one step of `arch` on (start_pos, num_tokens) chunks, timing only.

    Every chunk samples unless `num_sampled` says how many do. The launches are the forward's
    (engine.lowering.step_launches), made on `device` (a fresh timing-only one by default); with
    `tp` > 1 they are one card's of a tensor-parallel group, collectives included.
    """
    arch = get_arch(arch) if isinstance(arch, str) else arch
    chip = get_chip(chip) if isinstance(chip, str) else chip
    device = device or Device(chip, compute=False, dtype=dtype)
    chunks = fake_chunks(specs, block_size)
    plan = lower_step(chunks, len(chunks) if num_sampled is None else num_sampled, arch,
                      device.chip, block_size, policy, tp)
    device.begin_step()
    for kernel in step_launches(plan, arch.num_layers):
        device.launch(kernel)
    return device.end_step(num_requests=len(chunks))
