"""Attention lowering: a batch's chunks -> meta-attention task tables (the split baseline's:
engine.lowering_split).

A chunk is a run of one request's query tokens at consecutive positions: a prefill (chunk), a
decode (one token) or a verify chunk of speculative decoding, its root (last real token)
followed by N draft nodes of a token tree at consecutive *virtual* positions (their KV slots), so
tree siblings never share a slot. Every row is causal over the virtual positions; the draft rows
further see only their own root-to-node branch among the draft keys, which the lowering hands
the kernel as an (N, N) ancestor-or-self mask built here on the host (XYS 5.1.2). A chain's mask
is the causal one, so chains get none in the meta-kernel.

Pure functions of (chunks, model shape, chip, block size); engine.lowering re-exports them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np

from engine import token_tree
from engine.arch import ModelArch
from npu_sim.cost_attention import DecodeBatch
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import (
    ATTN_SEQ,
    ATTN_TASK,
    COMBINE_TASK,
    AttentionKernel,
    PrefillTiles,
    UnsplitTiles,
)
from npu_sim.tiling import attention_q_tile, attention_q_tiles

T = TypeVar("T")

# A KV span shorter than this is not worth a partial + combine round trip (catlass stacks four
# 128-token pages per softmax block; one span is at least that much).
MIN_KV_SPAN_TOKENS = 512


@dataclass(frozen=True)
class ChunkShape:
    """What lowering needs of one scheduled chunk."""

    start_pos: int  # position of its first token
    num_tokens: int  # tokens computed this step
    block_ids: tuple[int, ...]  # its KV block table
    draft_parents: tuple[int, ...] = ()  # verify chunk: its last len(draft_parents) tokens are
    #   draft nodes of a token tree, node j's parent node index (-1 = the token before the first
    #   node, the root); parents precede children. () = no drafts (prefill or decode)

    def __post_init__(self) -> None:
        if len(self.draft_parents) > self.num_tokens:
            raise ValueError(f"{len(self.draft_parents)} draft nodes in a chunk of "
                             f"{self.num_tokens} tokens")
        token_tree.check_parents(self.draft_parents)

    @property
    def is_verify(self) -> bool:
        return bool(self.draft_parents)

    @property
    def is_chain(self) -> bool:
        """Drafts (if any) form a chain: the mask is the causal one."""
        return token_tree.is_chain(self.draft_parents)


def tree_mask(parents: Sequence[int]) -> np.ndarray:
    """bool (N, N) ancestor-or-self mask of a token tree: [a, b] = node b is node a or one of
    its ancestors. Parents precede children, so row a is row parents[a] plus the diagonal."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for a, parent in enumerate(parents):
        if parent >= 0:
            mask[a] |= mask[parent]
    return mask


