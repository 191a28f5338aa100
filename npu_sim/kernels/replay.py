"""A model's decoder layers prepared once and replayed each step in one C call (native/decoder.c).

Every launch of a decoder layer on the fast path is one C call already (npu_sim.kernels.native);
what remained per launch was Python: operand checks, output allocation, ctypes marshalling. At
batch 1 that walk cost as much as the kernels themselves. `LayerStack` keeps, per layer, the
pointers those calls take (packed weights, norms, caches: fixed for the model's life), and per step
builds one table of the step's buffers and attention rows; decoder.c then makes the same calls with
the same operands and thread count, so the numbers are bit-for-bit those of the launch-by-launch
path.

Only what that path would run in C is replayed: fp32 activations, every GEMM weight in panels
(fp32 panels up to GEMM_MAX_ROWS rows), a contiguous paged cache, and attention that the C decode
and chunk kernels cover alone (no token trees, no short multi-token sequences).
`LayerStack.prepare` returns None for a model outside that, `plan_step` None for a step outside it;
the caller then launches layer by layer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from npu_sim.kernels import native
from npu_sim.kernels.attention import native_plan
from npu_sim.kernels.gemm import PackedWeight
from npu_sim.tasks import AttentionKernel

_I, _P, _F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_BF16_ACTIVATIONS = 1  # gemm.c's flag, as native.gemm passes it by default


class _Weight(ctypes.Structure):
    _fields_ = [("fmt", _I), ("panels", _P), ("bias", _P), ("n", _I), ("k", _I),
                ("small_fmt", _I), ("small_panels", _P), ("small_rows", _I),
                ("mid_fmt", _I), ("mid_rows", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("post_attn_norm", _P), ("next_norm", _P), ("qkv", _Weight), ("o", _Weight),
                ("gate_up", _Weight), ("down", _Weight), ("k_cache", _P), ("v_cache", _P)]


class _Dims(ctypes.Structure):
    _fields_ = [(name, _I) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads",
                                        "head_dim", "inter", "num_blocks", "block_size",
                                        "kv_dtype")] + [("eps", _F), ("scale", _F)]


class _Step(ctypes.Structure):
    _fields_ = [("num_tokens", _I), ("residual", _P), ("x", _P), ("qkv", _P), ("attn", _P),
                ("o", _P), ("gate_up", _P), ("act", _P), ("down", _P), ("cos", _P),
                ("sin", _P), ("slots", _P), ("num_decodes", _I), ("decode_rows", _P),
                ("decode_tables", _P), ("decode_context_lens", _P),
                ("decode_table_stride", _I), ("num_chunks", _I), ("chunks", _P),
                ("chunk_tables", _P), ("chunk_table_len", _I), ("num_threads", _I),
                ("gemm_flags", _I), ("attention_flags", _I)]


@dataclass(frozen=True)
class StackLayer:
    """One decoder layer's operands, as the launch-by-launch forward passes them."""

    qkv: torch.Tensor | PackedWeight  # ((Hq + 2 Hkv) D, H)
    qkv_bias: torch.Tensor | None  # ((Hq + 2 Hkv) D,) or None
    o_proj: torch.Tensor | PackedWeight  # (H, Hq D)
    o_proj_bias: torch.Tensor | None  # (H,) or None
    post_attn_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor | PackedWeight  # (2 I, H)
    down: torch.Tensor | PackedWeight  # (H, I)
    next_norm: torch.Tensor | None  # (H,) the next layer's input norm; None for the last
    k_cache: torch.Tensor  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor  # (NB, BS, Hkv, D)


@dataclass(frozen=True)
class StepOperands:
    """A step's inputs to the layer stack (T tokens)."""

    residual: torch.Tensor  # (T, H) fp32 the embeddings, updated in place
    x: torch.Tensor  # (T, H) fp32 the first layer's normed input (overwritten)
    cos: torch.Tensor  # (T, D) fp32
    sin: torch.Tensor  # (T, D) fp32
    slot_mapping: torch.Tensor  # (T,) int64 flat cache slots


