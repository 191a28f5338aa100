"""Lowering: one engine step's batch -> the fixed-shape kernels of one transformer layer.

Every layer of a step has the same shapes, so a step is lowered once into a `StepPlan` whose
`layer` kernels are replayed for all layers. GEMM and vector task tables are cached by token
count (npu_sim.tiling); only the attention task table depends on the batch's sequences.

Pure functions of (chunks, model shape, chip, block size): no torch, no request objects.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.models.arch import ModelArch
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import (
    ATTN_SEQ,
    ATTN_TASK,
    COMBINE_TASK,
    AttentionKernel,
    GemmKernel,
    VectorKernel,
    VectorOp,
)
from npu_sim.tiling import attention_q_tile, gemm_menu, gemm_tasks, vector_tasks

# A KV span shorter than this is not worth a partial + combine round trip (catlass stacks four
# 128-token pages per softmax block; one span is at least that much).
MIN_KV_SPAN_TOKENS = 512


@dataclass(frozen=True)
class ChunkShape:
    """What lowering needs of one scheduled chunk."""

    start_pos: int  # position of its first token
    num_tokens: int  # tokens computed this step
    block_ids: tuple[int, ...]  # its KV block table


@dataclass(frozen=True)
class LayerPlan:
    """The kernels of one decoder layer, in launch order (replayed for every layer)."""

    qkv_proj: GemmKernel  # x (T, H) -> qkv (T, (Hq + 2 Hkv) D)
    rope: VectorKernel  # q, k rotated in place
    kv_write: VectorKernel  # k, v -> this layer's paged cache
    attention: AttentionKernel  # q + cache -> (T, Hq, D)
    o_proj: GemmKernel  # (T, Hq D) -> (T, H)
    post_attn_norm: VectorKernel  # residual += o; x = rmsnorm(residual)
    gate_up_proj: GemmKernel  # (T, H) -> (T, 2 I)
    silu_mul: VectorKernel  # (T, 2 I) -> (T, I)
    down_proj: GemmKernel  # (T, I) -> (T, H)
    next_input_norm: VectorKernel  # residual += down; x = rmsnorm(residual), next layer's input


@dataclass(frozen=True)
class StepPlan:
    """All kernels of one step: embed, first norm, the layer (x num_layers), final norm, LM head."""

    embed: VectorKernel  # token ids (T,) -> (T, H)
    first_norm: VectorKernel  # layer 0's input norm (no residual yet)
    layer: LayerPlan
    final_norm: VectorKernel  # on the sampled rows only: residual += down; rmsnorm
    lm_head: GemmKernel | None  # (num_sampled, H) -> (num_sampled, V); None if nothing sampled
    num_tokens: int  # T, tokens in the batch
    num_sampled: int  # rows the LM head runs on


def lower_step(chunks: Sequence[ChunkShape], num_sampled: int, arch: ModelArch, chip: ChipSpec,
               block_size: int) -> StepPlan:
    """Lower a batch (chunks in batch order) into the step's kernels."""
    t = sum(c.num_tokens for c in chunks)
    h, d = arch.hidden_size, arch.head_dim
    menu = gemm_menu(chip)

    def gemm(name: str, m: int, n: int, k: int) -> GemmKernel:
        return GemmKernel(name=name, m=m, n=n, k=k, menu=menu, tasks=gemm_tasks(m, n, menu))

    def vector(name: str, op: VectorOp, rows: int, row_len: int) -> VectorKernel:
        return VectorKernel(name=name, op=op, num_rows=rows, row_len=row_len,
                            tasks=vector_tasks(rows, row_len, chip))

    qkv_n = (arch.num_heads + 2 * arch.num_kv_heads) * d
    layer = LayerPlan(
        qkv_proj=gemm("qkv_proj", t, qkv_n, h),
        rope=vector("rope", VectorOp.ROPE, t, (arch.num_heads + arch.num_kv_heads) * d),
        kv_write=vector("kv_write", VectorOp.KV_WRITE, t, 2 * arch.num_kv_heads * d),
        attention=lower_attention(chunks, arch, chip, block_size),
        o_proj=gemm("o_proj", t, h, arch.num_heads * d),
        post_attn_norm=vector("post_attention_norm", VectorOp.ADD_RMSNORM, t, h),
        gate_up_proj=gemm("gate_up_proj", t, 2 * arch.intermediate_size, h),
        silu_mul=vector("silu_mul", VectorOp.SILU_MUL, t, 2 * arch.intermediate_size),
        down_proj=gemm("down_proj", t, h, arch.intermediate_size),
        next_input_norm=vector("input_norm", VectorOp.ADD_RMSNORM, t, h),
    )
    return StepPlan(
        embed=vector("embed", VectorOp.EMBED, t, h),
        first_norm=vector("input_norm", VectorOp.RMSNORM, t, h),
        layer=layer,
        final_norm=vector("final_norm", VectorOp.ADD_RMSNORM, num_sampled, h),
        lm_head=gemm("lm_head", num_sampled, arch.vocab_size, h) if num_sampled else None,
        num_tokens=t,
        num_sampled=num_sampled,
    )


