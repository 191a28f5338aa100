"""Meta-attention: matmul-softmax-matmul over a paged KV cache, one pattern for every row kind.

Operands: q (T, Hq, D) the batch's queries after RoPE; k_cache, v_cache (NB, BS, Hkv, D) one
layer's paged cache (this step's keys already written); returns out (T, Hq, D).

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
the same attention with a few batched SDPA calls: all single-token rows (decodes) in one, each
multi-token chunk (and each sequence with a tree) in its own, reading only the keys each sequence
sees; a tree only edits the chunk's causal mask, built once per kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
# padded into a (S, L) table for the single-token rows, and the causal masks. Each launch then
# gathers exactly those keys with index_select (a few contiguous rows per token) instead of
# whole padded blocks, and runs one SDPA for all decodes plus one per multi-token chunk.


@dataclass(frozen=True)
class _DecodeGroup:
    rows: torch.Tensor | slice  # query rows of the single-token sequences (a slice if contiguous)
    slots: torch.Tensor  # (S * L,) int64 flat cache slot of key l of sequence s (0 past the end)
    mask: torch.Tensor  # (S, 1, 1, L) bool: key l is within sequence s's context
    num_seqs: int  # S
    num_keys: int  # L: the longest context, rounded up to a multiple of KEY_ALIGN


@dataclass(frozen=True)
class _Chunk:
    rows: slice  # its query rows
    slots: torch.Tensor  # (context_len,) int64 flat cache slot of each key position
    mask: torch.Tensor  # (q_len * G, context_len) bool: causal, and the tree's if it has one


@dataclass(frozen=True)
class _FastPlan:
    decodes: tuple[_DecodeGroup, ...]  # single-token rows, grouped by context length
    chunks: tuple[_Chunk, ...]
    covers_all_rows: bool  # every row of q belongs to a sequence (else the rest stay zero)


KEY_ALIGN = 16  # pad the decode group's key count to this (fewer distinct SDPA shapes)
DECODE_GROUP_MIN_KEYS = 256  # contexts up to this share one decode group whatever their spread
_plan_memo: list[tuple[AttentionKernel, _FastPlan]] = []  # the last kernel seen and its plan


def _context_groups(single: np.ndarray, context_lens: np.ndarray) -> list[np.ndarray]:
    """Split the single-token sequences into groups of similar context length.

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


def _decode_group(seqs: np.ndarray, tables: np.ndarray, block_size: int) -> _DecodeGroup:
    """seqs: ATTN_SEQ rows of single-token sequences; tables: their block table rows."""
    context_lens = seqs["start_pos"] + 1
    num_keys = int(-(-context_lens.max() // KEY_ALIGN) * KEY_ALIGN)
    pos = np.arange(num_keys)
    table = tables[:, np.minimum(pos // block_size, tables.shape[1] - 1)]  # (S, L)
    inside = pos[None, :] < context_lens[:, None]
    slots = np.where(inside, table * block_size + pos % block_size, 0)
    q_rows = seqs["q_start"]
    contiguous = bool((np.diff(q_rows) == 1).all())
    rows = (slice(int(q_rows[0]), int(q_rows[0]) + len(q_rows)) if contiguous
            else torch.from_numpy(q_rows.copy()))
    return _DecodeGroup(rows=rows, slots=torch.from_numpy(slots.reshape(-1)),
                        mask=torch.from_numpy(inside)[:, None, None, :],
                        num_seqs=len(seqs), num_keys=num_keys)


def _fast_plan(kernel: AttentionKernel, num_rows: int) -> _FastPlan:
    memo = _plan_memo[0] if _plan_memo else None  # one read: another thread may replace it
    if memo is not None and memo[0] is kernel:
        return memo[1]
    seqs, bs, g = kernel.seqs, kernel.block_size, kernel.group_size
    tables = np.maximum(kernel.block_tables, 0)  # -1 (past a table's end) is never read
    trees = {int(s): np.asarray(m, dtype=bool) for s, m in kernel.tree_masks}
    has_tree = np.zeros(len(seqs), dtype=bool)
    has_tree[list(trees)] = True
    single = np.flatnonzero((seqs["q_len"] == 1) & ~has_tree)
    decodes = tuple(_decode_group(seqs[group], tables[group], bs)
                    for group in _context_groups(single, seqs["start_pos"][single] + 1))
    chunks = []
    for s in np.flatnonzero((seqs["q_len"] > 1) | has_tree):
        q_start, q_len, start_pos = (int(x) for x in seqs[s].tolist())
        context_len = start_pos + q_len
        pos = np.arange(context_len)
        slots = tables[s, pos // bs] * bs + pos % bs
        q_pos = torch.arange(start_pos, context_len).repeat_interleave(g)
        mask = torch.arange(context_len)[None, :] <= q_pos[:, None]  # (q_len * G, context_len)
        tree = trees.get(int(s))
        if tree is not None:  # the draft rows x draft keys corner: the tree mask, per head
            n = tree.shape[0]
            mask[(q_len - n) * g:, context_len - n:] &= torch.from_numpy(tree).repeat_interleave(
                g, dim=0)
        chunks.append(_Chunk(slice(q_start, q_start + q_len), torch.from_numpy(slots), mask))
    plan = _FastPlan(decodes, tuple(chunks), int(seqs["q_len"].sum()) == num_rows)
    _plan_memo[:] = [(kernel, plan)]
    return plan


def _run_batched(kernel: AttentionKernel, q: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
    plan = _fast_plan(kernel, q.shape[0])
    out = torch.empty_like(q) if plan.covers_all_rows else torch.zeros_like(q)
    hkv, g, d = kernel.num_kv_heads, kernel.group_size, kernel.head_dim
    k_flat, v_flat = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)  # (NB * BS, Hkv, D)
    for dec in plan.decodes:
        s, n = dec.num_seqs, dec.num_keys
        k = k_flat.index_select(0, dec.slots).view(s, n, hkv, d).transpose(1, 2)  # (S, Hkv, L, D)
        v = v_flat.index_select(0, dec.slots).view(s, n, hkv, d).transpose(1, 2)
        q_stacked = q[dec.rows].view(s, hkv, g, d)  # one row: its G heads stacked per KV head
        o = F.scaled_dot_product_attention(q_stacked, k, v, attn_mask=dec.mask,
                                           scale=kernel.scale)
        out[dec.rows] = o.view(s, kernel.num_heads, d)
    for c in plan.chunks:
        q_len = c.rows.stop - c.rows.start
        k = k_flat.index_select(0, c.slots).transpose(0, 1)[None]  # (1, Hkv, context_len, D)
        v = v_flat.index_select(0, c.slots).transpose(0, 1)[None]
        # (q_len, Hq, D) -> (1, Hkv, q_len * G, D): stacked row r * G + g = token r, head j * G + g
        q_stacked = q[c.rows].view(q_len, hkv, g, d).transpose(0, 1).reshape(1, hkv, q_len * g, d)
        o = F.scaled_dot_product_attention(q_stacked, k, v, attn_mask=c.mask, scale=kernel.scale)
        out[c.rows] = o.view(hkv, q_len, g, d).transpose(0, 1).reshape(q_len, -1, d)
    return out
