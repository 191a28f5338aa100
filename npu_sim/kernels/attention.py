"""Meta-attention: matmul-softmax-matmul over a paged KV cache, one pattern for every row kind.

Operands: q (T, Hq, D) the batch's queries after RoPE; k_cache, v_cache (NB, BS, Hkv, D) one
layer's paged cache (this step's keys already written; q's dtype, or a 16-bit cache under fp32
queries, widened as it is read); returns out (T, Hq, D).

GQA stacking: the G = Hq / Hkv query heads that share KV head j are stacked into the rows of one
Q tile, so a tile of q_rows tokens is a (q_rows * G, D) matrix, row r * G + g being token r, head
j * G + g. Causality: stacked row of token r (position start_pos + q_offset + r) sees key
positions <= its own and < the sequence's context length. A sequence with a token tree
(`AttentionKernel.tree_masks`, an (N, N) ancestor-or-self mask over its last N rows and keys, the
draft nodes) further hides, for each draft row, the draft keys its mask row leaves out; keys
before the first draft node stay visible to every row.

The reference path runs the task table: per task, online softmax over its KV blocks one block at
a time (running max m, running sum l, unnormalized accumulator), then either the normalized
output or a partial (o, lse) in a workspace slot that a combine task joins. The fast path computes
the same attention with a few batched SDPA calls: short sequences (decodes, verifies, short
chunks) in groups of similar context length, padded to the group's longest query and context,
each longer chunk in its own; each reads only the keys its sequences see, and a tree only edits
the causal mask, built once per kernel. With fp32 queries, C kernels (native/attention.c,
attention_chunk.c) take the decodes and every chunk without a tree (short or long), reading the
paged cache (fp32, bf16 or fp16) directly with no mask at all; SDPA then runs only the
sequences with a tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from npu_sim.kernels import native
from npu_sim.tasks import AttentionKernel


def run_attention(kernel: AttentionKernel, strict: bool, q: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> torch.Tensor:
    """Execute an attention kernel; see the module docstring for operand shapes."""
    if not strict:
        return _run_batched(kernel, q, k_cache, v_cache)
    out = torch.zeros_like(q)
    _run_tasks(kernel, q, k_cache, v_cache, out)
    return out


# ----------------------------------------------------------------------------- reference path

def _run_tasks(kernel: AttentionKernel, q: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, out: torch.Tensor) -> None:
    g, d = kernel.group_size, kernel.head_dim
    ws_o = q.new_zeros(kernel.num_partial_slots, kernel.max_tile_rows, d, dtype=torch.float32)
    ws_lse = q.new_full((kernel.num_partial_slots, kernel.max_tile_rows), -math.inf,
                        dtype=torch.float32)
    trees = {int(s): torch.from_numpy(np.asarray(m, dtype=bool)) for s, m in kernel.tree_masks}
    for i, t in enumerate(kernel.tasks):
        q_start, q_len, start_pos = kernel.seqs[t["seq"]].tolist()
        rows = _rows(q_start + t["q_offset"], t["q_rows"])
        h0, nh = (0, g) if kernel.task_heads is None else kernel.task_heads[i].tolist()
        heads = slice(t["kv_head"] * g + h0, t["kv_head"] * g + h0 + nh)
        q_tile = q[rows, heads].reshape(-1, d).float()  # (q_rows * nh, D) stacked
        assert q_tile.shape[0] <= t["tile_rows"], "Q tile overflows its tile"
        # position of each stacked row's token
        q_pos = (start_pos + t["q_offset"] + np.arange(t["q_rows"])).repeat(nh)
        o, lse = _online_softmax(kernel, q_tile, torch.from_numpy(q_pos), start_pos + q_len,
                                 kernel.block_tables[t["seq"]], t["kv_block_start"],
                                 t["kv_block_end"], int(t["kv_head"]), k_cache, v_cache,
                                 trees.get(int(t["seq"])))
        if t["partial_slot"] < 0:
            out[rows, heads] = o.view(t["q_rows"], nh, d).to(out.dtype)
        else:
            ws_o[t["partial_slot"], :len(o)] = o
            ws_lse[t["partial_slot"], :len(o)] = lse
    for c in kernel.combine_tasks:
        n = c["q_rows"] * g
        slots = slice(c["slot_start"], c["slot_start"] + c["num_slots"])
        lse = ws_lse[slots, :n]  # (num_slots, n)
        weights = torch.softmax(lse, dim=0).nan_to_num(0.0)  # exp(lse_i - logsumexp)
        o = (weights[..., None] * ws_o[slots, :n]).sum(0)  # (n, D)
        rows = _rows(kernel.seqs[c["seq"]]["q_start"] + c["q_offset"], c["q_rows"])
        out[rows, c["kv_head"] * g:(c["kv_head"] + 1) * g] = o.view(-1, g, d).to(out.dtype)


def _rows(start: int, num: int) -> slice:
    return slice(int(start), int(start + num))


def _tree_visible(tree: torch.Tensor, first_node_pos: int, q_pos: torch.Tensor,
                  k_pos: torch.Tensor) -> torch.Tensor:
    """(R, K) bool: row by row, False where a draft row meets a draft key its tree mask row
    hides; True elsewhere (non-draft rows and keys are left to causality)."""
    n = tree.shape[0]
    a, b = q_pos - first_node_pos, k_pos - first_node_pos  # node index of each row / key
    row_is_node, key_is_node = (a >= 0) & (a < n), (b >= 0) & (b < n)
    allowed = tree[a.clamp(0, n - 1)][:, b.clamp(0, n - 1)]  # (R, K)
    return ~(row_is_node[:, None] & key_is_node[None, :]) | allowed


def _online_softmax(kernel: AttentionKernel, q_tile: torch.Tensor, q_pos: torch.Tensor,
                    context_len: int, block_table: np.ndarray, block_start: int, block_end: int,
                    kv_head: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    tree: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend q_tile (R, D) to KV blocks [block_start, block_end); returns (o (R, D), lse (R,)).

    q_pos (R,) is each row's position; `tree` the sequence's (N, N) tree mask over its last N
    positions (None: causal only). Rows that see no key in the span get o = 0 and lse = -inf (they
    weigh nothing when combined).
    """
    bs = kernel.block_size
    num_rows = q_tile.shape[0]
    m = torch.full((num_rows,), -math.inf)
    l_sum = torch.zeros(num_rows)
    acc = torch.zeros(num_rows, kernel.head_dim)
    for b in range(int(block_start), int(block_end)):
        block = int(block_table[b])
        k = k_cache[block, :, kv_head].float()  # (BS, D)
        v = v_cache[block, :, kv_head].float()
        k_pos = b * bs + torch.arange(bs)
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < context_len)
        if tree is not None:
            visible &= _tree_visible(tree, context_len - tree.shape[0], q_pos, k_pos)
        s = (q_tile @ k.T * kernel.scale).masked_fill(~visible, -math.inf)  # (R, BS)
        m_new = torch.maximum(m, s.max(dim=1).values)
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows with nothing visible yet
        p = torch.exp(s - m_safe[:, None])
        alpha = torch.exp(m - m_safe)
        l_sum = l_sum * alpha + p.sum(dim=1)
        acc = acc * alpha[:, None] + p @ v
        m = m_new
    seen = l_sum > 0
    o = torch.where(seen[:, None], acc / l_sum.clamp_min(1e-30)[:, None], 0.0)
    lse = torch.where(seen, m + torch.log(l_sum.clamp_min(1e-30)), -math.inf)
    return o, lse