class ChunkLike(Protocol):
    """What lowering reads of a chunk: a ChunkShape, or the scheduler's ScheduledChunk itself
    (the timing-only runner lowers those directly)."""

    @property
    def start_pos(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def block_ids(self) -> tuple[int, ...]: ...
    @property
    def draft_parents(self) -> tuple[int, ...]: ...


class _Tiles(NamedTuple):
    """The meta-kernel's Q tiles, int64 arrays of (num_tiles,), sequence by sequence."""

    seq: np.ndarray  # the sequence of each tile
    q_offset: np.ndarray  # its first query token within the sequence
    q_rows: np.ndarray  # its query tokens
    tile_rows: np.ndarray  # the on-chip tile's stacked rows
    n_blocks: np.ndarray  # KV blocks its causal horizon reaches
    num_spans: np.ndarray  # KV spans it is split into (1 = not split)


def lower_attention(chunks: Sequence[ChunkLike], arch: ModelArch, chip: ChipSpec,
                    block_size: int) -> AttentionKernel:
    """Meta-attention tasks for a mixed batch.

    Each sequence's query tokens are cut into Q tiles (npu_sim.tiling.attention_q_tile; verify
    chunks take the verify tile, at least ATTN_VERIFY_TILE_ROWS stacked rows), one task per
    (tile, KV head) over the KV blocks its causal horizon reaches. Work is balanced by cost, not
    by request: a task whose work (stacked rows x keys) exceeds the per-core share is split into
    KV spans of at least MIN_KV_SPAN_TOKENS, whose partials a combine task joins. Before the
    sort, tasks are listed tile by tile, KV head by KV head, span by span, and partial slots
    are numbered in that order; then they are listed heaviest first (a stable sort), the order
    the device deals them to cores. Tree-shaped verify chunks carry their tree mask
    (`AttentionKernel.tree_masks`); chains and other chunks none.

    What timing needs is built here, per (tile, KV span) shape (`AttentionKernel.shapes`, tens
    of rows) plus the dealt order as shape indices (`task_shape`); the full task, combine and
    block tables (thousands of rows a step for a 7B MHA model) only when something reads them
    (`_task_tables`, `block_tables`: the functional kernels, timelines, token trees). A batch
    without verify chunks none of whose tiles is split (every step of most simulations) carries
    its lengths instead (`AttentionKernel.unsplit`: context lengths, and its prefill chunks'
    tiles, what the cost model prices it from), and its sequence and shape tables are built on
    first read too (`lower_unsplit`).
    """
    g, num_kv_heads = arch.num_heads // arch.num_kv_heads, arch.num_kv_heads
    chunks = tuple(chunks)  # kept for the lazy block tables
    num_seqs = len(chunks)
    # comprehensions: Python 3.11 reads an attribute in one specialised instruction, faster
    # than operator.attrgetter mapped in C (the attributes may be fields or properties:
    # ScheduledChunk.num_tokens is one)
    start_pos = np.array([c.start_pos for c in chunks], np.int64)
    num_tokens = [c.num_tokens for c in chunks]  # (a list: the unsplit lowering reads it so)
    drafts = any([c.draft_parents for c in chunks])
    if num_seqs and not drafts:
        kernel = lower_unsplit(chunks, start_pos, num_tokens, arch, chip, block_size)
        if kernel is not None:
            return kernel
    q_len = np.array(num_tokens, dtype=np.int64)
    trees = [s for s, c in enumerate(chunks) if c.draft_parents] if drafts else []
    verify = None
    if trees:
        verify = np.zeros(num_seqs, dtype=bool)
        verify[trees] = True
    tiles = _q_tiles(q_len, start_pos, verify, g, num_kv_heads, chip, block_size)
    max_spans = int(tiles.num_spans.max()) if num_seqs else 1
    shapes, task_shape = _shapes(tiles, num_kv_heads, max_spans)
    return AttentionKernel(
        **_kernel_fields(chunks, arch, block_size, lambda: tiles),
        seqs=_seq_table(q_len, start_pos),
        num_partial_slots=0 if max_spans == 1 else num_kv_heads * int(
            tiles.num_spans[tiles.num_spans > 1].sum()),
        max_tile_rows=int(tiles.tile_rows.max()) if len(tiles.seq) else 0,
        tree_masks=tuple((s, tree_mask(chunks[s].draft_parents)) for s in trees
                         if not token_tree.is_chain(chunks[s].draft_parents)),
        shapes=shapes, task_shape=task_shape,
    )


def lower_unsplit(chunks: tuple[ChunkLike, ...], start_pos: np.ndarray, num_tokens: list[int],
                   arch: ModelArch, chip: ChipSpec, block_size: int) -> AttentionKernel | None:
    """lower_attention's kernel of a batch without verify chunks, said by its lengths
    (`AttentionKernel.unsplit`), or None when a tile is to be split into KV spans (the general
    lowering does that). Most steps of a simulation are such batches: decodes, a tile each,
    and now and then a few prefill chunks. So what timing reads is computed from the context
    lengths in a few numpy calls, and the prefill chunks' tiles one by one (`_prefill_tiles`):
    the tiles' KV blocks, the split test and the dealt order, the values `_q_tiles` and
    `_tile_order` give (tested); the tiles of the whole batch, hence the sequence, shape and
    task tables, only when read."""
    g, num_kv_heads = arch.num_heads // arch.num_kv_heads, arch.num_kv_heads
    q_len = _once(lambda: np.array(num_tokens, dtype=np.int64))
    tiles = _once(lambda: _q_tiles(q_len(), start_pos, None, g, num_kv_heads, chip,
                                   block_size))
    fields = {"seqs": lambda: _seq_table(q_len(), start_pos), "num_partial_slots": 0,
              "shapes": lambda: _tile_shapes(tiles()),
              **_kernel_fields(chunks, arch, block_size, tiles)}
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
    by_weight = (-tile_work).argsort(kind="stable")  # _tile_order's
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
    # _tile_order's: every tile has the same rows, so heavier means more KV blocks (ties keep
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
    or None when `_spans` splits a tile of the batch (prefill: the tiles of its prefill chunks,
    if any; the other sequences are decodes)."""
    n_blocks = (context + (block_size - 1)) // block_size
    # _spans' work: query tokens x (g x block_size) x blocks, whole numbers (exact in any order)
    block_work = g * block_size
    work = int(np.add.reduce(n_blocks))
    if prefill is not None:
        work += sum(prefill.work) - prefill.context_blocks
    share = _core_share(work * block_work, num_kv_heads, chip)
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
    """Whether `_spans` splits a tile of a batch of sequences whose KV blocks are n_blocks and
    whose prefill chunks' tiles are `prefill`: a tile over the per-core share whose KV makes two
    spans at least (a batch of one is always over: a single stream's short contexts are not
    split). The test over every sequence's blocks as if it were a decode is the decodes' test,
    and no more: a prefill chunk's last tile has the blocks of its whole context and one query
    token at least."""
    span_blocks = _span_blocks(block_size)
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
    `_q_tiles` cuts them (npu_sim.tiling.attention_q_tile: full tiles of `tokens` query
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


def _kernel_fields(chunks: tuple[ChunkLike, ...], arch: ModelArch, block_size: int,
                   tiles: Callable[[], _Tiles]) -> dict[str, Any]:
    """The AttentionKernel fields every meta-kernel launch has alike: its model shape, and its
    block, task and combine tables built on first read (from `tiles()`, its Q tiles)."""
    tables = _once(lambda: _task_tables(tiles(), arch.num_kv_heads))
    return {"name": "attention", "num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim, "block_size": block_size,
            "scale": arch.head_dim**-0.5, "block_tables": lambda: block_tables(chunks),
            "tasks": lambda: tables()[0], "combine_tasks": lambda: tables()[1]}


def _seq_table(q_len: np.ndarray, start_pos: np.ndarray) -> np.ndarray:
    """The ATTN_SEQ table of sequences of q_len query tokens from start_pos, in batch order."""
    seqs = np.empty(len(q_len), dtype=ATTN_SEQ)
    seqs["q_start"] = np.cumsum(q_len) - q_len
    seqs["q_len"] = q_len
    seqs["start_pos"] = start_pos
    return seqs


def _once(build: Callable[[], T]) -> Callable[[], T]:
    """A function returning build()'s result, calling it on the first call only."""
    built: list[T] = []

    def get() -> T:
        if not built:
            built.append(build())
        return built[0]

    return get


def _q_tiles(q_len: np.ndarray, start_pos: np.ndarray, verify: np.ndarray | None, g: int,
             num_kv_heads: int, chip: ChipSpec, block_size: int) -> _Tiles:
    """The Q tiles of sequences of q_len query tokens from start_pos (verify: which are verify
    chunks; None = none), each with its KV spans: as many as its work over the per-core share,
    each of at least MIN_KV_SPAN_TOKENS (evenly spaced bounds)."""
    num_seqs = len(q_len)
    if num_seqs and (verify is None or not verify.any()) and int(q_len.max()) == 1:
        # decodes only, a tile each: attention_q_tiles' answer for one token, the smallest
        # tile holding g rows
        tile_rows = np.full(num_seqs, attention_q_tile(1, g)[0], dtype=np.int64)
        seq, q_offset, q_rows = np.arange(num_seqs), np.zeros(num_seqs, np.int64), q_len
        return _spans(seq, q_offset, q_rows, tile_rows, start_pos + q_len, g, num_kv_heads,
                      chip, block_size)
    if verify is None:
        verify = np.zeros(num_seqs, dtype=bool)
    # (tile_rows, tokens per tile) per sequence, then per tile
    seq_tile_rows, seq_tile_tokens = attention_q_tiles(q_len, g, verify)
    num_tiles = -(-q_len // seq_tile_tokens)
    if len(num_tiles) and int(num_tiles.max()) == 1:  # one tile per sequence
        seq, q_offset, q_rows = np.arange(num_seqs), np.zeros(num_seqs, np.int64), q_len
        return _spans(seq, q_offset, q_rows, seq_tile_rows, start_pos + q_len, g,
                      num_kv_heads, chip, block_size)
    seq = np.repeat(np.arange(num_seqs), num_tiles)
    q_offset = (np.arange(len(seq)) - np.repeat(np.cumsum(num_tiles) - num_tiles,
                                                num_tiles)) * seq_tile_tokens[seq]
    q_rows = np.minimum(seq_tile_tokens[seq], q_len[seq] - q_offset)
    return _spans(seq, q_offset, q_rows, seq_tile_rows[seq], start_pos[seq] + q_offset + q_rows,
                  g, num_kv_heads, chip, block_size)


def _spans(seq: np.ndarray, q_offset: np.ndarray, q_rows: np.ndarray, tile_rows: np.ndarray,
           horizon: np.ndarray, g: int, num_kv_heads: int, chip: ChipSpec,
           block_size: int) -> _Tiles:
    """The tiles (per tile: sequence, first query token, query tokens, tile rows, keys its last
    row sees) with their KV blocks and spans."""
    n_blocks = (horizon + (block_size - 1)) // block_size  # the causal horizon's
    work = q_rows * (g * block_size) * n_blocks  # whole numbers: exact in any order
    share = _core_share(int(work.sum()), num_kv_heads, chip)
    # No tile over the share (work / share <= 1 exactly when work <= share, IEEE division being
    # monotone) wants a second span: the common case, costing one reduction.
    if not share or int(work.max()) <= share:
        return _Tiles(seq, q_offset, q_rows, tile_rows, n_blocks, np.ones(len(work), np.int64))
    wanted = np.ceil(work / share).astype(np.int64)
    num_spans = np.maximum(1, np.minimum(wanted, n_blocks // _span_blocks(block_size)))
    return _Tiles(seq, q_offset, q_rows, tile_rows, n_blocks, num_spans)


def _span_blocks(block_size: int) -> int:
    """KV blocks of the shortest span a tile is split into (MIN_KV_SPAN_TOKENS, at least one)."""
    return max(1, MIN_KV_SPAN_TOKENS // block_size)


def _core_share(work: int, num_kv_heads: int, chip: ChipSpec) -> float:
    """The per-core share of a launch whose tiles' work (stacked rows x keys, KV head 0's)
    adds up to `work`: all KV heads' work over the cube cores."""
    return float(work) * num_kv_heads / chip.num_cube_cores


def _shapes(tiles: _Tiles, num_kv_heads: int, max_spans: int,
            ) -> tuple[np.ndarray, np.ndarray]:
    """(shapes, task_shape) of the meta-kernel (see AttentionKernel): the KV head 0 task of
    every (tile, span), in (tile, span) order, and the shape of every task in the dealt order,
    the one `_task_tables` lists. That order is tasks sorted by -(tile_rows x blocks), ties in
    (tile, KV head, span) order: shapes of one weight and one tile form a segment, whose tasks
    are its shapes again and again, once per KV head (a segment of an unsplit tile: one shape,
    num_kv_heads times). max_spans: the most spans of any tile (1 when there are none)."""
    num_spans = tiles.num_spans
    if max_spans == 1:  # no tile split: a shape per tile
        return _tile_shapes(tiles), _tile_order(tiles, num_kv_heads)
    shape_tile = np.repeat(np.arange(len(num_spans)), num_spans)
    span = np.arange(len(shape_tile)) - np.repeat(np.cumsum(num_spans) - num_spans, num_spans)
    spans, n_blocks = num_spans[shape_tile], tiles.n_blocks[shape_tile]
    begin, end = n_blocks * span // spans, n_blocks * (span + 1) // spans
    # KV head 0's partial slot: a split tile numbers num_kv_heads x spans slots, head-major
    tile_slots = np.where(num_spans > 1, num_kv_heads * num_spans, 0)
    slot = np.where(spans > 1, (np.cumsum(tile_slots) - tile_slots)[shape_tile] + span, -1)
    shapes = np.zeros(len(shape_tile), dtype=ATTN_TASK)  # kv_head 0
    for name, values in (("seq", tiles.seq), ("q_offset", tiles.q_offset),
                         ("q_rows", tiles.q_rows), ("tile_rows", tiles.tile_rows)):
        shapes[name] = values[shape_tile]
    shapes["kv_block_start"], shapes["kv_block_end"], shapes["partial_slot"] = begin, end, slot

    weight = shapes["tile_rows"] * (end - begin)
    by_weight = np.argsort(-weight, kind="stable")  # (-weight, tile, span) order
    seg_tile, seg_weight = shape_tile[by_weight], weight[by_weight]
    new = np.ones(len(by_weight), dtype=bool)
    new[1:] = (seg_tile[1:] != seg_tile[:-1]) | (seg_weight[1:] != seg_weight[:-1])
    seg_start = np.flatnonzero(new)  # first position (in by_weight) of each segment
    seg_len = np.diff(np.append(seg_start, len(by_weight)))
    seg_tasks = num_kv_heads * seg_len
    within = np.arange(int(seg_tasks.sum())) - np.repeat(np.cumsum(seg_tasks) - seg_tasks,
                                                         seg_tasks)
    position = np.repeat(seg_start, seg_tasks) + within % np.repeat(seg_len, seg_tasks)
    return shapes, by_weight[position]


def _tile_shapes(tiles: _Tiles) -> np.ndarray:
    """`_shapes` of tiles none of which is split: each tile over all its KV blocks."""
    shapes = np.empty(len(tiles.seq), dtype=ATTN_TASK)  # kv_head 0
    shapes["kv_head"] = 0
    for name, values in (("seq", tiles.seq), ("q_offset", tiles.q_offset),
                         ("q_rows", tiles.q_rows), ("tile_rows", tiles.tile_rows),
                         ("kv_block_end", tiles.n_blocks)):
        shapes[name] = values
    shapes["kv_block_start"], shapes["partial_slot"] = 0, -1
    return shapes


def _tile_order(tiles: _Tiles, num_kv_heads: int) -> np.ndarray:
    """`_shapes`' task_shape of tiles none of which is split: a segment per shape (tile), of
    weight its tile rows x all its blocks, num_kv_heads tasks each."""
    by_weight = np.argsort(-(tiles.tile_rows * tiles.n_blocks), kind="stable")
    return np.repeat(by_weight, num_kv_heads)


def _task_tables(tiles: _Tiles, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(ATTN_TASK table in the dealt order, COMBINE_TASK table) of the meta-kernel: the tasks
    tile-major, then KV head, then span, partial slots numbered in that order; then sorted
    heaviest first (stable)."""
    num_spans = tiles.num_spans
    per_tile = num_kv_heads * num_spans
    tile = np.repeat(np.arange(len(num_spans)), per_tile)
    within = np.arange(len(tile)) - np.repeat(np.cumsum(per_tile) - per_tile, per_tile)
    spans = num_spans[tile]
    kv_head, span = within // spans, within % spans
    n_blocks = tiles.n_blocks[tile]
    begin, end = n_blocks * span // spans, n_blocks * (span + 1) // spans
    split = spans > 1
    slot = np.where(split, np.cumsum(split) - 1, -1)
    tasks = np.empty(len(tile), dtype=ATTN_TASK)
    for name, values in (("seq", tiles.seq[tile]), ("kv_head", kv_head),
                         ("q_offset", tiles.q_offset[tile]), ("q_rows", tiles.q_rows[tile]),
                         ("tile_rows", tiles.tile_rows[tile]), ("kv_block_start", begin),
                         ("kv_block_end", end), ("partial_slot", slot)):
        tasks[name] = values
    # One combine per (split tile, KV head), at its first span's slot.
    first = split & (span == 0)
    combines = np.empty(int(first.sum()), dtype=COMBINE_TASK)
    for name, values in (("seq", tasks["seq"]), ("kv_head", kv_head),
                         ("q_offset", tasks["q_offset"]), ("q_rows", tasks["q_rows"]),
                         ("slot_start", slot), ("num_slots", spans)):
        combines[name] = values[first]
    order = np.argsort(-(tasks["tile_rows"] * (end - begin)), kind="stable")
    return tasks[order], combines


def block_tables(chunks: Sequence[ChunkLike]) -> np.ndarray:
    """int64 (num_chunks, max blocks): each chunk's block table, -1 past its end."""
    max_blocks = max((len(c.block_ids) for c in chunks), default=0)
    tables = np.full((len(chunks), max(max_blocks, 1)), -1, dtype=np.int64)
    for s, c in enumerate(chunks):
        tables[s, :len(c.block_ids)] = c.block_ids
    return tables
