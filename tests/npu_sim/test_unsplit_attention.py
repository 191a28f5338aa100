"""Batches of decodes and prefill chunks (no verify chunk) none of whose tiles is split are
lowered without their sequence and shape tables (engine.lowering_unsplit.lower_unsplit) and
priced from their lengths (AttentionKernel.unsplit, npu_sim.cost_attention_launch): the general
lowering's dealt order, shapes and tables, and the same timing and step sums bit for bit as the
tables give, for MHA, GQA and a tensor-parallel shard, on 910B chips, chunks of every size
around the Q tile's and contexts around the KV-split threshold, the row memo cold and warm."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from engine.arch import ModelArch
from engine.arch_presets import resolve_arch
from engine.lowering import ChunkShape, lower_attention
from engine.lowering_tiles import QTiles, q_tiles, seq_table, span_shapes
from engine.lowering_tp import shard_arch
from npu_sim.device import Device
from npu_sim.hardware import ChipSpec, get_chip
from npu_sim.step_sums import LaunchSums
from npu_sim.tasks import AttentionKernel

BLOCK = 128
MODELS = [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)]


def _chunk(start: int, n: int) -> ChunkShape:
    return ChunkShape(start, n, tuple(range(-(-(start + n) // BLOCK))))


def _batch(rng: random.Random, decodes: int, prefills: int, longest: int) -> list[ChunkShape]:
    """decodes decode rows and prefill chunks of sizes around the Q tiles' (some after a
    cached prefix or an earlier chunk) among them, in random order."""
    batch = [_chunk(rng.randrange(0, longest), 1) for _ in range(decodes)]
    for _ in range(prefills):
        n = rng.choice((2, 3, 15, 16, 17, 100, 127, 128, 129, 255, 256, 300, 1500))
        start = rng.choice((0, rng.randrange(0, longest)))
        batch.insert(rng.randrange(len(batch) + 1), _chunk(start, n))
    return batch


def _batches(seed: int) -> list[list[ChunkShape]]:
    rng = random.Random(seed)
    return [_batch(rng, decodes, prefills, longest)
            for decodes in (0, 1, 3, 60, 200) for prefills in (1, 2, 5)
            for longest in (100, 1100, 12000, 60000)]  # around a split's 8 blocks too


def general_tiles_if_unsplit(kernel: AttentionKernel, batch: list[ChunkShape],
                             arch: ModelArch, chip: ChipSpec) -> QTiles | None:
    """The general tiling's Q tiles of `batch` (engine.lowering_tiles.q_tiles), having
    checked that `kernel`, lower_attention's, took the unsplit path exactly when they split no
    tile and then has their dealt order, shapes and largest tile; None when a tile is split."""
    g, num_kv_heads = arch.num_heads // arch.num_kv_heads, arch.num_kv_heads
    start = np.array([c.start_pos for c in batch])
    q_len = np.array([c.num_tokens for c in batch])
    tiles = q_tiles(q_len, start, np.zeros(len(batch), dtype=bool), g, num_kv_heads, chip,
                     BLOCK)
    max_spans = int(tiles.num_spans.max())
    if kernel.unsplit is None:
        assert max_spans > 1
        return None
    assert max_spans == 1
    shapes, task_shape = span_shapes(tiles, num_kv_heads, max_spans)
    assert np.array_equal(kernel.task_shape, task_shape)
    assert kernel.shapes.dtype == shapes.dtype and np.array_equal(kernel.shapes, shapes)
    assert kernel.max_tile_rows == int(tiles.tile_rows.max())
    return tiles


@pytest.mark.parametrize("model,tp", MODELS)
def test_unsplit_lowering_is_the_general_one(model: str, tp: int) -> None:
    """lower_unsplit takes a batch exactly when the general tiling splits none of its tiles,
    and gives the general lowering's dealt order, shapes, sequences and tile rows; its lengths
    are the general tiles'."""
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip("910b2")
    g = arch.num_heads // arch.num_kv_heads
    taken = split = 0
    for batch in _batches(1):
        kernel = lower_attention(batch, arch, chip, BLOCK)
        tiles = general_tiles_if_unsplit(kernel, batch, arch, chip)
        if tiles is None:
            split += 1
            continue
        taken += 1
        start = np.array([c.start_pos for c in batch])
        q_len = np.array([c.num_tokens for c in batch])
        assert np.array_equal(kernel.seqs, seq_table(q_len, start))
        assert kernel.num_seqs == len(batch) and kernel.num_tokens == int(q_len.sum())
        u = kernel.unsplit
        assert np.array_equal(u.context_lens, start + q_len)
        assert np.array_equal(np.arange(len(batch)).repeat(u.num_tiles), tiles.seq)
        assert np.array_equal(u.tile_work, tiles.tile_rows * tiles.n_blocks)
        prefill = np.flatnonzero(q_len[tiles.seq] > 1)
        horizon = start[tiles.seq] + tiles.q_offset + tiles.q_rows
        for name, values in (("position", prefill), ("keys", horizon[prefill]),
                             ("q_rows", tiles.q_rows[prefill]), ("seq", tiles.seq[prefill]),
                             ("tile_rows", tiles.tile_rows[prefill])):
            assert getattr(u.prefill, name) == tuple(values.tolist()), name
        decodes = q_len[tiles.seq] == 1
        assert (tiles.tile_rows[decodes] == u.decode_tile_rows).all()
    assert taken >= 20 and (split or g == 1)


def _same(a, b) -> None:
    for field in dataclasses.fields(a):
        if field.name == "kernel":
            continue
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("model,tp", MODELS)
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_unsplit_launches_time_and_sum_as_their_tables_do(model: str, tp: int,
                                                          chip_name: str) -> None:
    """The timing of a launch priced from its lengths is its tables' (every field), and so are
    the step sums a timing-only step takes of it without a KernelTiming
    (npu_sim.launch_sums), with the row memo cold and warm, over 3- and 4-stage launches."""
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip(chip_name)
    fast, general = Device(chip, compute=False), Device(chip, compute=False)
    summed, launched = Device(chip, compute=False), Device(chip, compute=False)
    stages, checked = set(), 0
    batches = _batches(2)
    for batch in batches + batches:  # again: the row memo warm
        kernel = lower_attention(batch, arch, chip, BLOCK)
        if kernel.unsplit is None:
            continue
        checked += 1
        tables = dataclasses.replace(kernel, unsplit=None)
        timing = general.time(tables)
        _same(fast.time(kernel), timing)
        stages.add(timing.pipeline)
        sums, reference = summed._launch_sums(kernel), launched.time(tables)
        assert isinstance(sums, LaunchSums)
        for name, x, y in zip(LaunchSums._fields, sums,
                              (reference.primitive, reference.primitive_name, reference.seconds,
                               reference.num_tasks, reference.step_sums), strict=True):
            assert np.array_equal(x, y) if name == "step_sums" else x == y, name
    assert checked >= 40
    assert {"attention-3stage", "attention-4stage"} <= stages


def test_a_chunk_of_no_token_takes_the_tables() -> None:
    arch, chip = resolve_arch("llama-2-7b"), get_chip("910b2")
    for batch in ([_chunk(5, 0), _chunk(100, 1)], [_chunk(5, 0), _chunk(100, 300)]):
        assert lower_attention(batch, arch, chip, BLOCK).unsplit is None
