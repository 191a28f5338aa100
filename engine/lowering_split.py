"""The split attention baseline: a batch's chunks -> torch-npu's two attention kernels,
PromptFlashAttention for chunks of several tokens and IncreFlashAttention for single tokens,
split over the cores as their tilings split them (what XY-Serve's meta-attention replaces; the
baseline policy's attention, engine.lowering.AttentionPolicy.SPLIT).

Pure functions of (chunks, model shape, chip, block size); engine.lowering re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.arch import ModelArch
from engine.lowering_attention import tree_mask
from engine.lowering_tiles import ChunkLike, block_tables
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import ATTN_SEQ, ATTN_TASK, COMBINE_TASK, AttentionKernel
from npu_sim.tiling import attention_q_tile


def lower_attention_split(chunks: Sequence[ChunkLike], arch: ModelArch, chip: ChipSpec,
                          block_size: int) -> tuple[AttentionKernel, ...]:
    """The split baseline: a prefill kernel (chunks of more than one token: prefill, chunked
    prefill, and every verify chunk) and a decode kernel (single tokens), whichever are
    non-empty, in that order, split over the cores as torch-npu's PromptFlashAttention (PFA) and
    IncreFlashAttention (IFA) split them.

    Prefill (PFA): one task per (request, query head, 128-row Q tile) over its whole causal KV
    (no KV split, no combine). PFA splits N, the query heads; with GQA each task reads its KV
    head's cache itself, re-reads mostly hitting L2. The tasks are cut into contiguous runs of
    about equal work, one per core, as PFA's tiling balances its N x B x S1 blocks
    (`_pfa_tasks`).
    A verify chunk is a prefill chunk with a full explicit mask (`AttentionKernel.full_mask`:
    read from GM and applied to all its scores), chains included, as PFA verifies drafts.

    Decode (IFA): tasks stack a KV head's query-head group (GQA decode reads each KV head once),
    split as IFA's tiling splits them: whole (request, KV head) units in contiguous runs of
    about equal KV length per core, or, when the units are too few for the cores and the KV is
    long, FlashDecoding-style KV spans whose partials (o, lse) combine tasks on the vector cores
    join (`_ifa_tasks`). QK stays on the cube (no 2-stage pipeline).

    Each kernel lists only its own sequences (rows keep their batch positions), so the two
    outputs add up to the batch's attention.
    """
    q_starts = np.cumsum([0] + [c.num_tokens for c in chunks])[:-1]
    kernels = []
    for is_decode in (False, True):
        members = [s for s, c in enumerate(chunks)
                   if (c.num_tokens == 1 and not c.draft_parents) == is_decode]
        if not members:
            continue
        seqs = np.empty(len(members), dtype=ATTN_SEQ)
        tables = block_tables([chunks[s] for s in members])
        for j, s in enumerate(members):
            seqs[j] = (q_starts[s], chunks[s].num_tokens, chunks[s].start_pos)
        if is_decode:
            tasks, heads, groups, combines = _ifa_tasks(seqs, arch, chip, block_size)
        else:
            tasks, heads, groups, combines = _pfa_tasks(seqs, arch, chip, block_size)
        task_table = np.array(tasks, dtype=ATTN_TASK)
        masks = tuple((j, tree_mask(chunks[s].draft_parents)) for j, s in enumerate(members)
                      if chunks[s].draft_parents)
        kernels.append(AttentionKernel(
            name="decode_attention" if is_decode else "prefill_attention",
            num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
            block_size=block_size, scale=arch.head_dim**-0.5, seqs=seqs,
            block_tables=tables, tasks=task_table,
            combine_tasks=np.array(combines, dtype=COMBINE_TASK).reshape(-1),
            num_partial_slots=int((task_table["partial_slot"] >= 0).sum()),
            max_tile_rows=int(task_table["tile_rows"].max()),
            task_group=np.array(groups, dtype=np.int64),
            task_heads=np.array(heads, dtype=np.int64).reshape(-1, 2), vector_qk=False,
            tree_masks=masks, full_mask=bool(masks),
        ))
    return tuple(kernels)


# torch-npu's IFA tiling (CANN ops-transformer incre_flash_attention_tiling*.cpp), 910B, paged KV
IFA_FD_MIN_KV_TOKENS = 1024  # IsFlashDecode: paged KV on the 910B never splits up to 1024 keys
IFA_FD_BN_RATIO = 0.4  # CheckCoreOkFlag: split KV when batch x KV heads < 0.4 x cores
IFA_FD_GQA_MIN_KV_TOKENS = 2048  # ... and, with GQA, only when the longest KV reaches 2048
IFA_FD_MIN_PART_TOKENS = 512  # SplitBNS: fewer KV parts until each is >= 512 keys

_Lowered = tuple[list[tuple[int, ...]], list[tuple[int, int]], list[int], list[tuple[int, ...]]]


def _pfa_tasks(seqs: np.ndarray, arch: ModelArch, chip: ChipSpec, block_size: int) -> _Lowered:
    """PFA's (tasks, task_heads, task_group, combines), after PromptFlashAttentionSplitNSNew:
    Q blocks of 128 rows of one query head, in (head, request, block) order, cut into contiguous
    runs of about equal weight, one run per core: a causal block's weight is its index + 1 (the
    KV blocks up to its diagonal); with a cached prefix (PFA's right-down mask) every block
    weighs the request's whole KV loop. A block joins the current run unless that overshoots
    the run's target by more than stopping short of it."""
    g = arch.num_heads // arch.num_kv_heads
    tasks: list[tuple[int, ...]] = []
    heads: list[tuple[int, int]] = []
    weights: list[int] = []
    for head in range(arch.num_heads):
        for j, (_, q_len, start_pos) in enumerate(seqs.tolist()):
            tile_rows, tokens_per_tile = attention_q_tile(q_len, 1)
            kv_loops = -(-(start_pos + q_len) // tokens_per_tile)
            for i, q_offset in enumerate(range(0, q_len, tokens_per_tile)):
                q_rows = min(tokens_per_tile, q_len - q_offset)
                horizon = start_pos + q_offset + q_rows  # keys the tile's last row sees
                tasks.append((j, head // g, q_offset, q_rows, tile_rows, 0,
                              -(-horizon // block_size), -1))
                heads.append((head % g, 1))
                weights.append(i + 1 if start_pos == 0 else kv_loops)
    target = sum(weights) / chip.num_cube_cores
    groups, core, done = [], 0, 0
    for w in weights:
        short = int(target * (core + 1)) - done
        if w - short > short and done:
            core += 1
        groups.append(core)
        done += w
    return tasks, heads, groups, []


def _ifa_tasks(seqs: np.ndarray, arch: ModelArch, chip: ChipSpec, block_size: int) -> _Lowered:
    """IFA's (tasks, task_heads, task_group, combines). IFA splits over the vector cores
    (`SetCoreNum`: a mix kernel in its normal mode counts AIVs; two AIV slots share an AIC here,
    run one after the other). A unit is one (request, KV head), its query heads stacked.
    - Flash decoding (`IsFlashDecode`, `SplitBNS`) when the longest KV passes 1024 keys, the units
      number under 0.4 x cores, and the model is MHA or the longest KV reaches 2048: each unit's
      KV in `parts` equal spans (cores / units, fewer until a span holds 512 keys), one per
      slot; the spans' partials (o, lse) are joined by combine tasks on the vector cores.
    - Otherwise (`SplitBN`) whole units, contiguous runs per slot: equal counts when there are
      no more units than slots or every request has the same length, else runs of about equal
      KV length (`SetSparseStartIdx`, a greedy prefix cut)."""
    g, h_kv = arch.num_heads // arch.num_kv_heads, arch.num_kv_heads
    slots = chip.num_vector_cores
    tile_rows = attention_q_tile(1, g)[0]
    contexts = (seqs["start_pos"] + 1).tolist()
    longest, units = max(contexts), len(contexts) * h_kv
    flash = (longest > IFA_FD_MIN_KV_TOKENS and units < IFA_FD_BN_RATIO * slots
             and (g == 1 or longest >= IFA_FD_GQA_MIN_KV_TOKENS))
    tasks: list[tuple[int, ...]] = []
    groups: list[int] = []
    combines: list[tuple[int, ...]] = []
    if flash:
        parts = slots // units
        while longest / parts < IFA_FD_MIN_PART_TOKENS and parts > 1:
            parts -= 1
        part_tokens = -(-longest // parts)
        span_blocks = -(-part_tokens // block_size)  # a part in whole KV blocks
        num_slots = 0
        for j, context in enumerate(contexts):
            n_blocks = -(-context // block_size)
            spans = [(b, min(b + span_blocks, n_blocks)) for b in range(0, n_blocks, span_blocks)]
            for kv_head in range(h_kv):
                if len(spans) > 1:
                    combines.append((j, kv_head, 0, 1, num_slots, len(spans)))
                for i, (begin, end) in enumerate(spans):
                    slot = num_slots + i if len(spans) > 1 else -1
                    tasks.append((j, kv_head, 0, 1, tile_rows, begin, end, slot))
                    groups.append((j * h_kv + kv_head) * parts + i)
                num_slots += len(spans) if len(spans) > 1 else 0
        return tasks, [(0, g)] * len(tasks), groups, combines
    loads = [context for context in contexts for _ in range(h_kv)]  # (request, KV head) order
    if units <= slots or len(set(contexts)) == 1:  # SplitBN_V0: equal counts, former cores +1
        per, former = divmod(units, slots)
        bounds = [i * (per + 1) if i < former else former * (per + 1) + (i - former) * per
                  for i in range(min(units, slots))]
        owner = np.searchsorted(bounds, np.arange(units), side="right") - 1
    else:  # SetSparseStartIdx: contiguous runs of about equal load
        owner, left, run, slot = [], float(sum(loads)), 0.0, 0
        for load in loads:
            avg = left / (slots - slot)
            if run and run + load - avg > avg - run and slot + 1 < slots:
                left, run, slot = left - run, 0.0, slot + 1
            owner.append(slot)
            run += load
    for u, context in enumerate(loads):
        j, kv_head = divmod(u, h_kv)
        tasks.append((j, kv_head, 0, 1, tile_rows, 0, -(-context // block_size), -1))
        groups.append(int(owner[u]))
    return tasks, [(0, g)] * len(tasks), groups, combines