# ---------------------------------------------------------------------------------- fast path
#
# What every launch of one kernel shares (a step launches the same kernel once per layer) is
# derived once and kept with the kernel: the flat cache slot of every key each sequence reads,
# padded into a (S, L) table per group of short sequences, and the masks. Each launch then
# gathers exactly those keys with index_select (a few contiguous rows per token) instead of
# whole padded blocks, and runs one SDPA per group plus one per long chunk.


@dataclass(frozen=True)
class _ShortGroup:
    """Sequences of at most SHORT_Q_MAX query tokens that no C kernel takes (decodes, verifies,
    short chunks; with the C kernels, only those with a tree) run as one SDPA: queries padded to
    Q tokens, keys to L."""

    rows: torch.Tensor | slice  # (S * Q,) query row of token r of sequence s (padding rows
    #   repeat a real row); a slice when Q = 1 and the rows are contiguous
    keep: torch.Tensor | None  # (num_real,) positions in S * Q of the real tokens; None = all
    out_rows: torch.Tensor | slice  # (num_real,) their rows of the output
    slots: torch.Tensor  # (S * L,) int64 flat cache slot of key l of sequence s (0 past the end)
    mask: torch.Tensor  # (S, 1, Q * G, L) bool: causal within the context, tree masks applied;
    #   a padding row sees key 0 only (no all-masked row: SDPA would give NaN)
    num_seqs: int  # S
    num_queries: int  # Q: the longest query of the group
    num_keys: int  # L: the longest context, rounded up to a multiple of KEY_ALIGN


