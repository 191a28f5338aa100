"""What the attention tests check the kernels against: a one-layer test model's shapes and a plain
float64 attention over the paged cache, written independently of the kernels and the lowering."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from engine.arch import ModelArch
from engine.lowering import ChunkShape


def make_arch(num_heads: int, num_kv_heads: int, head_dim: int = 16) -> ModelArch:
    return ModelArch(
        architecture="LlamaForCausalLM",
        num_layers=1,
        hidden_size=num_heads * head_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=64,
        vocab_size=100,
        rms_norm_eps=1e-6,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        attention_bias=False,
        eos_token_ids=(2,),
        bos_token_id=1,
    )


def ancestors(parents: Sequence[int]) -> np.ndarray:
    """bool (N, N) [a, b] = b is a or an ancestor of a, by walking up (independent of
    engine.lowering.tree_mask)."""
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for a in range(n):
        b = a
        while b >= 0:
            mask[a, b] = True
            b = parents[b]
    return mask


def dense_attention(chunks: Sequence[ChunkShape], q: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, block_size: int, scale: float | None = None,
                    ) -> torch.Tensor:
    """float64 attention, one chunk after another over consecutive rows of q (T, Hq, D), K/V
    gathered through each chunk's block table: causal, plus each chunk's tree (ancestor walk) on
    its draft rows. Scale 1 / sqrt(D) unless given; rows past the chunks stay zero."""
    g = q.shape[1] // k_cache.shape[2]
    scale = 1 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    q_start = 0
    for c in chunks:
        ctx, n = c.start_pos + c.num_tokens, len(c.draft_parents)
        pos = torch.arange(ctx)
        blocks = torch.tensor(c.block_ids)[pos // block_size]
        k = k_cache[blocks, pos % block_size].double().repeat_interleave(g, dim=1)  # (ctx, Hq, D)
        v = v_cache[blocks, pos % block_size].double().repeat_interleave(g, dim=1)
        rows = slice(q_start, q_start + c.num_tokens)
        scores = torch.einsum("nhd,chd->hnc", q[rows].double(), k) * scale
        visible = pos[None, :] <= (c.start_pos + torch.arange(c.num_tokens))[:, None]
        if n:
            visible[-n:, -n:] &= torch.from_numpy(ancestors(c.draft_parents))
        scores = scores.masked_fill(~visible[None], -math.inf)
        out[rows] = torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)
        q_start += c.num_tokens
    return out
