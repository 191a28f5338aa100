"""The attention row memo (npu_sim.cost_attention.RowMemo) changes no bit of any cost: launches
costed through a warm memo equal the same launches priced row by row afresh, for decode-only,
prefill, chunked and mixed batches, MHA and GQA, on 910B chips."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from engine.arch_presets import resolve_arch
from engine.lowering import ChunkShape, lower_attention
from npu_sim.cost import CostModel
from npu_sim.cost_attention_launch import attention_hbm_fraction
from npu_sim.hardware import get_chip


def _batches(seed: int, block_size: int = 128) -> list[list[ChunkShape]]:
    """Random batches whose decode rows recur across batches (as a simulation's do)."""
    rng = random.Random(seed)
    out = []
    for _ in range(40):
        chunks = []
        for _ in range(rng.choice((1, 3, 30, 120))):
            start = rng.randrange(0, 6000)
            n = 1 if rng.random() < 0.8 else rng.choice((2, 17, 300, 1500))
            chunks.append(ChunkShape(start, n, tuple(range(-(-(start + n) // block_size)))))
        out.append(chunks)
    return out


def _fields(costs: tuple) -> list:
    return [(f.name, getattr(c, f.name)) for c in costs for f in dataclasses.fields(c)]


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b"])
@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_memoised_attention_costs_are_exact(model: str, chip_name: str) -> None:
    arch, chip = resolve_arch(model), get_chip(chip_name)
    memo, fresh = CostModel(chip), CostModel(chip)
    fresh.memo_rows = False
    for batch in _batches(0) + _batches(0):  # the second pass hits the memo everywhere
        kernel = lower_attention(batch, arch, chip, 128)
        for (name, a), (_, b) in zip(_fields(memo.attention(kernel)),
                                     _fields(fresh.attention(kernel)), strict=True):
            if isinstance(a, np.ndarray):
                assert np.array_equal(a, b), name
            else:
                assert a == b, name


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b"])
def test_one_tile_sequences_read_all_their_kv_from_hbm(model: str) -> None:
    """The shortcut CostModel.attention takes for launches of one unsplit tile per sequence:
    the HBM fraction it assumes (1.0) is what attention_hbm_fraction computes for them."""
    arch, chip = resolve_arch(model), get_chip("910b2")
    cm = CostModel(chip)
    checked = 0
    rng = random.Random(2)
    one_tile = [[ChunkShape(start, n, tuple(range(-(-(start + n) // 128))))
                 for start, n in ((rng.randrange(0, 9000), rng.choice((1, 1, 1, 3)))
                                  for _ in range(size))]
                for size in (1, 2, 7, 40, 200)]
    for batch in _batches(1) + one_tile:
        kernel = lower_attention(batch, arch, chip, 128)
        shapes = kernel.shapes
        if kernel.tree_masks or shapes is None or len(shapes) != len(kernel.seqs):
            continue
        keys = np.minimum(shapes["kv_block_end"] * 128, kernel.seqs["start_pos"][shapes["seq"]]
                          + shapes["q_offset"] + shapes["q_rows"]).astype(np.float64)
        kv_bytes = 2 * keys * kernel.head_dim * cm.bytes
        context = (kernel.seqs["start_pos"] + kernel.seqs["q_len"]).astype(np.float64)
        fraction = attention_hbm_fraction(cm, kernel, shapes["seq"],
                                          kv_bytes * kernel.num_kv_heads, context)
        assert (fraction == 1.0).all()
        checked += 1
    assert checked >= 3  # not vacuous (GQA splits the KV of small decode batches)
