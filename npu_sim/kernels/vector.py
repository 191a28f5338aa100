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

from npu_sim.kernels import native
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
    slots = slot_mapping[rows]  # (a 16-bit cache takes fp32 rows rounded to its dtype)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[rows].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[rows].to(v_cache.dtype))


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
    if not strict:
        fast = _FAST.get(kernel.op)
        if fast is not None:
            return fast(kernel.num_rows, **operands)
    row_fn, make_out = _OPS[kernel.op]
    out = make_out(kernel, operands) if make_out else None
    if strict:
        for row_start, num_rows in kernel.tasks.tolist():
            row_fn(slice(row_start, row_start + num_rows), out, **operands)
    else:
        row_fn(slice(0, kernel.num_rows), out, **operands)
    return out


# ---------------------------------------------------------------------------------- fast path
#
# All rows at once. fp32 operands go to the C kernels where they load (npu_sim.kernels.native:
# one call per launch; RoPE and the KV write bit-for-bit the row functions above, RMSNorm and
# SiLU within a few fp32 ulps). Otherwise fewer and fused torch calls, bit-for-bit the row
# functions' arithmetic (same operations in the same order, on the same dtypes).


def _fast_embed(n: int, table: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, token_ids[:n])


def _normalize(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # = weight * (h32 * rsqrt(mean(h32^2) + eps)).to(h.dtype), as _rmsnorm_into
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    return F.rms_norm(h.float(), (h.shape[-1],), None, eps).to(h.dtype).mul_(weight)


def _fast_rmsnorm(n: int, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = native.add_rmsnorm(n, None, x, weight, eps)
    return _normalize(x[:n], weight, eps) if out is None else out


def _fast_add_rmsnorm(n: int, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> torch.Tensor:
    out = native.add_rmsnorm(n, x, residual, weight, eps)
    if out is not None:
        return out
    h = residual[:n]
    h += x[:n]
    return _normalize(h, weight, eps)


_rope_memo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin with its first half negated), each (T, 1, D); derived once per step (every
    layer rotates by the same tables)."""
    memo = _rope_memo[0] if _rope_memo else None  # one read: another thread may replace it
    if memo is not None and memo[0] is cos and memo[1] is sin:
        return memo[2], memo[3]
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    _rope_memo[:] = [(cos, sin, cos[:, None, :], signed[:, None, :])]
    return cos[:, None, :], signed[:, None, :]


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q (T, Hq, D) and k (T, Hkv, D) as one (T, Hq + Hkv, D) view, when k's heads directly
    follow q's in every row (both slices of one fused qkv projection); else None."""
    t, hq, d = q.shape
    if (k.shape[0] != t or k.shape[2] != d or k.dtype != q.dtype or q.stride() != k.stride()
            or q.stride()[1:] != (d, 1)
            or k.data_ptr() != q.data_ptr() + hq * d * q.element_size()):
        return None
    return q.as_strided((t, hq + k.shape[1], d), q.stride())


def _fast_rope(n: int, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> None:
    both = _adjacent_heads(q, k)
    parts = (q, k) if both is None else (both,)
    if native.rope(n, parts, cos, sin):
        return
    c, s = _rope_tables(cos, sin)
    c, s = c[:n], s[:n]
    half = q.shape[-1] // 2
    for t in parts:
        t = t[:n]
        # rotate_half(t) * sin == cat(t2, t1) * cat(-sin1, sin2), exactly ((-a) b == a (-b))
        rotated = torch.cat((t[..., half:], t[..., :half]), dim=-1).mul_(s)
        t.mul_(c).add_(rotated)


def _fast_silu_mul(n: int, gate_up: torch.Tensor) -> torch.Tensor:
    out = native.silu_mul(n, gate_up)
    if out is not None:
        return out
    gate, up = gate_up[:n].chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def _fast_kv_write(n: int, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if not native.kv_write(n, k, v, k_cache, v_cache, slot_mapping):
        _kv_write(slice(0, n), None, k, v, k_cache, v_cache, slot_mapping)


_FAST: dict[VectorOp | CopyOp, Callable[..., torch.Tensor | None]] = {
    VectorOp.EMBED: _fast_embed,
    VectorOp.RMSNORM: _fast_rmsnorm,
    VectorOp.ADD_RMSNORM: _fast_add_rmsnorm,
    VectorOp.ROPE: _fast_rope,
    VectorOp.SILU_MUL: _fast_silu_mul,
    VectorOp.KV_WRITE: _fast_kv_write,
}
