"""Decode-only meta-attention launches are lowered without their sequence and shape tables and
priced from their context lengths (AttentionKernel.unsplit): the same kernel, the
same timing bit for bit as the tables give, for MHA, GQA and a tensor-parallel shard, on 910B
chips, with the row memo cold and warm; batches whose tiles are split or that hold a verify
chunk take the tables."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

import numpy as np
import pytest

from engine.arch_presets import resolve_arch
from engine.lowering import (
    ChunkShape,
    lower_attention,
    lower_step,
    lower_step_counts,
    step_launches,
)
from engine.lowering_tp import shard_arch
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.step_sums import LaunchSums
from npu_sim.tasks import ATTN_SEQ
from tests.npu_sim.test_unsplit_attention import general_tiles_if_unsplit

BLOCK = 128


def _decodes(rng: random.Random, n: int, longest: int = 12000) -> list[ChunkShape]:
    return [ChunkShape(start, 1, tuple(range(-(-(start + 1) // BLOCK))))
            for start in (rng.randrange(0, longest) for _ in range(n))]


def _general(kernel):  # the same kernel, its tables read: timing prices the shapes
    return dataclasses.replace(kernel, unsplit=None)


def _same_timing(a, b) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "kernel":
            continue
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-7b", 1),
                                      ("qwen2.5-72b", 4)])
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_decode_launches_time_as_their_tables_do(model: str, tp: int, chip_name: str) -> None:
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip(chip_name)
    rng = random.Random(len(model) + tp)
    fast, general = Device(chip, compute=False), Device(chip, compute=False)
    batches = [_decodes(rng, n) for n in (1, 2, 3, 7, 48, 130, 256, 400)]
    checked = 0
    for batch in batches + batches:  # again: the row memo warm
        kernel = lower_attention(batch, arch, chip, BLOCK)
        if kernel.unsplit is None:  # a tile split (GQA, few long sequences)
            assert kernel.num_partial_slots > 0
            continue
        checked += 1
        start = np.array([c.start_pos for c in batch])
        assert np.array_equal(kernel.unsplit.context_lens, start + 1)
        assert kernel.unsplit.prefill is None
        # the lazily built tables are the lowering's
        seqs = kernel.seqs
        assert seqs.dtype == ATTN_SEQ and np.array_equal(seqs["start_pos"], start)
        assert np.array_equal(seqs["q_len"], np.ones(len(batch)))
        assert np.array_equal(seqs["q_start"], np.arange(len(batch)))
        shapes = kernel.shapes
        assert np.array_equal(shapes["seq"], np.arange(len(batch)))
        assert np.array_equal(shapes["kv_block_end"] * BLOCK >= start + 1, np.ones(len(batch)))
        assert kernel.num_seqs == kernel.num_tokens == len(batch)
        _same_timing(fast.time(kernel), general.time(_general(kernel)))
        assert fast.cost_model._row_memos.keys() == general.cost_model._row_memos.keys()
    assert checked >= 4  # (GQA splits the KV of the smallest batches)


def test_launches_with_verify_chunks_or_split_tiles_take_the_tables() -> None:
    """(A batch holding a prefill chunk is said by its lengths too: tests/npu_sim/
    test_unsplit_attention.py.)"""
    arch, chip = resolve_arch("llama-3-8b"), get_chip("910b2")
    rng = random.Random(3)
    verify = [*_decodes(rng, 5), ChunkShape(100, 3, tuple(range(1)), (-1, 0))]
    split = [ChunkShape(60000, 1, tuple(range(469)))]  # one long GQA decode: its KV split
    for batch in (verify, split):
        kernel = lower_attention(batch, arch, chip, BLOCK)
        assert kernel.unsplit is None
        assert kernel.seqs is not None and kernel.shapes is not None
    assert lower_attention(split, arch, chip, BLOCK).num_partial_slots > 0
    prefill = [*_decodes(rng, 5), ChunkShape(100, 300, tuple(range(4)))]
    assert lower_attention(prefill, arch, chip, BLOCK).unsplit.prefill is not None


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)])
def test_decode_lowering_is_the_general_one(model: str, tp: int) -> None:
    """lower_attention's decode-only path (engine.lowering_unsplit.lower_unsplit) takes a batch
    exactly when the general tiling splits none of its tiles, and gives the general lowering's
    dealt order, shapes and tile rows."""
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip("910b2")
    g = arch.num_heads // arch.num_kv_heads
    rng = random.Random(7)
    taken = split = 0
    for n in (1, 2, 5, 49, 256):
        for longest in (100, 300, 1000, 1100, 12000, 60000):  # around a split's 8 blocks too
            batch = _decodes(rng, n, longest)
            kernel = lower_attention(batch, arch, chip, BLOCK)
            if general_tiles_if_unsplit(kernel, batch, arch, chip) is None:
                split += 1
            else:
                taken += 1
    assert taken and (split or g == 1)


def _launch_sums(timing) -> LaunchSums:
    return LaunchSums(timing.primitive, timing.primitive_name, timing.seconds,
                      timing.num_tasks, timing.step_sums)


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)])
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_decode_steps_sum_what_their_kernel_timings_do(model: str, tp: int,
                                                       chip_name: str) -> None:
    """A timing-only step of a decode-only batch sums its attention launch from the context
    lengths (npu_sim.launch_sums.mix_launch_sums) without a KernelTiming: the same LaunchSums as the
    launch's timing, and the same StepTrace, every field, as launching every kernel, with the
    row memo cold and warm, bound by the cores and by HBM."""
    arch, chip = resolve_arch(model), get_chip(chip_name)
    rng = random.Random(len(model) + tp)
    timed, launched = Device(chip, compute=False), Device(chip, compute=False)
    batches = [_decodes(rng, n, longest) for n in (1, 3, 48, 130, 256)
               for longest in (500, 12000)]
    bounds = set()
    for i, batch in enumerate(batches + batches):  # again: the row memo warm
        if i == len(batches):  # (a timing-only step's shared launches are counted lazily)
            assert timed.num_launches == launched.num_launches
        shared, attention = lower_step_counts(batch, len(batch), arch, chip, BLOCK,
                                              arch.num_layers, tp=tp)
        for kernel in attention:
            fast, timing = timed._launch_sums(kernel), launched.time(kernel)
            bounds.add(timing.bound)
            assert isinstance(fast, LaunchSums) == (not kernel.num_partial_slots)
            if isinstance(fast, LaunchSums):
                for name, x, y in zip(LaunchSums._fields, fast, _launch_sums(timing),
                                      strict=True):
                    assert np.array_equal(x, y) if name == "step_sums" else x == y, name
        step = timed.time_launches(shared, attention, num_requests=len(batch))
        launched.begin_step()
        plan = lower_step(batch, len(batch), arch, chip, BLOCK, tp=tp)
        for kernel in step_launches(plan, arch.num_layers):
            launched.launch(kernel)
        _same_fields(step, launched.end_step(num_requests=len(batch)))
    assert bounds >= {"cores", "hbm"}
    assert timed.num_launches == launched.num_launches
    assert timed.num_tasks == launched.num_tasks


def _same_fields(a, b) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        elif isinstance(x, Mapping):
            assert list(x.items()) == list(y.items()), field.name
        elif field.name not in ("kernels", "kernel_start_s"):  # a timeline only when launched
            assert x == y, field.name


def _mixed(rng: random.Random, decodes: int, prefills: int, longest: int) -> list[ChunkShape]:
    """decodes decode rows and prefills prefill chunks (some after a cached prefix) among them,
    plus a tree-shaped and a chain verify chunk."""
    batch = _decodes(rng, decodes, longest)
    for _ in range(prefills):
        start, n = rng.choice((0, rng.randrange(0, longest))), rng.randrange(2, 1500)
        batch.insert(rng.randrange(len(batch) + 1),
                     ChunkShape(start, n, tuple(range(-(-(start + n) // BLOCK)))))
    batch += [ChunkShape(900, 4, tuple(range(8)), (-1, 0, 0)),
              ChunkShape(300, 3, tuple(range(3)), (-1, 0))]
    return batch


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)])
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_mixed_launches_sum_what_their_kernel_timings_do(model: str, tp: int,
                                                         chip_name: str) -> None:
    """A meta-attention launch without combine tasks, of a batch mixing prefill, verify and
    decode chunks, is summed without a KernelTiming (npu_sim.launch_sums.mix_launch_sums): the same
    LaunchSums as its timing, with the row memo cold and warm, bound by the cores and by HBM;
    a launch with split KV spans takes its timing."""
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip(chip_name)
    rng = random.Random(len(model) + tp)
    timed, launched = Device(chip, compute=False), Device(chip, compute=False)
    batches = [_mixed(rng, n, prefills, longest) for n in (0, 3, 60, 200)
               for prefills in (1, 3) for longest in (500, 12000)]
    batches.append([ChunkShape(60000, 1, tuple(range(469)))])  # a tile split under GQA
    bounds, summed = set(), 0
    for batch in batches + batches:  # again: the row memo warm
        kernel = lower_attention(batch, arch, chip, BLOCK)
        fast, timing = timed._launch_sums(kernel), launched.time(kernel)
        bounds.add(timing.bound)
        assert isinstance(fast, LaunchSums) == (not kernel.num_partial_slots)
        if isinstance(fast, LaunchSums):
            summed += 1
            for name, x, y in zip(LaunchSums._fields, fast, _launch_sums(timing), strict=True):
                assert np.array_equal(x, y) if name == "step_sums" else x == y, name
    assert summed >= len(batches) and "cores" in bounds
