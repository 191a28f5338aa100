"""The attention meta-kernel on random mixed batches lowered by engine.lowering.lower_attention:
the task-by-task reference path (strict), the batched fast path and a dense float64 attention
written here must agree; the task table must tile every (sequence, KV head, query row) once,
split long KV into spans joined by combine tasks, and list tasks heaviest first."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from engine.lowering import MIN_KV_SPAN_TOKENS, ChunkShape, lower_attention
from npu_sim.device import Device
from npu_sim.hardware import ChipSpec, get_chip
from npu_sim.kernels import native, run_attention
from npu_sim.tasks import ATTN_TASK, COMBINE_TASK, AttentionKernel, Primitive
from npu_sim.tiling import ATTN_Q_TILE_ROWS
from tests.npu_sim.attention_reference import dense_attention, make_arch

CHIP = get_chip("910b2")
CHIP_8 = dataclasses.replace(CHIP, num_cube_cores=8, num_vector_cores=16)
CHIP_2 = dataclasses.replace(CHIP, num_cube_cores=2, num_vector_cores=4)


def make_chunks(
    rng: np.random.Generator,
    specs: Sequence[tuple[int, int]],
    block_size: int,
    spare_blocks: int = 7,
) -> tuple[list[ChunkShape], int]:
    """Chunks for (start_pos, num_tokens) specs with distinct random block ids (some tables one
    block longer than needed, as when blocks are allocated ahead); returns (chunks, pool size)."""
    needed = [-(-(p + n) // block_size) + int(rng.integers(0, 2)) for p, n in specs]
    pool = sum(needed) + spare_blocks
    ids = rng.permutation(pool)
    chunks, used = [], 0
    for (start_pos, num_tokens), nb in zip(specs, needed, strict=True):
        chunks.append(
            ChunkShape(start_pos, num_tokens, tuple(int(b) for b in ids[used : used + nb]))
        )
        used += nb
    return chunks, pool


@dataclasses.dataclass(frozen=True)
class Scenario:
    num_heads: int
    num_kv_heads: int
    block_size: int
    chip: ChipSpec
    specs: tuple[tuple[int, int], ...]  # (start_pos, num_tokens) per chunk
    expect_split: bool = False


def _random_specs(seed: int, n: int) -> tuple[tuple[int, int], ...]:
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(n):
        kind = rng.integers(0, 3)
        if kind == 0:  # decode
            specs.append((int(rng.integers(0, 300)), 1))
        elif kind == 1:  # chunked prefill / verify
            specs.append((int(rng.integers(1, 250)), int(rng.integers(2, 80))))
        else:  # first prefill chunk
            specs.append((0, int(rng.integers(1, 150))))
    return tuple(specs)


SCENARIOS = {
    "decodes_g3": Scenario(6, 2, 16, CHIP, ((0, 1), (15, 1), (16, 1), (17, 1), (250, 1))),
    "mixed_g3": Scenario(6, 2, 16, CHIP, ((37, 1), (45, 50), (0, 70), (5, 1), (0, 3), (31, 2))),
    "mixed_g1": Scenario(4, 4, 32, CHIP, ((0, 130), (45, 33), (100, 1), (63, 1), (64, 1))),
    "mixed_g4": Scenario(8, 2, 16, CHIP, ((0, 40), (77, 4), (9, 1), (200, 17), (0, 1))),
    "random_g3": Scenario(6, 2, 16, CHIP, _random_specs(1, 8)),
    "random_g1": Scenario(2, 2, 32, CHIP_2, _random_specs(2, 8)),
    "random_g4": Scenario(4, 1, 16, CHIP_2, _random_specs(3, 8)),
    "long_split_g3": Scenario(6, 2, 16, CHIP_8, ((1551, 1), (3, 1), (0, 9)), True),
    "long_chunk_g3": Scenario(6, 2, 16, CHIP_8, ((1100, 60), (700, 1), (3, 1)), True),
    "long_split_g4": Scenario(4, 1, 32, CHIP_2, ((2000, 1), (0, 10), (5, 1)), True),
    "long_split_g1": Scenario(2, 2, 16, CHIP_8, ((1200, 100), (40, 1), (1500, 1)), True),
    # decodes of very different contexts, interleaved: the fast path gathers them in groups
    "decode_groups_g3": Scenario(6, 2, 16, CHIP_8, ((3, 1), (700, 1), (10, 1), (1500, 1),
                                                    (300, 1), (0, 5), (600, 1)), True),
}


@dataclasses.dataclass
class Batch:
    scenario: Scenario
    chunks: list[ChunkShape]
    kernel: AttentionKernel
    qkv: torch.Tensor  # q is a column slice of it, as the model has it
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def build(name: str, dtype: torch.dtype = torch.float32) -> Batch:
    sc = SCENARIOS[name]
    seed = sum(map(ord, name))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    arch = make_arch(sc.num_heads, sc.num_kv_heads)
    chunks, pool = make_chunks(rng, sc.specs, sc.block_size)
    kernel = lower_attention(chunks, arch, sc.chip, sc.block_size)
    t, d, hq, hkv = sum(n for _, n in sc.specs), arch.head_dim, sc.num_heads, sc.num_kv_heads
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    cache_shape = (pool, sc.block_size, hkv, d)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    return Batch(sc, chunks, kernel, qkv, q, k_cache, v_cache)


@pytest.fixture(scope="module", params=list(SCENARIOS))
def batch(request: pytest.FixtureRequest) -> Batch:
    return build(request.param)


@pytest.fixture(scope="module")
def outputs(batch: Batch) -> dict[str, torch.Tensor]:
    qkv0 = batch.qkv.clone()
    k0, v0 = batch.k_cache.clone(), batch.v_cache.clone()
    result = {
        "strict": run_attention(batch.kernel, True, batch.q, batch.k_cache, batch.v_cache),
        "fast": run_attention(batch.kernel, False, batch.q, batch.k_cache, batch.v_cache),
    }
    with native.disabled():  # the ATen fast path (decodes otherwise go to the C kernel)
        result["fast_aten"] = run_attention(batch.kernel, False, batch.q, batch.k_cache,
                                            batch.v_cache)
    result |= {
        "dense": dense_attention(
            batch.chunks, batch.q, batch.k_cache, batch.v_cache, batch.scenario.block_size
        ),
    }
    assert torch.equal(batch.qkv, qkv0), "attention modified q"
    assert torch.equal(batch.k_cache, k0) and torch.equal(batch.v_cache, v0), "cache modified"
    return result


# ------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("fast", ["fast", "fast_aten"])
def test_strict_matches_fast(batch: Batch, outputs: dict[str, torch.Tensor], fast: str) -> None:
    assert outputs["strict"].shape == outputs[fast].shape == batch.q.shape
    torch.testing.assert_close(outputs["strict"], outputs[fast], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["strict", "fast", "fast_aten"])
def test_matches_dense_reference(path: str, outputs: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(outputs[path].double(), outputs["dense"], atol=1e-5, rtol=1e-5)


def test_low_precision_paths_match_dense() -> None:
    b = build("mixed_g3", torch.bfloat16)
    dense = dense_attention(b.chunks, b.q, b.k_cache, b.v_cache, b.scenario.block_size)
    for strict in (True, False):
        out = run_attention(b.kernel, strict, b.q, b.k_cache, b.v_cache)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), dense, atol=3e-2, rtol=3e-2)


def test_device_runs_attention_and_counts_tasks() -> None:
    b = build("long_split_g3")
    strict_dev, fast_dev = Device(CHIP_8, strict=True), Device(CHIP_8)
    torch.testing.assert_close(
        strict_dev.launch(b.kernel, q=b.q, k_cache=b.k_cache, v_cache=b.v_cache),
        fast_dev.launch(b.kernel, q=b.q, k_cache=b.k_cache, v_cache=b.v_cache),
        atol=1e-5,
        rtol=1e-5,
    )
    n = len(b.kernel.tasks) + len(b.kernel.combine_tasks)
    assert strict_dev.num_tasks == fast_dev.num_tasks == {Primitive.ATTENTION: n}
    assert strict_dev.num_launches == {Primitive.ATTENTION: 1}


# ----------------------------------------------------------------------------- task table


def _tiles(kernel: AttentionKernel) -> dict[tuple[int, int, int, int], list[np.void]]:
    """(seq, kv_head, q_offset, q_rows) -> its span tasks."""
    tiles: dict[tuple[int, int, int, int], list[np.void]] = defaultdict(list)
    for t in kernel.tasks:
        tiles[(int(t["seq"]), int(t["kv_head"]), int(t["q_offset"]), int(t["q_rows"]))].append(t)
    return tiles


def test_seqs_and_block_tables(batch: Batch) -> None:
    k = batch.kernel
    assert k.seqs["q_len"].tolist() == [c.num_tokens for c in batch.chunks]
    assert k.seqs["start_pos"].tolist() == [c.start_pos for c in batch.chunks]
    assert (
        k.seqs["q_start"].tolist()
        == np.cumsum([0] + [c.num_tokens for c in batch.chunks])[:-1].tolist()
    )
    for s, c in enumerate(batch.chunks):
        row = k.block_tables[s]
        assert row[: len(c.block_ids)].tolist() == list(c.block_ids)
        assert (row[len(c.block_ids) :] == -1).all()
    assert k.group_size == batch.scenario.num_heads // batch.scenario.num_kv_heads
    assert k.scale == pytest.approx(1 / math.sqrt(k.head_dim))


def test_every_query_row_in_exactly_one_tile(batch: Batch) -> None:
    k, g = batch.kernel, batch.kernel.group_size
    assert k.tasks.dtype == ATTN_TASK and k.combine_tasks.dtype == COMBINE_TASK
    tiles = _tiles(k)
    for s, c in enumerate(batch.chunks):
        for h in range(k.num_kv_heads):
            covered = np.zeros(c.num_tokens, dtype=np.int64)
            for (ts, th, q_offset, q_rows), spans in tiles.items():
                if (ts, th) == (s, h):
                    covered[q_offset : q_offset + q_rows] += 1
                    tile_rows = {int(t["tile_rows"]) for t in spans}
                    assert len(tile_rows) == 1, "spans of one tile disagree on its shape"
                    (rows,) = tile_rows
                    assert rows in ATTN_Q_TILE_ROWS and 1 <= q_rows * g <= rows
            assert (covered == 1).all(), f"seq {s} kv_head {h}: rows {covered.tolist()}"
        # a sequence whose stacked rows fit one tile gets one, the smallest that fits
        if c.num_tokens * g <= ATTN_Q_TILE_ROWS[-1]:
            seq_tiles = [key for key in tiles if key[0] == s]
            assert len(seq_tiles) == k.num_kv_heads
            want = min(r for r in ATTN_Q_TILE_ROWS if r >= c.num_tokens * g)
            assert {int(t["tile_rows"]) for key in seq_tiles for t in tiles[key]} == {want}
    assert k.max_tile_rows == int(k.tasks["tile_rows"].max())


def test_spans_partition_blocks_up_to_causal_horizon(batch: Batch) -> None:
    k = batch.kernel
    bs = batch.scenario.block_size
    combines = {
        (int(c["seq"]), int(c["kv_head"]), int(c["q_offset"]), int(c["q_rows"])): c
        for c in k.combine_tasks
    }
    assert len(combines) == len(k.combine_tasks), "two combine tasks for one tile"
    split_tiles = 0
    for key, spans in _tiles(k).items():
        s, _, q_offset, q_rows = key
        c = batch.chunks[s]
        horizon_blocks = -(-(c.start_pos + q_offset + q_rows) // bs)
        assert horizon_blocks <= len(c.block_ids)
        bounds = sorted((int(t["kv_block_start"]), int(t["kv_block_end"])) for t in spans)
        assert bounds[0][0] == 0 and bounds[-1][1] == horizon_blocks
        assert all(a_end == b_start for (_, a_end), (b_start, _) in itertools.pairwise(bounds))
        assert all(start < end for start, end in bounds)
        slots = sorted(int(t["partial_slot"]) for t in spans)
        if len(spans) == 1:
            assert slots == [-1] and key not in combines
        else:
            split_tiles += 1
            comb = combines[key]
            first, num = int(comb["slot_start"]), int(comb["num_slots"])
            assert slots == list(range(first, first + num))
    assert split_tiles == len(k.combine_tasks)
    used = sorted(int(s) for s in k.tasks["partial_slot"] if s >= 0)
    assert used == list(range(k.num_partial_slots)), "partial slots used once each, none idle"


def test_split_only_when_long(batch: Batch) -> None:
    k = batch.kernel
    if batch.scenario.expect_split:
        assert len(k.combine_tasks) > 0 and (k.tasks["partial_slot"] >= 0).any()
        assert k.num_partial_slots > 0
    else:
        assert len(k.combine_tasks) == 0 and (k.tasks["partial_slot"] == -1).all()
        assert k.num_partial_slots == 0


def test_split_spans_are_at_least_min_span(batch: Batch) -> None:
    """lower_attention: long KV is split 'into KV spans of at least MIN_KV_SPAN_TOKENS'."""
    k = batch.kernel
    min_blocks = max(1, MIN_KV_SPAN_TOKENS // batch.scenario.block_size)
    split = k.tasks[k.tasks["partial_slot"] >= 0]
    lengths = split["kv_block_end"] - split["kv_block_start"]
    assert (lengths >= min_blocks).all(), (
        f"spans of {sorted(set(lengths.tolist()))} blocks, minimum {min_blocks}"
    )


def test_tasks_sorted_heaviest_first(batch: Batch) -> None:
    t = batch.kernel.tasks
    cost = t["tile_rows"] * (t["kv_block_end"] - t["kv_block_start"])
    assert (np.diff(cost) <= 0).all()


def test_split_balances_long_sequence_over_cores() -> None:
    """A decode dominating the batch is cut into several spans per KV head, covering its whole
    context between them."""
    b = build("long_split_g3")
    k, g, bs = b.kernel, b.kernel.group_size, b.scenario.block_size
    decode = k.tasks[k.tasks["seq"] == 0]
    assert len(decode) > k.num_kv_heads, "the 1552-token decode was not split"
    total_blocks = -(-1552 // bs)
    for h in range(k.num_kv_heads):
        spans = decode[decode["kv_head"] == h]
        assert int((spans["kv_block_end"] - spans["kv_block_start"]).sum()) == total_blocks
        assert len(spans) >= 2
    assert all(int(t["q_rows"]) * g <= int(t["tile_rows"]) for t in k.tasks)


def test_empty_batch_lowers_to_no_tasks() -> None:
    k = lower_attention([], make_arch(6, 2), CHIP, 16)
    assert len(k.tasks) == 0 and len(k.combine_tasks) == 0 and k.num_partial_slots == 0
    q = torch.zeros(0, 6, 16)
    cache = torch.zeros(2, 16, 2, 16)
    for strict in (True, False):
        assert run_attention(k, strict, q, cache, cache).shape == (0, 6, 16)
