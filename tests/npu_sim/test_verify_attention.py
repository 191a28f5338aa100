"""The verify stage inside the attention meta-kernel: token trees of draft nodes verified in one
pass (tree masks applied row by row), on the reference and fast paths, through the meta lowering
and the split baseline's full-mask prefill kernel, and their costs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from benchmarks.kernels.attention import VERIFY_SHAPES, binary_tree, verify_chunks
from benchmarks.kernels.harness import fake_chunks
from engine.arch_presets import get_arch
from engine.lowering import ChunkShape, lower_attention, lower_attention_split, tree_mask
from npu_sim.device import Device
from npu_sim.hardware import ChipSpec, get_chip
from npu_sim.kernels import run_attention
from npu_sim.tasks import AttentionKernel
from npu_sim.tiling import ATTN_VERIFY_TILE_ROWS
from tests.npu_sim.attention_reference import ancestors, dense_attention, make_arch

CHIP = get_chip("910b2")
CHIP_2 = dataclasses.replace(CHIP, num_cube_cores=2, num_vector_cores=4)
D = 16  # head_dim of the small test models (attention_reference.make_arch's default)


def random_tree(seed: int, n: int) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    return tuple(int(rng.integers(-1, j)) for j in range(n))


def branch(parents: Sequence[int], a: int) -> list[int]:
    """Nodes from the root's first child down to node a."""
    path = []
    while a >= 0:
        path.append(a)
        a = parents[a]
    return path[::-1]