@dataclass(frozen=True)
class _Decodes:
    """Sequences with one query token and no tree, for the C kernel (fp32): it reads each one's
    keys straight from the paged cache, so there is nothing to gather or mask."""

    rows: torch.Tensor  # (S,) int64 query row of each
    block_tables: torch.Tensor  # (S, B) int64 their block tables
    context_lens: torch.Tensor  # (S,) int64


@dataclass(frozen=True)
class _Chunk:
    rows: slice  # its query rows
    slots: torch.Tensor  # (context_len,) int64 flat cache slot of each key position
    mask: torch.Tensor  # (q_len * G, context_len) bool: causal, and the tree's if it has one


@dataclass(frozen=True)
class _NativeChunk:
    """A long chunk without a tree, for the C kernel (fp32): causal, read from the paged cache."""

    rows: slice  # its query rows
    block_table: torch.Tensor  # (B,) int64 its block table
    start_pos: int  # the position of its first token


class _Native(NamedTuple):
    """Which C kernels take this launch's operands."""

    decodes: bool  # native.decode_attention_supported
    chunks: bool  # native.chunk_attention_supported


@dataclass(frozen=True)
class _FastPlan:
    decodes: _Decodes | None  # single-token sequences for the C kernel (None: none, or no C)
    groups: tuple[_ShortGroup, ...]  # the other short sequences, grouped by context length
    chunks: tuple[_Chunk | _NativeChunk, ...]  # the longer ones, one launch each
    covers_all_rows: bool  # every row of q belongs to a sequence (else the rest stay zero)


KEY_ALIGN = 16  # pad the decode group's key count to this (fewer distinct SDPA shapes)
DECODE_GROUP_MIN_KEYS = 256  # contexts up to this share one group whatever their spread
SHORT_Q_MAX = 32  # sequences with at most this many query tokens are batched in groups
# the last kernel seen, which C kernels its plan uses, and the plan
_plan_memo: list[tuple[AttentionKernel, _Native, _FastPlan]] = []


