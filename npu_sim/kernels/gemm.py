"""GEMM primitive: `out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N])`.

The reference path executes the task table the way a cube core would: for each task it allocates
a full (tm, tn) fp32 accumulator (the on-chip tile), reads only the task's valid rows of x and
valid columns of w (selective read), accumulates over K in tk-deep steps, and stores only the
valid (m_rows, n_cols) corner (selective write). Masked rows and columns live in the accumulator
alone: no padded copy of x is ever made and nothing outside the M x N output is written.
A split-K task reduces over its K slice only and writes its fp32 corner into that slice's
workspace partial; the reduce tasks then sum the partials, element range by element range, in
slice order (catlass MultiCoreSplitkMatmul), into the output.
The fast path is one call over the whole batch. A weight may come pre-packed (`pack_weight`):
the fast path then multiplies products of few rows (a decode step's GEMMs have M = batch size)
with the C panel GEMM (npu_sim.kernels.native), and others with oneDNN's blocked copy of the
weight, which skips the per-call repacking of `w` that dominates small-M products in ATen; the
reference path always reads the plain weight.

Weight formats (`pack_weight(w, weight_format)`, `pack_quantized`), activations fp32 in all:
  fp32  panels for M <= 64, oneDNN beyond
  bf16  the weight rounded to bf16: half the bytes a decode step streams; panels for any M
  q4_1, q8_0  GGUF blocks kept as they ship (npu_sim.kernels.quant), decoded in the GEMM's
        registers: the same floats as the dequantized fp32 weight, a product differing from the
        fp32 one by accumulation order alone; panels for any M
The 16-bit and quantized formats need the C kernels; without them pack_weight returns the
weight as given (fp32, computed by ATen) and pack_quantized the dequantized fp32 weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_sim.kernels import native
from npu_sim.kernels.quant import QuantizedWeight, quantize_exact
from npu_sim.tasks import GemmKernel

WEIGHT_FORMATS = ("fp32", "bf16", "q4_1", "q8_0")
# Products of up to this many rows read a gguf+bf16 weight's blocks as its bf16 weights (AMX:
# PackedWeight.with_small): one pass of 32 rows decodes each block once; more rows would decode
# it again for every 32 (a prefill chunk reads the bf16 panels in place instead).
BLOCKS_AS_BF16_ROWS = 32


class PackedWeight:
    """A GEMM weight `w[N, K]` plus its copies laid out for the fast path."""

    def __init__(self, weight: torch.Tensor | None, packed: torch.Tensor | None,
                 panels: native.Panels | None = None,
                 quantized: QuantizedWeight | None = None) -> None:
        self._weight = weight  # (N, K) plain (fp32, or bf16 for that format); None: quantized
        self.packed = packed  # opaque mkldnn tensor holding the same values, pre-blocked, or None
        self.panels = panels  # the C panel GEMM's copy (its `fmt` the weight format), or None
        self.quantized = quantized  # a q4_1 / q8_0 weight's GGUF blocks, else None
        # The same weight in panels of another format for products of at most `small_rows`
        # rows (`with_small`), else None (and 0 rows)
        self.small: native.Panels | None = None
        self.small_rows = 0
        # ... and those of more rows, up to `mid_rows`, by `small`'s blocks read as this
        # weight's bf16 panels (the same products: native.as_bf16), else None (and 0 rows)
        self.mid: native.Panels | None = None
        self.mid_rows = 0
        if quantized is not None:
            self._shape, self._format = torch.Size(quantized.shape), quantized.fmt
        else:
            assert weight is not None
            self._shape = weight.shape
            self._format = "bf16" if weight.dtype == torch.bfloat16 else "fp32"

    @property
    def weight(self) -> torch.Tensor:
        """(N, K) plain: what the reference path and the ATen fallback read; a quantized
        weight is dequantized to fp32 on every read (the fast path never reads it)."""
        if self._weight is not None:
            return self._weight
        if self.quantized is None:
            raise RuntimeError(f"this {self._format} weight {tuple(self._shape)} kept only its "
                               "fast-path copies (without_plain): no plain weight to read")
        return self.quantized.dequantize()

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def weight_format(self) -> str:
        return self._format

    def without_plain(self, activations: torch.dtype) -> PackedWeight:
        """This weight without the copies only the reference path and the ATen fallback read
        (the plain weight, a quantized weight's GGUF blocks), where the fast path serves every
        product of `activations` from its own copies: oneDNN's blocked one, or panels taking any
        number of rows (the C kernels take fp32 activations only). Else itself. A server never
        reads the dropped copy; dropping it saves a third (fp32) or half (bf16, gguf) of the
        GEMM weights' memory."""
        covered = activations == torch.float32 and (
            self.packed is not None or (self.panels is not None and self.panels.fmt != "fp32"))
        if not covered or (self._weight is None and self.quantized is None):
            return self
        lean = PackedWeight.__new__(PackedWeight)
        lean.__dict__.update(self.__dict__, _weight=None, quantized=None)
        return lean

    def panels_for(self, rows: int) -> native.Panels | None:
        """The panels a product of `rows` rows reads (replay.py hands the same rule to the C
        decoder: decoder.c's pick)."""
        if rows <= self.small_rows:
            return self.small
        return self.mid if rows <= self.mid_rows else self.panels

    def with_small(self, small: PackedWeight, rows: int,
                   rounded_from_small: bool = False) -> PackedWeight:
        """This weight, products of at most `rows` rows taken by `small`'s panels (the same
        weight in another format: a lone stream's steps read fewer bytes of 4-bit blocks than
        of bf16), larger ones by this weight's copies. rounded_from_small: this weight is bf16
        and its values are `small`'s blocks decoded and rounded (the blocks are the source):
        where AMX reads blocks as those bf16 weights (native.as_bf16), products of up to
        BLOCKS_AS_BF16_ROWS rows read the blocks too, the same sums from fewer bytes."""
        assert small.panels is not None and small.shape == self.shape
        both = PackedWeight.__new__(PackedWeight)
        both.__dict__.update(self.__dict__, small=small.panels, small_rows=rows)
        if rounded_from_small and self.panels is not None and self.panels.fmt == "bf16":
            both.mid = native.as_bf16(small.panels)
            both.mid_rows = BLOCKS_AS_BF16_ROWS if both.mid is not None else 0
        return both


def pack_weight(w: torch.Tensor, weight_format: str = "fp32") -> PackedWeight | torch.Tensor:
    """`w` (N, K) pre-packed for the fast path in `weight_format` (WEIGHT_FORMATS; q4_1 and
    q8_0 need a w that some blocks reproduce exactly, else ValueError: see quant), or `w`
    itself where neither oneDNN nor the C kernels can take it (no oneDNN in this torch build, a
    dtype the CPU lacks kernels for, a 16-bit or quantized format without the C kernels)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r}: not one of {WEIGHT_FORMATS}")
    if w.dim() != 2:
        return w
    if weight_format in ("q4_1", "q8_0"):
        packed_q = pack_quantized(quantize_exact(w.float(), weight_format))
        return packed_q if isinstance(packed_q, PackedWeight) else w
    if weight_format == "bf16":
        panels = native.pack_panels(w, "bf16")
        return w if panels is None else PackedWeight(w.to(torch.bfloat16), None, panels)
    packed = None
    if torch.backends.mkldnn.is_available():
        try:
            # The batch-size argument is a layout hint; the packed weight serves any M.
            packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 16)
        except (RuntimeError, AttributeError):
            packed = None
    panels = native.pack_panels(w)
    return w if packed is None and panels is None else PackedWeight(w, packed, panels)


def pack_quantized(q: QuantizedWeight) -> PackedWeight | torch.Tensor:
    """GGUF blocks packed for the panel GEMM (keeping only them), or the dequantized fp32
    weight where the C kernels are off."""
    panels = native.pack_blocks(q.blocks, *q.shape, q.fmt)
    return q.dequantize() if panels is None else PackedWeight(None, None, panels, q)


def run_gemm(kernel: GemmKernel, strict: bool, x: torch.Tensor, w: torch.Tensor | PackedWeight,
             bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Execute a GEMM kernel. x: (M, K), w: (N, K) (plain or `pack_weight`ed), bias: (N,) or
    None, out: (M, N) or None."""
    assert x.shape == (kernel.m, kernel.k) and w.shape == (kernel.n, kernel.k), (
        f"{kernel.name}: x {tuple(x.shape)} w {tuple(w.shape)} vs m={kernel.m} n={kernel.n} "
        f"k={kernel.k}")
    if not strict:
        if not isinstance(w, PackedWeight):
            result = F.linear(x, w, bias)
        else:  # the panel GEMM where it takes x, else oneDNN, else ATen on the plain weight
            panels = w.panels_for(kernel.m)
            result = None if panels is None else native.gemm(x, panels, bias, out=out)
            if result is not None:
                return result
            if w.packed is not None:
                result = torch.ops.mkldnn._linear_pointwise(x, w.packed, bias, "none", [], "")
            else:
                plain = w.weight
                result = F.linear(x, plain if plain.dtype == x.dtype else plain.to(x.dtype),
                                  bias)
        return result if out is None else out.copy_(result)
    if isinstance(w, PackedWeight):
        w = w.weight
    if out is None:
        out = x.new_empty(kernel.m, kernel.n)
    # split-K workspace: one fp32 (M, N) partial per K slice (GM, mostly L2-resident)
    ws = x.new_zeros(kernel.split_k, kernel.m, kernel.n, dtype=torch.float32) if (
        kernel.split_k > 1) else None
    for m_start, m_rows, n_start, n_cols, tile, k_start, k_len, split in kernel.tasks.tolist():
        shape = kernel.menu[tile]
        acc = torch.zeros(shape.tm, shape.tn, dtype=torch.float32)  # the L0C tile
        x_rows = x[m_start:m_start + m_rows]  # selective read: valid rows only
        w_cols = w[n_start:n_start + n_cols]
        for k0 in range(k_start, k_start + k_len, shape.tk):
            k1 = min(k0 + shape.tk, k_start + k_len)
            acc[:m_rows, :n_cols] += x_rows[:, k0:k1].float() @ w_cols[:, k0:k1].float().T
        if bias is not None and split <= 0:  # the first K slice carries the bias
            acc[:m_rows, :n_cols] += bias[n_start:n_start + n_cols].float()
        # selective write: only the valid corner leaves the tile
        if split < 0:
            out[m_start:m_start + m_rows, n_start:n_start + n_cols] = acc[:m_rows, :n_cols]
        else:
            assert ws is not None
            ws[split, m_start:m_start + m_rows, n_start:n_start + n_cols] = acc[:m_rows, :n_cols]
    if ws is not None and kernel.reduce_tasks is not None:
        flat_ws, flat_out = ws.view(kernel.split_k, -1), out.view(-1)
        for elem_start, num_elems in kernel.reduce_tasks.tolist():
            part = slice(elem_start, elem_start + num_elems)
            total = flat_ws[0, part].clone()
            for s in range(1, kernel.split_k):  # in slice order: deterministic, as catlass
                total += flat_ws[s, part]
            flat_out[part] = total.to(out.dtype)
    return out
