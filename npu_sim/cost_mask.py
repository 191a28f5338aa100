"""Cost of attention masks beyond causality: the token trees of speculative verify.

- Meta-kernel (XYS 5.1.2): a sequence's N x N ancestor-or-self mask is built on the host; a task
  whose Q tile holds draft rows and whose KV span reaches the draft keys loads it from HBM once
  (1 byte per element, half of it per AIV) and, before softmax, applies one select per score of
  its draft rows in the KV chunk that holds the draft keys. Both are paid once per task, on the
  AIVs; a verify tile is otherwise costed like any tile of its tile_rows.
- Split baseline (`AttentionKernel.full_mask`, PFA-style verify): a full (q_len, context_len)
  mask is streamed with the scores, q_rows x keys bytes per task through L2 (from HBM once per
  sequence: its heads share it), and one select is applied to every score of every row.
- Either way the scores a tree hides are not useful FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npu_sim.hardware import ChipSpec
from npu_sim.tasks import AttentionKernel

MASK_SELECT_OPS = 1.0  # vector passes per masked score: one select against the mask
MASK_BYTES = 1  # per mask element (bool / uint8)


@dataclass(frozen=True)
class MaskCost:
    """What masks add to a kernel's attention tasks. Arrays are per task; the per-chunk terms
    join the vector stages of the KV-chunk loop, the once terms its fill."""

    once_load: np.ndarray  # AIV MTE2 cycles, once per task (the tree mask)
    once_select: np.ndarray  # AIV compute cycles, once per task (the tree select)
    chunk_load: np.ndarray  # AIV MTE2 cycles per KV chunk (the full mask stream)
    chunk_select: np.ndarray  # AIV compute cycles per KV chunk (the full-mask select)
    hbm_bytes: float  # mask bytes read from HBM
    l2_bytes: float  # mask bytes re-read through L2
    hidden_scores: np.ndarray  # causal scores the trees hide (not useful FLOPs)


def mask_cost(k: AttentionKernel, chip: ChipSpec, lanes32: float, q_rows: np.ndarray,
              heads: Any, keys: np.ndarray, kl: np.ndarray,
              horizon_reached: np.ndarray) -> MaskCost:
    """Costs of `k.tree_masks` (non-empty) for the tasks of `k`. Per task: q_rows (tokens),
    keys (in its span), kl (keys per KV chunk), horizon_reached (its span reaches its tile's
    last key); heads: query heads stacked per task (array or scalar); lanes32: fp32 elements per
    vector pass per cycle."""
    t, aivs = k.tasks, chip.num_vector_cores // chip.num_cube_cores
    n_nodes = np.zeros(len(k.seqs))  # N per sequence, 0 without a tree
    # hidden_before[s, a]: causal keys the tree hides from nodes 0 .. a - 1 together
    hidden_before = np.zeros((len(k.seqs), 1 + max(len(m) for _, m in k.tree_masks)))
    for s, m in k.tree_masks:
        n_nodes[s] = len(m)
        hidden_before[s, 1:len(m) + 1] = np.cumsum(np.arange(1, len(m) + 1) - m.sum(axis=1))
    n = n_nodes[t["seq"]]
    first_node = k.seqs["q_len"][t["seq"]] - n  # chunk row of the first draft node
    lo = np.clip(t["q_offset"] - first_node, 0, n).astype(np.int64)  # the tile's nodes lo..hi
    hi = np.clip(t["q_offset"] + t["q_rows"] - first_node, 0, n).astype(np.int64)
    applies = (hi > lo) & horizon_reached  # the tile's draft rows meet the draft keys
    hidden = np.where(applies, heads * (hidden_before[t["seq"], hi]
                                        - hidden_before[t["seq"], lo]), 0.0)
    zero = np.zeros(len(t))
    if not k.full_mask:
        return MaskCost(
            once_load=np.where(applies, n * n * MASK_BYTES / aivs, 0)
            / chip.aiv_mte2_hbm_bytes_per_cycle,
            once_select=np.where(applies, (hi - lo) * heads * kl * MASK_SELECT_OPS, 0)
            / lanes32 / aivs,
            chunk_load=zero, chunk_select=zero,
            hbm_bytes=float((applies * n * n).sum()) * MASK_BYTES, l2_bytes=0.0,
            hidden_scores=hidden)
    masked = n > 0
    total = float(np.where(masked, q_rows * keys, 0).sum()) * MASK_BYTES  # all tasks' reads
    context = k.seqs["start_pos"] + k.seqs["q_len"]
    unique = min(total, float((n_nodes > 0) @ (k.seqs["q_len"] * context)) * MASK_BYTES)
    return MaskCost(
        once_load=zero, once_select=zero,
        chunk_load=np.where(masked, q_rows * kl * MASK_BYTES, 0)
        / chip.mte2_l2_bytes_per_cycle / aivs,
        chunk_select=np.where(masked, q_rows * heads * kl * MASK_SELECT_OPS, 0) / lanes32 / aivs,
        hbm_bytes=unique, l2_bytes=total - unique, hidden_scores=hidden)