class LayerStack:
    """The decoder layers of one model, ready to replay (see the module docstring)."""

    def __init__(self, dims: _Dims, layers: ctypes.Array, keep: list[object],
                 max_rows: int | None, support: tuple[bool, bool]) -> None:
        self._dims, self._layers, self._keep = dims, layers, keep
        self._max_rows = max_rows  # fp32 panels take this many rows at most (None: any)
        self._support = support  # native.attention_support of the model's operands

    @classmethod
    def prepare(cls, layers: Sequence[StackLayer], num_heads: int,
                eps: float) -> LayerStack | None:
        """The stack, or None where some operand is not what decoder.c takes (the C kernels
        off, a weight not in panels, a norm, bias or cache not fp32 contiguous rows...)."""
        if native.lib() is None or not layers:
            return None
        cache = layers[0].k_cache
        nb, bs, hkv, d = cache.shape
        q = torch.empty(1, num_heads, d)  # an fp32 query row: what the support checks need
        support = native.attention_support(q, cache, layers[0].v_cache)
        if not support[0] or cache.dtype not in native.KV_DTYPES:
            return None
        table = (_Layer * len(layers))()
        keep: list[object] = []  # what the table points into
        fp32_panels = False
        for entry, layer in zip(table, layers, strict=True):
            vectors = (layer.post_attn_norm, layer.next_norm, layer.qkv_bias, layer.o_proj_bias)
            caches = (layer.k_cache, layer.v_cache)
            if (not all(v is None or _fp32_vector(v) for v in vectors)
                    or any(c.shape != cache.shape or c.dtype != cache.dtype
                           or not c.is_contiguous() for c in caches)):
                return None
            weights = []
            for w, bias in ((layer.qkv, layer.qkv_bias), (layer.o_proj, layer.o_proj_bias),
                            (layer.gate_up, None), (layer.down, None)):
                if not isinstance(w, PackedWeight) or w.panels is None:
                    return None
                fp32_panels |= w.panels.fmt == "fp32"
                keep += [w.panels, w.small]
                small = (0, None, 0) if w.small is None else (w.small.code, w.small.ptr,
                                                              w.small_rows)
                mid = (0, 0) if w.mid is None else (w.mid.code, w.mid_rows)
                weights.append(_Weight(w.panels.code, w.panels.ptr, _ptr(bias), w.panels.n,
                                       w.panels.k, *small, *mid))
            entry.post_attn_norm, entry.next_norm = _ptr(layer.post_attn_norm), _ptr(
                layer.next_norm)
            entry.qkv, entry.o, entry.gate_up, entry.down = weights
            entry.k_cache, entry.v_cache = layer.k_cache.data_ptr(), layer.v_cache.data_ptr()
            keep += [t for t in (*vectors, *caches) if t is not None]
        inter = layers[0].down.shape[1]
        hidden = layers[0].down.shape[0]
        if layers[0].qkv.shape[0] != (num_heads + 2 * hkv) * d:
            return None
        dims = _Dims(num_layers=len(layers), hidden=hidden, num_heads=num_heads,
                     num_kv_heads=hkv, head_dim=d, inter=inter, num_blocks=nb, block_size=bs,
                     kv_dtype=native.KV_DTYPES[cache.dtype], eps=eps)
        return cls(dims, table, keep, native.GEMM_MAX_ROWS if fp32_panels else None, support)

    def run(self, attention: AttentionKernel, step: StepOperands) -> torch.Tensor | None:
        """Run every layer on the step: returns the last layer's down projection (T, H) (the
        residual stream is in step.residual), or None, having touched nothing, where the step
        is not one the C kernels alone run (then launch layer by layer)."""
        t, m = len(step.residual), self._dims
        slots = step.slot_mapping
        if ((self._max_rows is not None and t > self._max_rows)
                or not _fp32_rows(step.residual, step.x, step.cos, step.sin)
                or slots.dtype != torch.int64 or not slots.is_contiguous()):
            return None
        plan = native_plan(attention, t, self._support)
        if plan is None:
            return None
        m.scale = attention.scale
        qkv_n = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
        bufs = [torch.empty(t, n) for n in (qkv_n, m.num_heads * m.head_dim, m.hidden,
                                             2 * m.inter, m.inter, m.hidden)]
        s = _Step(num_tokens=t, residual=step.residual.data_ptr(), x=step.x.data_ptr(),
                  cos=step.cos.data_ptr(), sin=step.sin.data_ptr(),
                  slots=slots.data_ptr(), num_threads=torch.get_num_threads(),
                  gemm_flags=_BF16_ACTIVATIONS,
                  attention_flags=native.ATTN_BF16_MATMUL if native.bf16_attention_for(t) else 0)
        s.qkv, s.attn, s.o, s.gate_up, s.act, s.down = (b.data_ptr() for b in bufs)
        if plan.decodes is not None:
            dec = plan.decodes
            s.num_decodes, s.decode_rows = len(dec.rows), dec.rows.data_ptr()
            s.decode_tables, s.decode_table_stride = (dec.block_tables.data_ptr(),
                                                      dec.block_tables.stride(0))
            s.decode_context_lens = dec.context_lens.data_ptr()
        if plan.chunks:
            chunks = torch.tensor([(c.rows.start, c.rows.stop - c.rows.start, c.start_pos)
                                   for c in plan.chunks], dtype=torch.int64)
            tables = torch.stack([c.block_table for c in plan.chunks])
            s.num_chunks, s.chunks = len(chunks), chunks.data_ptr()
            s.chunk_tables, s.chunk_table_len = tables.data_ptr(), tables.shape[1]
        rc = native.lib().xy_decoder_layers(ctypes.byref(m), self._layers, ctypes.byref(s))
        if rc:
            _raise_for(rc)
        return bufs[-1]


_LAUNCHES = ("the QKV projection", "the KV write", "the attention", "the O projection",
             "the gate/up projection", "the down projection")


def _raise_for(rc: int) -> None:
    launch, code = divmod(-rc, 100)
    what = f"decoder layers: {_LAUNCHES[launch - 1]}"
    if code == 1:
        raise MemoryError(f"{what}: no memory for its scratch")
    if code == 2:
        raise ValueError(f"{what}: a shape the C kernel does not take")
    raise IndexError(f"{what}: a slot or block outside the cache or a block table")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _fp32_vector(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous()


def _fp32_rows(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