def _context_groups(single: np.ndarray, context_lens: np.ndarray) -> list[np.ndarray]:
    """Split the short sequences into groups of similar context length.

    A group's keys are padded to its longest context, so one group for a batch mixing short
    decodes with a long one would gather the long context's worth of keys for every sequence.
    Sorted by context, a group closes when the next context exceeds twice its first (at least
    DECODE_GROUP_MIN_KEYS): padding stays under 2x, with a few groups at most.
    """
    if not len(single):
        return []
    order = np.argsort(context_lens, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or context_lens[order[i]] > max(
                2 * context_lens[order[start]], DECODE_GROUP_MIN_KEYS):
            groups.append(single[order[start:i]])
            start = i
    return groups


def _visibility(starts: np.ndarray, q_lens: np.ndarray, num_q: int, num_keys: int,
                members: np.ndarray, trees: dict[int, np.ndarray]) -> np.ndarray:
    """(S, Q, L) bool: token r of sequence i sees key l. Each token sees the keys up to its own
    (virtual) position; a sequence with a tree (trees: kernel sequence index -> its (N, N)
    mask, members: the kernel index of each of the S sequences) has its draft rows x draft keys
    corner masked by it. Rows r >= q_len see nothing."""
    pos, r = np.arange(num_keys), np.arange(num_q)
    real = r[None, :] < q_lens[:, None]  # (S, Q)
    visible = (pos[None, None, :] <= (starts[:, None] + r[None, :])[:, :, None]) & real[:, :, None]
    for i, s in enumerate(members):
        tree = trees.get(int(s))
        if tree is not None:
            n, q_len, ctx = tree.shape[0], int(q_lens[i]), int(starts[i] + q_lens[i])
            visible[i, q_len - n:q_len, ctx - n:ctx] &= tree
    return visible


def _short_group(seqs: np.ndarray, tables: np.ndarray, trees: dict[int, np.ndarray],
                 members: np.ndarray, block_size: int, g: int) -> _ShortGroup:
    """seqs: ATTN_SEQ rows of the group's sequences (indices `members` of the kernel's);
    tables: their block table rows; trees: kernel sequence index -> its tree mask."""
    q_lens, starts = seqs["q_len"], seqs["start_pos"]
    context_lens = starts + q_lens
    num_q = int(q_lens.max())
    num_keys = int(-(-context_lens.max() // KEY_ALIGN) * KEY_ALIGN)
    pos = np.arange(num_keys)
    table = tables[:, np.minimum(pos // block_size, tables.shape[1] - 1)]  # (S, L)
    inside = pos[None, :] < context_lens[:, None]  # (S, L)
    slots = np.where(inside, table * block_size + pos % block_size, 0)
    r = np.arange(num_q)
    real = r[None, :] < q_lens[:, None]  # (S, Q)
    visible = _visibility(starts, q_lens, num_q, num_keys, members, trees)
    visible[:, :, 0] |= ~real  # padding rows: key 0, discarded
    mask = np.repeat(visible, g, axis=1)[:, None]  # (S, 1, Q * G, L), row r * G + g
    rows = seqs["q_start"][:, None] + np.minimum(r[None, :], q_lens[:, None] - 1)  # (S, Q)
    flat_rows = rows.reshape(-1)
    if num_q == 1 and bool((np.diff(flat_rows) == 1).all()):
        gather: torch.Tensor | slice = slice(int(flat_rows[0]), int(flat_rows[0]) + len(flat_rows))
    else:
        gather = torch.from_numpy(flat_rows.copy())
    keep = None if bool(real.all()) else torch.from_numpy(np.flatnonzero(real.reshape(-1)))
    out_rows = gather if keep is None else torch.from_numpy(rows[real])
    return _ShortGroup(rows=gather, keep=keep, out_rows=out_rows,
                       slots=torch.from_numpy(slots.reshape(-1)), mask=torch.from_numpy(mask),
                       num_seqs=len(seqs), num_queries=num_q, num_keys=num_keys)


def _fast_plan(kernel: AttentionKernel, num_rows: int, use_native: _Native) -> _FastPlan:
    memo = _plan_memo[0] if _plan_memo else None  # one read: another thread may replace it
    if memo is not None and memo[0] is kernel and memo[1] == use_native:
        return memo[2]
    seqs, bs, g = kernel.seqs, kernel.block_size, kernel.group_size
    tables = np.maximum(kernel.block_tables, 0)  # -1 (past a table's end) is never read
    trees = {int(s): np.asarray(m, dtype=bool) for s, m in kernel.tree_masks}
    untreed = ~np.isin(np.arange(len(seqs)), list(trees))
    # The C chunk kernel takes every chunk without a tree mask, short ones (a short prompt, a
    # verify) too: a step with one then still replays (native_plan), where SDPA groups would
    # send the whole step launch by launch.
    native_chunk = ((seqs["q_len"] > 1) & untreed if use_native.chunks
                    else np.zeros(len(seqs), dtype=bool))
    short = (seqs["q_len"] <= SHORT_Q_MAX) & ~native_chunk
    decodes = None
    if use_native.decodes:
        single = (seqs["q_len"] == 1) & untreed
        short &= ~single
        if single.any():
            decodes = _Decodes(rows=torch.from_numpy(seqs["q_start"][single].astype(np.int64)),
                               block_tables=torch.from_numpy(tables[single].astype(np.int64)),
                               context_lens=torch.from_numpy(
                                   (seqs["start_pos"][single] + 1).astype(np.int64)))
    short = np.flatnonzero(short)
    groups = tuple(_short_group(seqs[members], tables[members], trees, members, bs, g)
                   for members in _context_groups(short, seqs["start_pos"][short]
                                                  + seqs["q_len"][short]))
    chunks: list[_Chunk | _NativeChunk] = []
    for s in np.flatnonzero((seqs["q_len"] > SHORT_Q_MAX) | native_chunk):
        q_start, q_len, start_pos = (int(x) for x in seqs[s].tolist())
        if native_chunk[s]:
            chunks.append(_NativeChunk(slice(q_start, q_start + q_len),
                                       torch.from_numpy(tables[s].astype(np.int64)), start_pos))
            continue
        context_len = start_pos + q_len
        pos = np.arange(context_len)
        slots = tables[s, pos // bs] * bs + pos % bs
        visible = _visibility(seqs["start_pos"][s:s + 1], seqs["q_len"][s:s + 1], q_len,
                              context_len, np.array([s]), trees)[0]  # (q_len, context_len)
        mask = torch.from_numpy(np.repeat(visible, g, axis=0))  # (q_len * G, context_len)
        chunks.append(_Chunk(slice(q_start, q_start + q_len), torch.from_numpy(slots), mask))
    plan = _FastPlan(decodes, groups, tuple(chunks), int(seqs["q_len"].sum()) == num_rows)
    _plan_memo[:] = [(kernel, use_native, plan)]
    return plan


def native_plan(kernel: AttentionKernel, num_rows: int,
                support: tuple[bool, bool]) -> _FastPlan | None:
    """The fast path's plan for this launch when the C kernels alone run it (C decodes and C
    chunks, every row of q in a sequence), else None; support: native.attention_support of
    the operands. What a replayed layer stack (npu_sim.kernels.replay) calls instead."""
    plan = _fast_plan(kernel, num_rows, _Native(*support))
    if (plan.groups or not plan.covers_all_rows
            or not all(isinstance(c, _NativeChunk) for c in plan.chunks)):
        return None
    return plan


def _run_batched(kernel: AttentionKernel, q: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
    plan = _fast_plan(kernel, q.shape[0], _Native(*native.attention_support(q, k_cache, v_cache)))
    out = torch.empty_like(q) if plan.covers_all_rows else torch.zeros_like(q)
    bf16_matmul = native.bf16_attention_for(q.shape[0])  # (as a replayed step's)
    if plan.decodes is not None:
        dec = plan.decodes
        native.decode_attention(q, k_cache, v_cache, dec.block_tables, dec.context_lens,
                                dec.rows, out, kernel.scale, bf16_matmul)
    hkv, g, d = kernel.num_kv_heads, kernel.group_size, kernel.head_dim
    k_flat, v_flat = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)  # (NB * BS, Hkv, D)
    for grp in plan.groups:
        s, n, nq = grp.num_seqs, grp.num_keys, grp.num_queries
        k = k_flat.index_select(0, grp.slots).view(s, n, hkv, d).transpose(1, 2)  # (S, Hkv, L, D)
        v = v_flat.index_select(0, grp.slots).view(s, n, hkv, d).transpose(1, 2)
        k, v = k.to(q.dtype), v.to(q.dtype)  # a 16-bit cache under fp32 queries: widen
        # (S * Q, Hq, D) -> (S, Hkv, Q * G, D): stacked row r * G + g = token r, head j * G + g
        q_stacked = q[grp.rows].view(s, nq, hkv, g, d).transpose(1, 2).reshape(s, hkv, nq * g, d)
        o = F.scaled_dot_product_attention(q_stacked, k, v, attn_mask=grp.mask,
                                           scale=kernel.scale)  # (S, Hkv, Q * G, D)
        o = o.view(s, hkv, nq, g, d).transpose(1, 2).reshape(s * nq, kernel.num_heads, d)
        out[grp.out_rows] = o if grp.keep is None else o[grp.keep]
    for c in plan.chunks:
        if isinstance(c, _NativeChunk):
            native.chunk_attention(q, k_cache, v_cache, c.block_table, c.start_pos, c.rows, out,
                                   kernel.scale, bf16_matmul)
            continue
        q_len = c.rows.stop - c.rows.start
        k = k_flat.index_select(0, c.slots).transpose(0, 1)[None].to(q.dtype)  # (1, Hkv, ctx, D)
        v = v_flat.index_select(0, c.slots).transpose(0, 1)[None].to(q.dtype)
        # (q_len, Hq, D) -> (1, Hkv, q_len * G, D): stacked row r * G + g = token r, head j * G + g
        q_stacked = q[c.rows].view(q_len, hkv, g, d).transpose(0, 1).reshape(1, hkv, q_len * g, d)
        o = F.scaled_dot_product_attention(q_stacked, k, v, attn_mask=c.mask, scale=kernel.scale)
        out[c.rows] = o.view(hkv, q_len, g, d).transpose(0, 1).reshape(q_len, -1, d)
    return out