def place(specs: Sequence[tuple[int, int, tuple[int, ...]]], block_size: int,
          first_block: int = 0) -> list[ChunkShape]:
    """Chunks for (start_pos, num_tokens, draft_parents) with consecutive block tables from
    first_block."""
    chunks, nxt = [], first_block
    for start_pos, num_tokens, parents in specs:
        nb = -(-(start_pos + num_tokens) // block_size)
        chunks.append(ChunkShape(start_pos, num_tokens, tuple(range(nxt, nxt + nb)), parents))
        nxt += nb
    return chunks


def run_both(kernel: AttentionKernel, q: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"strict": run_attention(kernel, True, q, k_cache, v_cache),
            "fast": run_attention(kernel, False, q, k_cache, v_cache)}


# ------------------------------------------------------------------ (a) tree == its branches

TREES = {  # name: (num_heads, num_kv_heads, block_size, chip, start_pos, parents)
    "g3_multiblock": (6, 2, 16, CHIP, 45, (-1, 0, 0, 1, 1, 2, -1, 6, 7, 3)),
    "g4_two_q_tiles": (8, 2, 16, CHIP, 100, random_tree(1, 40)),  # 41 x 4 rows > 128
    "g2_kv_split": (2, 1, 16, CHIP_2, 1500, random_tree(2, 20)),  # spans + combine
    "g1_chain_in_tree": (4, 4, 32, CHIP, 70, (-1, 0, 1, 2, 3)),
}


@pytest.mark.parametrize("name", list(TREES))
def test_tree_rows_equal_their_branches_verified_as_chains(name: str) -> None:
    hq, hkv, bs, chip, start_pos, parents = TREES[name]
    arch, n = make_arch(hq, hkv), len(parents)
    gen = torch.Generator().manual_seed(len(name))
    tree_chunk = place([(start_pos, 1 + n, parents)], bs)[0]
    # every node's branch as its own plain causal chunk, blocks after the tree's
    paths = [branch(parents, a) for a in range(n)]
    chains = place([(start_pos, 1 + len(p), ()) for p in paths], bs,
                   first_block=len(tree_chunk.block_ids))
    pool = chains[-1].block_ids[-1] + 1
    k_cache = torch.randn(pool, bs, hkv, D, generator=gen)
    v_cache = torch.randn(pool, bs, hkv, D, generator=gen)
    q_tree = torch.randn(1 + n, hq, D, generator=gen)

    def slot(c: ChunkShape, p: int) -> tuple[int, int]:
        return c.block_ids[p // bs], p % bs

    q_chains = []
    for path, c in zip(paths, chains, strict=True):
        for p in range(start_pos + 1):  # context and root: the same keys
            for cache in (k_cache, v_cache):
                cache[slot(c, p)] = cache[slot(tree_chunk, p)]
        for i, node in enumerate(path):  # node i of the chain = the tree's node `node`
            for cache in (k_cache, v_cache):
                cache[slot(c, start_pos + 1 + i)] = cache[slot(tree_chunk, start_pos + 1 + node)]
        q_chains.append(q_tree[[0, *(1 + np.array(path))]])

    tree_kernel = lower_attention([tree_chunk], arch, chip, bs)
    chain_kernel = lower_attention(chains, arch, chip, bs)
    assert [s for s, _ in tree_kernel.tree_masks] == ([] if tree_chunk.is_chain else [0])
    if name == "g2_kv_split":
        assert len(tree_kernel.combine_tasks) > 0, "the long tree was not split into KV spans"
    if name == "g4_two_q_tiles":
        assert len(set(tree_kernel.tasks["q_offset"].tolist())) > 1
    q_chain = torch.cat(q_chains)
    tree_out = run_both(tree_kernel, q_tree, k_cache, v_cache)
    chain_out = run_both(chain_kernel, q_chain, k_cache, v_cache)
    lens = np.array([len(p) + 1 for p in paths])
    starts = np.cumsum(lens) - lens  # each chain's root row
    for path_name in ("strict", "fast"):
        tree, chain = tree_out[path_name], chain_out[path_name]
        torch.testing.assert_close(tree[1:], chain[starts + lens - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tree[0].expand(n, hq, D), chain[starts], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree_out["strict"], tree_out["fast"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ (b) a chain's mask is causal

@pytest.mark.parametrize("with_root", [True, False])
def test_chain_with_explicit_mask_equals_plain_causal(with_root: bool) -> None:
    arch, bs, n = make_arch(6, 2), 16, 7
    parents = tuple(range(-1, n - 1))
    num_tokens = n + int(with_root)
    (verify,) = place([(37, num_tokens, parents)], bs)
    plain = dataclasses.replace(verify, draft_parents=())
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(len(verify.block_ids), bs, 2, D, generator=gen)
                        for _ in range(2))
    q = torch.randn(num_tokens, 6, D, generator=gen)
    kernel = lower_attention([verify], arch, CHIP, bs)
    assert kernel.tree_masks == (), "a chain needs no mask"
    masked = dataclasses.replace(kernel, tree_masks=((0, tree_mask(parents)),))
    causal = run_both(lower_attention([plain], arch, CHIP, bs), q, k_cache, v_cache)
    for path, out in run_both(masked, q, k_cache, v_cache).items():
        torch.testing.assert_close(out, causal[path], atol=1e-6, rtol=1e-6)
        unmasked = run_attention(kernel, path == "strict", q, k_cache, v_cache)
        if path == "strict":  # the same tasks, the mask all-visible: the same numbers
            assert torch.equal(out, unmasked)
        else:  # a chain is a chunk the C kernel takes, a tree SDPA's: the sums' order differs
            torch.testing.assert_close(out, unmasked, atol=1e-6, rtol=1e-6)


# ------------------------------------------------ (c) trees mixed with decodes and prefills

MIXED = [  # (start_pos, num_tokens, draft_parents)
    (37, 1, ()),  # decode
    (45, 11, (-1, 0, 0, 1, 1, 2, -1, 6, 7, 3)),  # root + 10-node tree
    (0, 70, ()),  # prefill
    (5, 1, ()),  # decode
    (120, 6, (-1, 0, 1, 2, 3)),  # root + chain
    (9, 9, (-1, -1, -1, 0, 1, 2, 3, 4)),  # root + a wide tree
    (200, 17, ()),  # chunked prefill
    (64, 4, (-1, 0, 0, 1)),  # first draft nodes right at a block boundary
    (16, 2, (-1, -1)),  # drafts without the root in the chunk (it is in the cache)
    (30, 1, (-1,)),  # a single draft node, no root: a one-node chain
]


@pytest.mark.parametrize("hq,hkv,chip", [(6, 2, CHIP), (4, 4, CHIP_2), (8, 1, CHIP_2)],
                         ids=["g3", "g1", "g8"])
def test_trees_in_a_mixed_batch_match_dense_on_both_paths(hq: int, hkv: int,
                                                         chip: ChipSpec) -> None:
    arch, bs = make_arch(hq, hkv), 16
    chunks = place(MIXED, bs)
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    pool = chunks[-1].block_ids[-1] + 1
    k_cache, v_cache = (torch.randn(pool, bs, hkv, D, generator=gen) for _ in range(2))
    q = torch.randn(sum(c.num_tokens for c in chunks), hq, D, generator=gen)
    dense = dense_attention(chunks, q, k_cache, v_cache, bs)
    kernel = lower_attention(chunks, arch, chip, bs)
    assert [s for s, _ in kernel.tree_masks] == [1, 5, 7, 8]
    outs = run_both(kernel, q, k_cache, v_cache)
    torch.testing.assert_close(outs["strict"], outs["fast"], atol=1e-5, rtol=1e-5)
    for out in outs.values():
        torch.testing.assert_close(out.double(), dense, atol=1e-5, rtol=1e-5)
    # the split baseline: its two kernels' rows add up to the same attention
    split = lower_attention_split(chunks, arch, chip, bs)
    for strict in (True, False):
        total = sum(run_attention(k, strict, q, k_cache, v_cache) for k in split)
        torch.testing.assert_close(total.double(), dense, atol=1e-5, rtol=1e-5)


def test_bf16_tree_matches_dense() -> None:
    arch, bs = make_arch(6, 2), 16
    chunks = place(MIXED[:3], bs)
    gen = torch.Generator().manual_seed(5)
    pool = chunks[-1].block_ids[-1] + 1
    k_cache, v_cache = (torch.randn(pool, bs, 2, D, generator=gen).bfloat16() for _ in range(2))
    q = torch.randn(sum(c.num_tokens for c in chunks), 6, D, generator=gen).bfloat16()
    dense = dense_attention(chunks, q, k_cache, v_cache, bs)
    for out in run_both(lower_attention(chunks, arch, CHIP, bs), q, k_cache, v_cache).values():
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), dense, atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- (d) lowering

def test_verify_chunks_get_verify_tiles_and_their_tree_masks() -> None:
    arch = make_arch(4, 4)  # g = 1: a 16-token chunk is 16 stacked rows
    chunks = place([(50, 16, binary_tree(15)), (50, 16, ()), (9, 1, ()),
                    (30, 16, tuple(range(-1, 14))), (0, 200, random_tree(3, 150))], 16)
    k = lower_attention(chunks, arch, CHIP, 16)
    tile_rows = {s: set(k.tasks["tile_rows"][k.tasks["seq"] == s].tolist()) for s in range(5)}
    assert tile_rows[0] == {ATTN_VERIFY_TILE_ROWS}  # verify: the 64-row tile
    assert tile_rows[1] == {16} and tile_rows[2] == {16}  # prefill / decode: smallest that fits
    assert tile_rows[3] == {ATTN_VERIFY_TILE_ROWS}  # a chain verifies in the verify tile too
    assert tile_rows[4] == {128}  # a long verify chunk: full 128-row tiles
    assert min(t for rows in (tile_rows[0], tile_rows[3]) for t in rows) >= ATTN_VERIFY_TILE_ROWS
    masks = dict(k.tree_masks)
    assert sorted(masks) == [0, 4], "masks only for trees, not for chains or plain chunks"
    for s in masks:
        assert masks[s].dtype == bool
        assert np.array_equal(masks[s], ancestors(chunks[s].draft_parents))
    # GQA: the verify tile is at least 64 rows whatever the group
    k8 = lower_attention(place([(50, 10, binary_tree(9))], 16), make_arch(8, 1), CHIP, 16)
    assert set(k8.tasks["tile_rows"].tolist()) == {128}  # 80 stacked rows


def test_tree_mask_is_ancestor_or_self() -> None:
    parents = (-1, 0, 0, 1, -1, 4, 3)
    mask = tree_mask(parents)
    assert np.array_equal(mask, ancestors(parents))
    assert mask.diagonal().all() and not np.triu(mask, 1).any()
    assert np.array_equal(tree_mask(tuple(range(-1, 5))), np.tril(np.ones((6, 6), dtype=bool)))
    assert mask[6].nonzero()[0].tolist() == [0, 1, 3, 6]


def test_split_baseline_runs_verify_as_full_mask_prefill() -> None:
    arch = make_arch(6, 2)
    chunks = place([(40, 1, ()), (45, 8, tuple(range(-1, 6))), (0, 30, ()),
                    (70, 5, (-1, 0, 0, 1)), (20, 1, (-1,))], 16)
    prefill, decode = lower_attention_split(chunks, arch, CHIP, 16)
    assert prefill.seqs["q_start"].tolist() == [1, 9, 39, 44]  # verify chunks are prefills
    assert prefill.full_mask and [s for s, _ in prefill.tree_masks] == [0, 2, 3]  # chains too
    assert prefill.seqs["q_len"].tolist() == [8, 30, 5, 1]
    assert np.array_equal(dict(prefill.tree_masks)[2], ancestors((-1, 0, 0, 1)))
    assert not decode.full_mask and decode.tree_masks == ()
    assert decode.seqs["q_start"].tolist() == [0]
    (only_prefill,) = lower_attention_split(place([(0, 30, ())], 16), arch, CHIP, 16)
    assert not only_prefill.full_mask and only_prefill.tree_masks == ()


@pytest.mark.parametrize("parents,num_tokens", [((-1, 1), 3), ((-1, 0, 0), 2), ((0,), 2)])
def test_chunk_shape_rejects_bad_drafts(parents: tuple[int, ...], num_tokens: int) -> None:
    with pytest.raises(ValueError):
        ChunkShape(10, num_tokens, (0,), parents)


# -------------------------------------------------------------------------------- (e) cost

LLAMA = get_arch("llama-2-7b")


def _seconds(kernels: Sequence[AttentionKernel]) -> float:
    device = Device(CHIP, compute=False)
    return sum(device.time(k).seconds for k in kernels)


@pytest.mark.parametrize("batch,spec_len", VERIFY_SHAPES)
def test_meta_verify_cheaper_than_full_mask_split_on_skewed_batches(batch: int,
                                                                    spec_len: int) -> None:
    """The paper's shapes with mixed context lengths: one meta launch is no slower than the
    full-mask PFA-style kernel (within 2%: PFA balances its blocks over the cores too, and both
    stream the same KV, which bounds these shapes)."""
    contexts = [3000, 200, 900, 150, 2500, 600, 1800, 300][:batch]
    chunks = verify_chunks([(c, 1 + spec_len) for c in contexts])
    meta = _seconds([lower_attention(chunks, LLAMA, CHIP, 128)])
    split = _seconds(lower_attention_split(chunks, LLAMA, CHIP, 128))
    assert meta < 1.02 * split


@pytest.mark.parametrize("batch,spec_len", VERIFY_SHAPES)
def test_verify_with_decodes_is_one_cheaper_launch(batch: int, spec_len: int) -> None:
    specs = [(1024, 1 + spec_len)] * batch + [(c, 1) for c in (300, 700, 1500, 2500)]
    chunks = verify_chunks(specs[:batch]) + fake_chunks(specs[batch:], 128)
    meta = lower_attention(chunks, LLAMA, CHIP, 128)
    split = lower_attention_split(chunks, LLAMA, CHIP, 128)
    assert len(split) == 2 and _seconds([meta]) < _seconds(split)


def test_tree_mask_costs_little_and_full_mask_costs_the_split() -> None:
    device = Device(CHIP, compute=False)
    tree = verify_chunks([(1024, 32)] * 4)
    chain = [dataclasses.replace(c, draft_parents=tuple(range(-1, 30))) for c in tree]
    meta_tree = device.time(lower_attention(tree, LLAMA, CHIP, 128))
    meta_chain = device.time(lower_attention(chain, LLAMA, CHIP, 128))
    assert meta_chain.seconds < meta_tree.seconds < 1.01 * meta_chain.seconds
    assert meta_tree.hbm_read_bytes - meta_chain.hbm_read_bytes == 4 * 32 * 31 * 31
    assert meta_tree.vector_active_cycles > meta_chain.vector_active_cycles
    (split,) = lower_attention_split(tree, LLAMA, CHIP, 128)
    no_mask = device.time(dataclasses.replace(split, full_mask=False, tree_masks=()))
    full = device.time(split)
    assert full.seconds > no_mask.seconds
    assert full.hbm_read_bytes - no_mask.hbm_read_bytes == 4 * 32 * (1024 + 32)  # once per seq


def test_tree_flops_count_only_the_visible_scores() -> None:
    parents = (-1, 0, 0, 1, 1, 2, -1, 6, 7, 3)
    arch, start_pos, n = make_arch(6, 2), 45, len(parents)
    (chunk,) = place([(start_pos, 1 + n, parents)], 16)
    timing = Device(CHIP, compute=False).time(lower_attention([chunk], arch, CHIP, 16))
    visible = start_pos + 1 + int(ancestors(parents).sum()) + start_pos * n + n  # root, nodes
    assert timing.flops == 4.0 * arch.head_dim * arch.num_heads * visible
