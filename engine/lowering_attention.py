"""Attention lowering: a batch's chunks -> meta-attention task tables (the split baseline's:
engine.lowering_split).

A chunk is a run of one request's query tokens at consecutive positions: a prefill (chunk), a
decode (one token) or a verify chunk of speculative decoding, its root (last real token)
followed by N draft nodes of a token tree at consecutive *virtual* positions (their KV slots), so
tree siblings never share a slot. Every row is causal over the virtual positions; the draft rows
further see only their own root-to-node branch among the draft keys, which the lowering hands
the kernel as an (N, N) ancestor-or-self mask built here on the host (XYS 5.1.2). A chain's mask
is the causal one, so chains get none in the meta-kernel.

A batch without verify chunks none of whose tiles is split is lowered from its lengths
(engine.lowering_unsplit); the Q tiles and tables are engine.lowering_tiles'.

Pure functions of (chunks, model shape, chip, block size); engine.lowering re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine import token_tree
from engine.arch import ModelArch
from engine.lowering_tiles import (
    ChunkLike,
    kernel_fields,
    q_tiles,
    seq_table,
    span_shapes,
)
from engine.lowering_unsplit import lower_unsplit
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import AttentionKernel


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
    (`task_tables`, `block_tables`: the functional kernels, timelines, token trees). A batch
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
    tiles = q_tiles(q_len, start_pos, verify, g, num_kv_heads, chip, block_size)
    max_spans = int(tiles.num_spans.max()) if num_seqs else 1
    shapes, task_shape = span_shapes(tiles, num_kv_heads, max_spans)
    return AttentionKernel(
        **kernel_fields(chunks, arch, block_size, lambda: tiles),
        seqs=seq_table(q_len, start_pos),
        num_partial_slots=0 if max_spans == 1 else num_kv_heads * int(
            tiles.num_spans[tiles.num_spans > 1].sum()),
        max_tile_rows=int(tiles.tile_rows.max()) if len(tiles.seq) else 0,
        tree_masks=tuple((s, tree_mask(chunks[s].draft_parents)) for s in trees
                         if not token_tree.is_chain(chunks[s].draft_parents)),
        shapes=shapes, task_shape=task_shape,
    )
