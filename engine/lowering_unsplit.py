"""Attention lowering of a batch none of whose Q tiles is split into KV spans and none a
verify chunk (nearly every step of a simulation), from its lengths: lower_attention's kernel
(`lower_unsplit`, which lower_attention tries first), or for decodes only what timing reads of
it without the kernel (`lower_decodes`: the timing-only runner's decode steps).

The tiles' KV blocks, the split test and the dealt order are computed from the context lengths
in a few numpy calls, the prefill chunks' tiles one by one in Python (a few a step): the values
the general tiling (engine.lowering_tiles) gives, tested; the tables only when read.

Pure functions of (chunks, model shape, chip, block size). The timing-only runner's steps with
prefill chunks take these rules in C instead, pricing and summing the launch in the same call
(npu_sim/launch_sums.c: xy_unsplit_launch_sums, from the lengths alone): a change to the tiles,
the split test or the dealt order here is to be made there too, and
tests/npu_sim/test_launch_sums.py fails until it is.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from engine.arch import ModelArch
from engine.lowering_tiles import (
    ChunkLike,
    core_share,
    kernel_fields,
    kv_span_blocks,
    once,
    q_tiles,
    seq_table,
    tile_shapes,
)
from npu_sim.cost_attention import DecodeBatch
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import AttentionKernel, PrefillTiles, UnsplitTiles
from npu_sim.tiling import attention_q_tile


def lower_unsplit(chunks: tuple[ChunkLike, ...], start_pos: np.ndarray, num_tokens: list[int],
                   arch: ModelArch, chip: ChipSpec, block_size: int) -> AttentionKernel | None:
    """lower_attention's kernel of a batch without verify chunks, said by its lengths
    (`AttentionKernel.unsplit`), or None when a tile is to be split into KV spans (the general
    lowering does that). Most steps of a simulation are such batches: decodes, a tile each,
    and now and then a few prefill chunks. So what timing reads is computed from the context
    lengths in a few numpy calls, and the prefill chunks' tiles one by one (`_prefill_tiles`):
    the tiles' KV blocks, the split test and the dealt order, the values `q_tiles` and
    `tile_order` give (tested); the tiles of the whole batch, hence the sequence, shape and
    task tables, only when read."""
    g, num_kv_heads = arch.num_heads // arch.num_kv_heads, arch.num_kv_heads
    q_len = once(lambda: np.array(num_tokens, dtype=np.int64))
    tiles = once(lambda: q_tiles(q_len(), start_pos, None, g, num_kv_heads, chip,
                                 block_size))
    fields = {"seqs": lambda: seq_table(q_len(), start_pos), "num_partial_slots": 0,
              "shapes": lambda: tile_shapes(tiles()),
              **kernel_fields(chunks, arch, block_size, tiles)}
    # Timing reads the lengths and the dealt order only: the sequence and shape tables are
    # built if something reads them.
    if num_tokens.count(1) == len(num_tokens):  # decodes only: a tile each
        decodes = lower_decodes(start_pos, arch, chip, block_size)
        if decodes is None:
            return None
        return AttentionKernel(
            **fields, max_tile_rows=decodes.tile_rows,
            task_shape=decodes.order.repeat(num_kv_heads),
            unsplit=UnsplitTiles(decodes.context_lens, len(chunks), decodes.tile_rows))
    if 0 in num_tokens:  # a chunk of no token: the general lowering's
        return None
    decode_rows = _decode_tile_rows(g)
    multi = [s for s, n in enumerate(num_tokens) if n > 1]  # the prefill chunks
    context = start_pos + q_len()  # each sequence's causal horizon
    prefill = _prefill_tiles(multi, start_pos, num_tokens, g, block_size)
    n_blocks = _unsplit_blocks(context, prefill, g, num_kv_heads, chip, block_size)
    if n_blocks is None:
        return None
    num_tiles = np.ones(len(chunks), np.int64)
    num_tiles[multi] = prefill.num_tiles
    tile_work = (n_blocks * decode_rows).repeat(num_tiles)  # tile rows x KV blocks
    tile_work[list(prefill.tiles.position)] = [
        r * b for r, b in zip(prefill.tiles.tile_rows, prefill.n_blocks, strict=True)]
    by_weight = (-tile_work).argsort(kind="stable")  # tile_order's
    max_tile_rows = max(prefill.tiles.tile_rows)
    if len(multi) < len(chunks):
        max_tile_rows = max(max_tile_rows, decode_rows)
    return AttentionKernel(
        **fields, max_tile_rows=max_tile_rows, task_shape=by_weight.repeat(num_kv_heads),
        unsplit=UnsplitTiles(context, sum(num_tokens), decode_rows, num_tiles, tile_work,
                             prefill.tiles))


def lower_decodes(start_pos: np.ndarray, arch: ModelArch, chip: ChipSpec,
                  block_size: int) -> DecodeBatch | None:
    """What timing reads of lower_attention's kernel of a batch of decodes (a token each, no
    drafts) from `start_pos` (int64, a sequence each, one at least): its lengths and dealt order
    (`AttentionKernel.unsplit`, `task_shape`) and the model shape, without the kernel; None when
    a tile is to be split (the general lowering's). `lower_unsplit` builds its kernels of
    decodes from it; the timing-only runner times its decode steps from it alone
    (npu_sim.device.Device.time_decodes)."""
    g, num_kv_heads = arch.num_heads // arch.num_kv_heads, arch.num_kv_heads
    context = start_pos + 1  # each sequence's causal horizon
    n_blocks = _unsplit_blocks(context, None, g, num_kv_heads, chip, block_size)
    if n_blocks is None:
        return None
    # tile_order's: every tile has the same rows, so heavier means more KV blocks (ties keep
    # their tile order: a stable sort); array methods, not numpy's Python-level wrappers
    by_weight = (-n_blocks).argsort(kind="stable")
    return DecodeBatch(context, by_weight, _decode_tile_rows(g), g, arch.head_dim,
                       num_kv_heads)


@functools.lru_cache(maxsize=64)
def _decode_tile_rows(group_size: int) -> int:
    """attention_q_tiles' tile rows for one token (the smallest tile holding group_size rows)."""
    return attention_q_tile(1, group_size)[0]


def _unsplit_blocks(context: np.ndarray, prefill: _Prefill | None, g: int, num_kv_heads: int,
                    chip: ChipSpec, block_size: int) -> np.ndarray | None:
    """Each sequence's KV blocks, as a decode tile over its causal horizon `context` has them,
    or None when `kv_spans` splits a tile of the batch (prefill: the tiles of its prefill chunks,
    if any; the other sequences are decodes)."""
    n_blocks = (context + (block_size - 1)) // block_size
    # kv_spans' work: query tokens x (g x block_size) x blocks, whole numbers (exact in any order)
    block_work = g * block_size
    work = int(np.add.reduce(n_blocks))
    if prefill is not None:
        work += sum(prefill.work) - prefill.context_blocks
    share = core_share(work * block_work, num_kv_heads, chip)
    # A tile within the share is never split (the common case), and no tile is over a share
    # the whole work is within (as where the KV heads outnumber the cores: MHA): no tile's work
    # exceeds the whole's (a prefill sequence's context blocks, its last tile's at most).
    if not share or work * block_work <= share:
        return n_blocks
    heaviest = int(np.maximum.reduce(n_blocks))
    if prefill is not None:
        heaviest = max(heaviest, *prefill.work)
    if heaviest * block_work > share and _any_split(n_blocks, prefill, block_work, share,
                                                    block_size):
        return None
    return n_blocks


def _any_split(n_blocks: np.ndarray, prefill: _Prefill | None, block_work: int,
               share: float, block_size: int) -> bool:
    """Whether `kv_spans` splits a tile of a batch of sequences whose KV blocks are n_blocks and
    whose prefill chunks' tiles are `prefill`: a tile over the per-core share whose KV makes two
    spans at least (a batch of one is always over: a single stream's short contexts are not
    split). The test over every sequence's blocks as if it were a decode is the decodes' test,
    and no more: a prefill chunk's last tile has the blocks of its whole context and one query
    token at least."""
    span_blocks = kv_span_blocks(block_size)
    if bool(((n_blocks * block_work > share) & (n_blocks // span_blocks >= 2)).any()):
        return True
    return prefill is not None and any(
        w * block_work > share and b // span_blocks >= 2
        for w, b in zip(prefill.work, prefill.n_blocks, strict=True))


class _Prefill(NamedTuple):
    """Prefill chunks' Q tiles (`_prefill_tiles`), in tile order."""

    tiles: PrefillTiles
    n_blocks: list[int]  # per tile, KV blocks its causal horizon reaches
    work: list[int]  # per tile, its query tokens x KV blocks
    num_tiles: list[int]  # per chunk, its tiles
    context_blocks: int  # the chunks' whole contexts' KV blocks, summed (their last tiles')


def _prefill_tiles(multi: list[int], start_pos: np.ndarray, num_tokens: list[int], g: int,
                   block_size: int) -> _Prefill:
    """The Q tiles of the batch's sequences `multi` (in batch order, none a verify chunk), as
    `q_tiles` cuts them (npu_sim.tiling.attention_q_tile: full tiles of `tokens` query
    tokens, then the rest), with their positions among all the batch's tiles, every other
    sequence one tile. A few chunks a step: Python ints."""
    position, keys, q_rows, tile_rows, seqs, num_tiles = [], [], [], [], [], []
    extra = context_blocks = 0  # (extra: tiles so far beyond one per sequence)
    for s in multi:
        start, n = start_pos.item(s), num_tokens[s]
        rows, tokens = attention_q_tile(n, g)
        count = -(-n // tokens)
        q_rows += [tokens] * (count - 1)
        q_rows.append(n - (count - 1) * tokens)
        keys += range(start + tokens, start + n, tokens)  # each tile's last row's horizon
        keys.append(start + n)
        position += range(s + extra, s + extra + count)
        tile_rows += [rows] * count
        seqs += [s] * count
        num_tiles.append(count)
        extra += count - 1
        context_blocks += -(-(start + n) // block_size)
    n_blocks = [-(-k // block_size) for k in keys]
    return _Prefill(PrefillTiles(tuple(position), tuple(keys), tuple(q_rows), tuple(tile_rows),
                                 tuple(seqs)),
                    n_blocks, [q * b for q, b in zip(q_rows, n_blocks, strict=True)], num_tiles,
                    context_blocks)
