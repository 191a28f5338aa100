"""The meta-attention kernel's Q tiles and tables (engine.lowering_attention lowers a batch
into them; engine.lowering_unsplit, a batch none of whose tiles is split, from its lengths).

A sequence's query tokens are cut into Q tiles (npu_sim.tiling.attention_q_tile), each over the
KV blocks its causal horizon reaches, split into KV spans where its work exceeds the per-core
share (`q_tiles`, `kv_spans`); a kernel's tables (its shapes and dealt order: `span_shapes`; its
task and combine tables: `task_tables`; its block tables) are built from the tiles.

Pure functions of (chunks, model shape, chip, block size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np

from engine.arch import ModelArch
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import ATTN_SEQ, ATTN_TASK, COMBINE_TASK
from npu_sim.tiling import attention_q_tile, attention_q_tiles

T = TypeVar("T")

# A KV span shorter than this is not worth a partial + combine round trip (catlass stacks four
# 128-token pages per softmax block; one span is at least that much).
MIN_KV_SPAN_TOKENS = 512


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


class QTiles(NamedTuple):
    """The meta-kernel's Q tiles, int64 arrays of (num_tiles,), sequence by sequence."""

    seq: np.ndarray  # the sequence of each tile
    q_offset: np.ndarray  # its first query token within the sequence
    q_rows: np.ndarray  # its query tokens
    tile_rows: np.ndarray  # the on-chip tile's stacked rows
    n_blocks: np.ndarray  # KV blocks its causal horizon reaches
    num_spans: np.ndarray  # KV spans it is split into (1 = not split)


def kernel_fields(chunks: tuple[ChunkLike, ...], arch: ModelArch, block_size: int,
                  tiles: Callable[[], QTiles]) -> dict[str, Any]:
    """The AttentionKernel fields every meta-kernel launch has alike: its model shape, and its
    block, task and combine tables built on first read (from `tiles()`, its Q tiles)."""
    tables = once(lambda: task_tables(tiles(), arch.num_kv_heads))
    return {"name": "attention", "num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim, "block_size": block_size,
            "scale": arch.head_dim**-0.5, "block_tables": lambda: block_tables(chunks),
            "tasks": lambda: tables()[0], "combine_tasks": lambda: tables()[1]}


def seq_table(q_len: np.ndarray, start_pos: np.ndarray) -> np.ndarray:
    """The ATTN_SEQ table of sequences of q_len query tokens from start_pos, in batch order."""
    seqs = np.empty(len(q_len), dtype=ATTN_SEQ)
    seqs["q_start"] = np.cumsum(q_len) - q_len
    seqs["q_len"] = q_len
    seqs["start_pos"] = start_pos
    return seqs


def once(build: Callable[[], T]) -> Callable[[], T]:
    """A function returning build()'s result, calling it on the first call only."""
    built: list[T] = []

    def get() -> T:
        if not built:
            built.append(build())
        return built[0]

    return get


