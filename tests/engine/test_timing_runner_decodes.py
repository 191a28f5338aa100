"""The timing-only runner times a step of decodes (a token per chunk, no drafts) from its
context lengths alone (TimingRunner._time_unsplit: engine.lowering_unsplit.lower_decodes,
Device.time_decodes, no attention kernel built), and a step with prefill chunks from its
lengths read once (lower_unsplit), its shared launches kept: every StepTrace field the general
path gives
(lower_step_counts, Device.time_launches), bit for bit, and the same device counters, for MHA
and GQA models and a tensor-parallel shard, on 910B2 and 910B3, batches of 1 to 256 rows with
contexts around KV block and KV split boundaries, first steps of a batch size (timed the
general way, their shared launches kept) and later ones; batches it does not take (split KV,
drafts) fall back to the general path."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import native_build
from engine import timing_runner
from engine.arch_presets import resolve_arch
from engine.lowering import BASELINE_POLICY, lower_step_counts
from engine.lowering_unsplit import lower_decodes, lower_unsplit
from engine.outputs import ScheduledChunk, SchedulerOutput
from engine.timing_runner import TimingRunner
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.trace import StepTrace

BLOCK = 128
MODELS = [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)]  # MHA, GQA, TP=4


def _chunks(starts: list[int], num_tokens: int | list[int] = 1,
            unsampled: int = 0) -> tuple[ScheduledChunk, ...]:
    """Chunks of num_tokens tokens (each chunk's, or all alike) from `starts`, all sampled but
    every `unsampled`-th (a prefill chunk's last token short of its prompt's end)."""
    counts = num_tokens if isinstance(num_tokens, list) else [num_tokens] * len(starts)
    return tuple(ScheduledChunk(f"r{i}", start, (7,) * n, tuple(range(-(-(start + n) // BLOCK))),
                                not unsampled or i % unsampled > 0)
                 for i, (start, n) in enumerate(zip(starts, counts, strict=True)))


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


def _mixed(seed: int) -> list[tuple[list[int], list[int]]]:
    """Mixed batches (start positions, token counts): the decode batches' first half, with one
    to three chunks of 2 to 2048 tokens among them (short prompts, chunks on KV block edges,
    chunks of long prompts, some splitting a tile), in random places; then each again, in
    reverse order, then in order (a batch at an odd place of the list has fewer sampled rows:
    its tokens again with other sampled rows, then its very tokens and sampled rows again)."""
    rng = random.Random(seed)
    mixed = []
    decodes = _batches(seed)
    for starts in decodes[:len(decodes) // 2]:
        if max(starts) > 2000:  # long contexts (most of them split a GQA tile): a few
            starts = starts[:2]
        starts, counts = list(starts), [1] * len(starts)
        for _ in range(rng.randrange(1, 4)):
            s = rng.randrange(len(starts))
            counts[s] = rng.choice([2, 5, 127, 128, 129, 300, 1000, 2048])
            starts[s] = rng.choice([0, 0, BLOCK - 1, 3 * BLOCK, rng.randrange(0, 3000)])
        mixed.append((starts, counts))
    return mixed + mixed[::-1] + mixed


def _assert_runner_as_general(model: str, tp: int, chip_name: str,
                              batches: list[tuple[list[int], list[int]]],
                              monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Each batch (start positions, token counts) stepped by a runner and timed the general
    way: the same traces and device counters. Returns the steps the runner lowered from their
    lengths (decode steps timed without a kernel, other steps lowered by lower_unsplit; either
    in C by Device.time_unsplit), those
    it lowered the general way (lower_step_counts), and its (tokens, sampled rows) kept."""
    arch, chip = resolve_arch(model), get_chip(chip_name)
    runner = TimingRunner(arch, Device(chip, compute=False, timeline=False), BLOCK,
                          tensor_parallel_size=tp)
    general = Device(chip, compute=False, timeline=False)
    taken = {"decodes": 0, "unsplit": 0, "general": 0}

    def counted(name: str, lower: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = lower(*args, **kwargs)
            taken[name] += out is not None
            return out
        return call

    monkeypatch.setattr(timing_runner, "lower_decodes", counted("decodes", lower_decodes))
    monkeypatch.setattr(timing_runner, "lower_unsplit", counted("unsplit", lower_unsplit))
    # (steps lowered and priced from their lengths in C: decodes, or unsplit with prefills)
    time_unsplit = runner.device.time_unsplit

    def timed_in_c(shared: Any, start_pos: Any, num_tokens: Any, *args: Any,
                   **kwargs: Any) -> Any:
        out = time_unsplit(shared, start_pos, num_tokens, *args, **kwargs)
        taken["decodes" if num_tokens is None else "unsplit"] += out is not None
        return out

    monkeypatch.setattr(runner.device, "time_unsplit", timed_in_c)
    monkeypatch.setattr(timing_runner, "lower_step_counts",
                        counted("general", timing_runner.lower_step_counts))
    for i, (starts, counts) in enumerate(batches):
        chunks = _chunks(starts, counts, unsampled=3 * (i % 2))  # sampled rows fewer or not
        num_sampled = sum(c.sample for c in chunks)
        # a batch of sampled one-token chunks says so, as the scheduler does (num_decodes:
        # the runner reads no chunk's length); the others (every other one samples fewer) not
        decodes = all(c.sample and len(c.token_ids) == 1 for c in chunks)
        output = runner.execute(SchedulerOutput(chunks, num_decodes=len(chunks) * decodes))
        assert output.sampled_token_ids == {c.request_id: (timing_runner.SYNTHETIC_TOKEN_ID,)
                                            for c in chunks if c.sample}
        fast = output.trace
        shared, attention = lower_step_counts(chunks, num_sampled, arch, chip, BLOCK,
                                              arch.num_layers, tp=tp)
        assert_same_trace(fast, general.time_launches(shared, attention, len(chunks)))
    assert runner.device.num_launches == general.num_launches
    assert runner.device.num_tasks == general.num_tasks
    assert runner.device.total_sim_s == general.total_sim_s
    return {**taken, "kept": len(runner._shared_launches)}


@pytest.mark.parametrize("model,tp", MODELS)
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_decode_steps_time_as_the_general_path_does(model: str, tp: int, chip_name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [(starts, [1] * len(starts)) for starts in _batches(len(model) + tp)]
    taken = _assert_runner_as_general(model, tp, chip_name, batches, monkeypatch)
    assert taken["decodes"] >= 20  # the later steps of each batch size, but the split ones


@pytest.mark.parametrize("model,tp", MODELS)
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_mixed_steps_time_as_the_general_path_does(model: str, tp: int, chip_name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _mixed(len(model) + tp)
    taken = _assert_runner_as_general(model, tp, chip_name, batches, monkeypatch)
    assert taken["unsplit"] >= 12  # later steps of a (tokens, sampled rows), tiles unsplit
    # shared launches made of earlier steps' heads and tails: more kept than lowered the
    # general way (the first step of a (tokens, sampled rows) or a split one)
    assert taken["kept"] > taken["general"], taken


def test_steps_without_the_c_library_time_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the simulator's C library (no compiler) steps are lowered in Python
    (lower_decodes, lower_unsplit) and summed in numpy: the general path's traces still."""
    decodes = [(starts, [1] * len(starts)) for starts in _batches(7)]
    with native_build.disabled():
        taken = _assert_runner_as_general("llama-3-8b", 1, "910b2", decodes + _mixed(7),
                                          monkeypatch)
    assert taken["decodes"] >= 20 and taken["unsplit"] >= 12


def test_other_steps_take_the_general_path() -> None:
    """Split KV tiles, chunks of no token, the split baseline's lowering and a cost model
    without its row memo are not steps the runner times from their lengths; a step's first
    of its (tokens, sampled rows) lowers its shared launches from those counts alone."""
    arch, chip = resolve_arch("llama-3-8b"), get_chip("910b2")  # GQA: a long row splits
    runner = TimingRunner(arch, Device(chip, compute=False, timeline=False), BLOCK)
    mixed = _chunks([100, 200, 300], [1, 1, 5])
    split = (_chunks([30000]), _chunks([30000, 0], [1, 5]))  # a long row: a split tile
    for chunks in (mixed, _chunks([100, 200])):
        assert runner._time_unsplit(chunks, 3) is not None  # first of its counts too
    for chunks in (*split, *split):
        assert runner._time_unsplit(chunks, 3) is None
    assert runner._time_unsplit(_chunks([100, 200, 300], [0, 1, 6]), 3) is None  # a chunk of 0
    assert runner._time_unsplit(mixed, 3) is not None
    assert runner._time_unsplit(_chunks([100, 200]), 3) is not None
    runner.device.cost_model.memo_rows = False  # no pricing from lengths
    assert runner._time_unsplit(_chunks([100, 200]), 3) is None
    baseline = TimingRunner(arch, Device(chip, compute=False, timeline=False), BLOCK,
                            policy=BASELINE_POLICY)
    assert baseline._time_unsplit(_chunks([100, 200]), 2) is None
