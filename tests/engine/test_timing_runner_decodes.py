"""The timing-only runner times a step of decodes (a token per chunk, no drafts) from its
context lengths alone (TimingRunner._time_decodes: engine.lowering_attention.lower_decodes,
Device.time_decodes, no attention kernel built): every StepTrace field the general path gives
(lower_step_counts, Device.time_launches), bit for bit, and the same device counters, for MHA
and GQA models and a tensor-parallel shard, on 910B2 and 910B3, batches of 1 to 256 rows with
contexts around KV block and KV split boundaries, first steps of a batch size (timed the
general way, their shared launches kept) and later ones; batches it does not take (split KV,
other chunks) fall back to the general path."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from engine.arch_presets import resolve_arch
from engine.lowering import BASELINE_POLICY, lower_step_counts
from engine.outputs import ScheduledChunk, SchedulerOutput
from engine.timing_runner import TimingRunner
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.trace import StepTrace

BLOCK = 128
MODELS = [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)]  # MHA, GQA, TP=4


def _chunks(starts: list[int], num_tokens: int = 1,
            unsampled: int = 0) -> tuple[ScheduledChunk, ...]:
    """Chunks of num_tokens tokens from `starts`, all sampled but every `unsampled`-th (a
    prefill chunk's last token short of its prompt's end)."""
    return tuple(ScheduledChunk(f"r{i}", start, (7,) * num_tokens,
                                tuple(range(-(-(start + num_tokens) // BLOCK))),
                                not unsampled or i % unsampled > 0)
                 for i, start in enumerate(starts))


def _batches(seed: int) -> list[list[int]]:
    """Decode batches' start positions: sizes 1 to 256, contexts on either side of a KV block's
    end and of the KV split threshold (a few long rows), in random order; each size again."""
    rng = random.Random(seed)
    edges = [k * BLOCK + d for k in (1, 2, 8, 9, 40) for d in (-2, -1, 0, 1)]
    batches = []
    for size in (1, 2, 3, 24, 46, 100, 256):
        for longest in (300, 1200, 9000, 40000):
            batch = [rng.randrange(0, longest) for _ in range(size)]
            batch[rng.randrange(size)] = rng.choice(edges)
            batches.append(batch)
    batches.append([1023, 1023])  # a few long rows: a split tile
    batches.append([30000])
    return batches + batches[::-1]


def assert_same_trace(a: StepTrace, b: StepTrace) -> None:
    """Every field of a and b, bit for bit (arrays and dtypes; dict items in order)."""
    for field in dataclasses.fields(StepTrace):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        elif field.name == "kernel_s_by_primitive":
            assert list(x.items()) == list(y.items()), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("model,tp", MODELS)
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_decode_steps_time_as_the_general_path_does(model: str, tp: int,
                                                    chip_name: str) -> None:
    arch, chip = resolve_arch(model), get_chip(chip_name)
    runner = TimingRunner(arch, Device(chip, compute=False, timeline=False), BLOCK,
                          tensor_parallel_size=tp)
    general = Device(chip, compute=False, timeline=False)
    taken = []
    time_decodes = runner.device.time_decodes
    runner.device.time_decodes = lambda *a, **k: taken.append(1) or time_decodes(*a, **k)
    for i, starts in enumerate(_batches(len(model) + tp)):
        chunks = _chunks(starts, unsampled=3 * (i % 2))  # sampled rows fewer than rows, or not
        num_sampled = sum(c.sample for c in chunks)
        fast = runner.execute(SchedulerOutput(chunks)).trace
        shared, attention = lower_step_counts(chunks, num_sampled, arch, chip, BLOCK,
                                              arch.num_layers, tp=tp)
        assert_same_trace(fast, general.time_launches(shared, attention, len(chunks)))
    assert runner.device.num_launches == general.num_launches
    assert runner.device.num_tasks == general.num_tasks
    assert runner.device.total_sim_s == general.total_sim_s
    assert len(taken) >= 20  # the later steps of each batch size, but the split ones


def test_other_steps_take_the_general_path() -> None:
    """Chunks of more than one token, split KV tiles and the split baseline's lowering are not
    decode steps the runner times from their lengths."""
    arch, chip = resolve_arch("llama-3-8b"), get_chip("910b2")  # GQA: a long row splits
    runner = TimingRunner(arch, Device(chip, compute=False, timeline=False), BLOCK)
    mixed = _chunks([100, 200]) + _chunks([300], num_tokens=5)
    assert runner._time_decodes(mixed, 3) is None
    assert runner._time_decodes(_chunks([30000]), 1) is None  # a single long row: split
    assert runner._time_decodes(_chunks([100, 200]), 2) is not None
    runner.device.cost_model.memo_rows = False  # no pricing from lengths
    assert runner._time_decodes(_chunks([100, 200]), 2) is None
    baseline = TimingRunner(arch, Device(chip, compute=False, timeline=False), BLOCK,
                            policy=BASELINE_POLICY)
    assert baseline._time_decodes(_chunks([100, 200]), 2) is None
