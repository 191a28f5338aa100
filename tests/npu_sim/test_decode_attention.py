"""Decode-only meta-attention launches are lowered without their sequence and shape tables and
priced from their context lengths (AttentionKernel.decode_context_lens): the same kernel, the
same timing bit for bit as the tables give, for MHA, GQA and a tensor-parallel shard, on 910B
chips, with the row memo cold and warm; batches whose tiles are split or that hold a prefill or
verify chunk take the tables."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from engine.arch_presets import resolve_arch
from engine.lowering import ChunkShape, lower_attention
from engine.lowering_tp import shard_arch
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.tasks import ATTN_SEQ

BLOCK = 128


def _decodes(rng: random.Random, n: int, longest: int = 12000) -> list[ChunkShape]:
    return [ChunkShape(start, 1, tuple(range(-(-(start + 1) // BLOCK))))
            for start in (rng.randrange(0, longest) for _ in range(n))]


def _general(kernel):  # the same kernel, its tables read: timing prices the shapes
    return dataclasses.replace(kernel, decode_context_lens=None)


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
        if kernel.decode_context_lens is None:  # a tile split (GQA, few long sequences)
            assert kernel.num_partial_slots > 0
            continue
        checked += 1
        start = np.array([c.start_pos for c in batch])
        assert np.array_equal(kernel.decode_context_lens, start + 1)
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


def test_launches_other_than_unsplit_decodes_take_the_tables() -> None:
    arch, chip = resolve_arch("llama-3-8b"), get_chip("910b2")
    rng = random.Random(3)
    prefill = [*_decodes(rng, 5), ChunkShape(100, 300, tuple(range(4)))]
    verify = [*_decodes(rng, 5), ChunkShape(100, 3, tuple(range(1)), (-1, 0))]
    split = [ChunkShape(60000, 1, tuple(range(469)))]  # one long GQA decode: its KV split
    for batch in (prefill, verify, split):
        kernel = lower_attention(batch, arch, chip, BLOCK)
        assert kernel.decode_context_lens is None
        assert kernel.seqs is not None and kernel.shapes is not None
    assert lower_attention(split, arch, chip, BLOCK).num_partial_slots > 0
