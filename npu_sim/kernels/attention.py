"""Meta-attention: matmul-softmax-matmul over a paged KV cache, one pattern for every row kind.

Operands: q (T, Hq, D) the batch's queries after RoPE; k_cache, v_cache (NB, BS, Hkv, D) one
layer's paged cache (this step's keys already written); returns out (T, Hq, D).

GQA stacking: the G = Hq / Hkv query heads that share KV head j are stacked into the rows of one
Q tile, so a tile of q_rows tokens is a (q_rows * G, D) matrix, row r * G + g being token r, head
j * G + g. Causality: stacked row of token r (position start_pos + q_offset + r) sees key
positions <= its own and < the sequence's context length.

The reference path runs the task table: per task, online softmax over its KV blocks one block at
a time (running max m, running sum l, unnormalized accumulator), then either the normalized
output or a partial (o, lse) in a workspace slot that a combine task joins. The fast path computes
the same attention with a few batched SDPA calls: all single-token rows (decodes) in one, each
multi-token chunk in its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from npu_sim.tasks import AttentionKernel


def run_attention(kernel: AttentionKernel, strict: bool, q: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> torch.Tensor:
    """Execute an attention kernel; see the module docstring for operand shapes."""
    out = torch.zeros_like(q)
    if strict:
        _run_tasks(kernel, q, k_cache, v_cache, out)
    else:
        _run_batched(kernel, q, k_cache, v_cache, out)
    return out


# ----------------------------------------------------------------------------- reference path

def _run_tasks(kernel: AttentionKernel, q: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, out: torch.Tensor) -> None:
    g, d = kernel.group_size, kernel.head_dim
    ws_o = q.new_zeros(kernel.num_partial_slots, kernel.max_tile_rows, d, dtype=torch.float32)
    ws_lse = q.new_full((kernel.num_partial_slots, kernel.max_tile_rows), -math.inf,
                        dtype=torch.float32)
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
                                 t["kv_block_end"], int(t["kv_head"]), k_cache, v_cache)
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


def _online_softmax(kernel: AttentionKernel, q_tile: torch.Tensor, q_pos: torch.Tensor,
                    context_len: int, block_table: np.ndarray, block_start: int, block_end: int,
                    kv_head: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend q_tile (R, D) to KV blocks [block_start, block_end); returns (o (R, D), lse (R,)).

    Rows that see no key in the span get o = 0 and lse = -inf (they weigh nothing when combined).
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

def _run_batched(kernel: AttentionKernel, q: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, out: torch.Tensor) -> None:
    seqs = kernel.seqs
    single = np.flatnonzero(seqs["q_len"] == 1)
    if len(single):
        _attend_decodes(kernel, single, q, k_cache, v_cache, out)
    for s in np.flatnonzero(seqs["q_len"] > 1):
        _attend_chunk(kernel, int(s), q, k_cache, v_cache, out)


def _gather_kv(kernel: AttentionKernel, seq_ids: np.ndarray, num_blocks: int,
               cache: torch.Tensor) -> torch.Tensor:
    """Keys or values of `seq_ids` as (S, Hkv, num_blocks * BS, D); -1 table entries read block 0
    (masked out by the caller)."""
    table = torch.from_numpy(np.maximum(kernel.block_tables[seq_ids, :num_blocks], 0))
    kv = cache[table]  # (S, nb, BS, Hkv, D)
    s, nb, bs, hkv, d = kv.shape
    return kv.view(s, nb * bs, hkv, d).transpose(1, 2)


def _attend_decodes(kernel: AttentionKernel, seq_ids: np.ndarray, q: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
    seqs = kernel.seqs[seq_ids]
    context_lens = seqs["start_pos"] + 1
    num_blocks = int(-(-context_lens.max() // kernel.block_size))
    k = _gather_kv(kernel, seq_ids, num_blocks, k_cache)  # (S, Hkv, L, D)
    v = _gather_kv(kernel, seq_ids, num_blocks, v_cache)
    rows = torch.from_numpy(seqs["q_start"])
    q_stacked = q[rows].view(len(seq_ids), kernel.num_kv_heads, kernel.group_size, -1)
    k_pos = torch.arange(k.shape[2])
    mask = (k_pos[None, :] < torch.from_numpy(context_lens)[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q_stacked, k, v, attn_mask=mask, scale=kernel.scale)
    out[rows] = o.reshape(len(seq_ids), kernel.num_heads, -1)


def _attend_chunk(kernel: AttentionKernel, s: int, q: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, out: torch.Tensor) -> None:
    q_start, q_len, start_pos = kernel.seqs[s].tolist()
    g = kernel.group_size
    context_len = start_pos + q_len
    num_blocks = -(-context_len // kernel.block_size)
    k = _gather_kv(kernel, np.array([s]), num_blocks, k_cache)[:, :, :context_len]
    v = _gather_kv(kernel, np.array([s]), num_blocks, v_cache)[:, :, :context_len]
    rows = slice(q_start, q_start + q_len)
    # (q_len, Hq, D) -> (1, Hkv, q_len * G, D): stacked row r * G + g = token r, head j * G + g
    q_stacked = (q[rows].view(q_len, kernel.num_kv_heads, g, -1).transpose(0, 1)
                 .reshape(1, kernel.num_kv_heads, q_len * g, -1))
    q_pos = torch.arange(start_pos, context_len).repeat_interleave(g)
    mask = torch.arange(context_len)[None, :] <= q_pos[:, None]  # (q_len * G, context_len)
    o = F.scaled_dot_product_attention(q_stacked, k, v, attn_mask=mask, scale=kernel.scale)
    out[rows] = o.view(kernel.num_kv_heads, q_len, g, -1).transpose(0, 1).reshape(q_len, -1,
                                                                                   o.shape[-1])