def q_tiles(q_len: np.ndarray, start_pos: np.ndarray, verify: np.ndarray | None, g: int,
            num_kv_heads: int, chip: ChipSpec, block_size: int) -> QTiles:
    """The Q tiles of sequences of q_len query tokens from start_pos (verify: which are verify
    chunks; None = none), each with its KV spans: as many as its work over the per-core share,
    each of at least MIN_KV_SPAN_TOKENS (evenly spaced bounds)."""
    num_seqs = len(q_len)
    if num_seqs and (verify is None or not verify.any()) and int(q_len.max()) == 1:
        # decodes only, a tile each: attention_q_tiles' answer for one token, the smallest
        # tile holding g rows
        tile_rows = np.full(num_seqs, attention_q_tile(1, g)[0], dtype=np.int64)
        seq, q_offset, q_rows = np.arange(num_seqs), np.zeros(num_seqs, np.int64), q_len
        return kv_spans(seq, q_offset, q_rows, tile_rows, start_pos + q_len, g, num_kv_heads,
                        chip, block_size)
    if verify is None:
        verify = np.zeros(num_seqs, dtype=bool)
    # (tile_rows, tokens per tile) per sequence, then per tile
    seq_tile_rows, seq_tile_tokens = attention_q_tiles(q_len, g, verify)
    num_tiles = -(-q_len // np.maximum(seq_tile_tokens, 1))  # (a chunk of no token: no tile)
    if len(num_tiles) and int(num_tiles.max()) == 1:  # one tile per sequence
        seq, q_offset, q_rows = np.arange(num_seqs), np.zeros(num_seqs, np.int64), q_len
        return kv_spans(seq, q_offset, q_rows, seq_tile_rows, start_pos + q_len, g,
                        num_kv_heads, chip, block_size)
    seq = np.repeat(np.arange(num_seqs), num_tiles)
    q_offset = (np.arange(len(seq)) - np.repeat(np.cumsum(num_tiles) - num_tiles,
                                                num_tiles)) * seq_tile_tokens[seq]
    q_rows = np.minimum(seq_tile_tokens[seq], q_len[seq] - q_offset)
    return kv_spans(seq, q_offset, q_rows, seq_tile_rows[seq], start_pos[seq] + q_offset + q_rows,
                    g, num_kv_heads, chip, block_size)


def kv_spans(seq: np.ndarray, q_offset: np.ndarray, q_rows: np.ndarray, tile_rows: np.ndarray,
             horizon: np.ndarray, g: int, num_kv_heads: int, chip: ChipSpec,
             block_size: int) -> QTiles:
    """The tiles (per tile: sequence, first query token, query tokens, tile rows, keys its last
    row sees) with their KV blocks and spans."""
    n_blocks = (horizon + (block_size - 1)) // block_size  # the causal horizon's
    work = q_rows * (g * block_size) * n_blocks  # whole numbers: exact in any order
    share = core_share(int(work.sum()), num_kv_heads, chip)
    # No tile over the share (work / share <= 1 exactly when work <= share, IEEE division being
    # monotone) wants a second span: the common case, costing one reduction.
    if not share or int(work.max()) <= share:
        return QTiles(seq, q_offset, q_rows, tile_rows, n_blocks, np.ones(len(work), np.int64))
    wanted = np.ceil(work / share).astype(np.int64)
    num_spans = np.maximum(1, np.minimum(wanted, n_blocks // kv_span_blocks(block_size)))
    return QTiles(seq, q_offset, q_rows, tile_rows, n_blocks, num_spans)


def kv_span_blocks(block_size: int) -> int:
    """KV blocks of the shortest span a tile is split into (MIN_KV_SPAN_TOKENS, at least one)."""
    return max(1, MIN_KV_SPAN_TOKENS // block_size)


def core_share(work: int, num_kv_heads: int, chip: ChipSpec) -> float:
    """The per-core share of a launch whose tiles' work (stacked rows x keys, KV head 0's)
    adds up to `work`: all KV heads' work over the cube cores."""
    return float(work) * num_kv_heads / chip.num_cube_cores


def span_shapes(tiles: QTiles, num_kv_heads: int, max_spans: int,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(shapes, task_shape) of the meta-kernel (see AttentionKernel): the KV head 0 task of
    every (tile, span), in (tile, span) order, and the shape of every task in the dealt order,
    the one `task_tables` lists. That order is tasks sorted by -(tile_rows x blocks), ties in
    (tile, KV head, span) order: shapes of one weight and one tile form a segment, whose tasks
    are its shapes again and again, once per KV head (a segment of an unsplit tile: one shape,
    num_kv_heads times). max_spans: the most spans of any tile (1 when there are none)."""
    num_spans = tiles.num_spans
    if max_spans == 1:  # no tile split: a shape per tile
        return tile_shapes(tiles), tile_order(tiles, num_kv_heads)
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


def tile_shapes(tiles: QTiles) -> np.ndarray:
    """`span_shapes` of tiles none of which is split: each tile over all its KV blocks."""
    shapes = np.empty(len(tiles.seq), dtype=ATTN_TASK)  # kv_head 0
    shapes["kv_head"] = 0
    for name, values in (("seq", tiles.seq), ("q_offset", tiles.q_offset),
                         ("q_rows", tiles.q_rows), ("tile_rows", tiles.tile_rows),
                         ("kv_block_end", tiles.n_blocks)):
        shapes[name] = values
    shapes["kv_block_start"], shapes["partial_slot"] = 0, -1
    return shapes


def tile_order(tiles: QTiles, num_kv_heads: int) -> np.ndarray:
    """`span_shapes`' task_shape of tiles none of which is split: a segment per shape (tile), of
    weight its tile rows x all its blocks, num_kv_heads tasks each."""
    by_weight = np.argsort(-(tiles.tile_rows * tiles.n_blocks), kind="stable")
    return np.repeat(by_weight, num_kv_heads)


def task_tables(tiles: QTiles, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
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