def lower_attention(chunks: Sequence[ChunkShape], arch: ModelArch, chip: ChipSpec,
                    block_size: int) -> AttentionKernel:
    """Meta-attention tasks for a mixed batch.

    Each sequence's query tokens are cut into Q tiles (npu_sim.tiling.attention_q_tile), one task
    per (tile, KV head) over the KV blocks its causal horizon reaches. Work is balanced by cost,
    not by request: a task whose work (stacked rows x keys) exceeds the per-core share is split
    into KV spans of at least MIN_KV_SPAN_TOKENS, whose partials a combine task joins. Tasks are
    listed heaviest first, the order the device deals them to cores.
    """
    g = arch.num_heads // arch.num_kv_heads
    seqs = np.empty(len(chunks), dtype=ATTN_SEQ)
    max_blocks = max((len(c.block_ids) for c in chunks), default=0)
    block_tables = np.full((len(chunks), max(max_blocks, 1)), -1, dtype=np.int64)
    # candidate tasks before splitting: (seq, q_offset, q_rows, tile_rows, num_blocks)
    tiles: list[tuple[int, int, int, int, int]] = []
    q_start = 0
    for s, c in enumerate(chunks):
        seqs[s] = (q_start, c.num_tokens, c.start_pos)
        block_tables[s, :len(c.block_ids)] = c.block_ids
        q_start += c.num_tokens
        tile_rows, tokens_per_tile = attention_q_tile(c.num_tokens, g)
        for q_offset in range(0, c.num_tokens, tokens_per_tile):
            q_rows = min(tokens_per_tile, c.num_tokens - q_offset)
            horizon = c.start_pos + q_offset + q_rows  # keys the tile's last row sees
            tiles.append((s, q_offset, q_rows, tile_rows, -(-horizon // block_size)))

    work = [q_rows * g * n_blocks * block_size for _, _, q_rows, _, n_blocks in tiles]
    share = sum(work) * arch.num_kv_heads / chip.num_cube_cores  # per-core share of all work
    min_span_blocks = max(1, MIN_KV_SPAN_TOKENS // block_size)
    tasks: list[tuple[int, ...]] = []
    combines: list[tuple[int, ...]] = []
    num_slots = 0
    for (s, q_offset, q_rows, tile_rows, n_blocks), w in zip(tiles, work, strict=True):
        num_spans = max(1, min(math.ceil(w / share) if share else 1,
                               n_blocks // min_span_blocks))
        # Evenly spaced span bounds: every span has at least min_span_blocks blocks.
        bounds = [n_blocks * i // num_spans for i in range(num_spans + 1)]
        for kv_head in range(arch.num_kv_heads):
            if num_spans == 1:
                tasks.append((s, kv_head, q_offset, q_rows, tile_rows, 0, n_blocks, -1))
                continue
            combines.append((s, kv_head, q_offset, q_rows, num_slots, num_spans))
            for begin, end in itertools.pairwise(bounds):
                tasks.append((s, kv_head, q_offset, q_rows, tile_rows, begin, end, num_slots))
                num_slots += 1

    task_table = np.array(tasks, dtype=ATTN_TASK)
    cost = task_table["tile_rows"] * (task_table["kv_block_end"] - task_table["kv_block_start"])
    task_table = task_table[np.argsort(-cost, kind="stable")]
    return AttentionKernel(
        name="attention", num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim, block_size=block_size, scale=arch.head_dim**-0.5,
        seqs=seqs, block_tables=block_tables, tasks=task_table,
        combine_tasks=np.array(combines, dtype=COMBINE_TASK), num_partial_slots=num_slots,
        max_tile_rows=int(task_table["tile_rows"].max()) if len(task_table) else 0,
    )
