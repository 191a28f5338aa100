"""Vector-core primitives: row-wise math, run per row tile (reference) or on all rows (fast).

Both paths share the row functions below, so they agree by construction on the arithmetic; what
the reference adds is the tiling: every task touches exactly rows [row_start, row_start + num_rows)
and nothing else, which the tests check against the task table.

Operands (T = rows / tokens, H = hidden, I = intermediate, D = head dim):
  EMBED        table (V, H), token_ids (T,)                    -> out (T, H)
  RMSNORM      x (T, H), weight (H,), eps                      -> out (T, H)
  ADD_RMSNORM  x (T, H), residual (T, H) updated in place, weight (H,), eps -> out (T, H)
  ROPE         q (T, Hq, D), k (T, Hkv, D) rotated in place, cos (T, D), sin (T, D) -> None
  SILU_MUL     gate_up (T, 2I)                                 -> out (T, I)
  KV_WRITE     k, v (T, Hkv, D), k_cache, v_cache (NB, BS, Hkv, D) written in place,
               slot_mapping (T,) = block_id * BS + offset       -> None
  PAD_COPY     x (M, K) with M = valid_rows                     -> out (num_rows, K), rows >= M zero
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from npu_sim.tasks import CopyOp, VectorKernel, VectorOp

Rows = slice


def _embed(rows: Rows, out: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor) -> None:
    out[rows] = table[token_ids[rows]]


def _rmsnorm_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    # Same order of operations as transformers' LlamaRMSNorm, in fp32 whatever the dtype.
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    out.copy_(weight * h32.to(h.dtype))


def _rmsnorm(rows: Rows, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             eps: float) -> None:
    _rmsnorm_into(out[rows], x[rows], weight, eps)


def _add_rmsnorm(rows: Rows, out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                 weight: torch.Tensor, eps: float) -> None:
    residual[rows] += x[rows]
    _rmsnorm_into(out[rows], residual[rows], weight, eps)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # t: (R, heads, D); cos/sin: (R, 1, D). Non-interleaved halves, as transformers' Llama.
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    t.mul_(cos).add_(rotated * sin)


def _rope(rows: Rows, out: None, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> None:
    c, s = cos[rows, None, :], sin[rows, None, :]
    _rotate(q[rows], c, s)
    _rotate(k[rows], c, s)


def _silu_mul(rows: Rows, out: torch.Tensor, gate_up: torch.Tensor) -> None:
    gate, up = gate_up[rows].chunk(2, dim=-1)
    torch.mul(F.silu(gate), up, out=out[rows])


def _kv_write(rows: Rows, out: None, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    slots = slot_mapping[rows]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[rows])
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[rows])


def _pad_copy(rows: Rows, out: torch.Tensor, x: torch.Tensor) -> None:
    valid = x.shape[0]
    out[rows.start:min(rows.stop, valid)] = x[rows.start:min(rows.stop, valid)]
    out[max(rows.start, valid):rows.stop] = 0


# op -> (row function, how to allocate its output or None when it writes in place)
_OPS: dict[VectorOp | CopyOp, tuple[Callable[..., None], Callable[..., torch.Tensor] | None]] = {
    VectorOp.EMBED: (_embed, lambda k, o: o["table"].new_empty(k.num_rows, o["table"].shape[1])),
    VectorOp.RMSNORM: (_rmsnorm, lambda k, o: torch.empty_like(o["x"])),
    VectorOp.ADD_RMSNORM: (_add_rmsnorm, lambda k, o: torch.empty_like(o["x"])),
    VectorOp.ROPE: (_rope, None),
    VectorOp.SILU_MUL: (_silu_mul, lambda k, o: o["gate_up"].new_empty(
        k.num_rows, o["gate_up"].shape[1] // 2)),
    VectorOp.KV_WRITE: (_kv_write, None),
    CopyOp.PAD_COPY: (_pad_copy, lambda k, o: o["x"].new_empty(k.num_rows, o["x"].shape[1])),
}


def run_vector(kernel: VectorKernel, strict: bool, **operands: Any) -> torch.Tensor | None:
    """Execute a vector kernel; returns its output tensor, or None for in-place ops.

    strict=True walks the task table (each task touches only its rows); otherwise one call
    covers all `kernel.num_rows` rows.
    """
    row_fn, make_out = _OPS[kernel.op]
    out = make_out(kernel, operands) if make_out else None
    if strict:
        for row_start, num_rows in kernel.tasks.tolist():
            row_fn(slice(row_start, row_start + num_rows), out, **operands)
    else:
        row_fn(slice(0, kernel.num_rows), out, **operands)
    return out
