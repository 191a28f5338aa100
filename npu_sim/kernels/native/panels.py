"""The panel GEMM (gemm.c) from Python: a weight w (N, K) packed once into 16-column panels in
one of FORMATS, then products of fp32 rows x (M, K) against it, fp32 out.

Formats (layouts in gemm_formats.h), all with fp32 activations and fp32 accumulation:
  fp32  as given; the products of up to GEMM_MAX_ROWS rows (beyond, oneDNN is faster)
  bf16  w rounded to bf16 by torch (half the bytes); any M. Where the library has AVX512_BF16
        and the caller allows `bf16_activations`, x is rounded to bf16 too (vdpbf16ps)
  q4_1  GGUF Q4_1 blocks as the default model ships them (~0.63 bytes a weight); any M
  q8_0  GGUF Q8_0 blocks (~1.06 bytes a weight; the default model's embedding / LM head); any M
The quantized formats are weight-only: decoded to fp32 in registers, the same floats gguf's
dequantize gives, so a product differs from one on the dequantized fp32 weight by
accumulation order alone. On AMX, q4_1 / q8_0 panels can also be read as the bf16 panels of the
same weights (`as_bf16`: each decoded weight rounded to bf16 as torch rounds, x in bf16): the
bf16 panels' products bit for bit, from a third or half of the bytes. Their blocks come from
npu_sim.kernels.quant (GGUF tensors, or an fp32 weight that is exactly representable).
"""

from __future__ import annotations

import numpy as np
import torch

from npu_sim.kernels.native import amx_granted, lib

FORMATS = {"fp32": 0, "bf16": 1, "q4_1": 2, "q8_0": 3}  # gemm_formats.h's XY_* codes
# q4_1 / q8_0 blocks read as the bf16 panels of the same weights (AMX alone: as_bf16)
BLOCKS_AS_BF16 = {"q4_1": ("q4_1_bf16", 4), "q8_0": ("q8_0_bf16", 5)}
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # GGUF bytes per block of QUANT_BLOCK weights along K
QUANT_BLOCK = 32
PANEL_COLS = 16  # gemm.c's panel width
GEMM_MAX_ROWS = 64  # fp32 panels serve products of up to this many rows (decode batches)
_BF16_ACTIVATIONS = 1  # xy_gemm_packed's flag (gemm_bf16_dot.h)


class Panels:
    """A weight (N, K) packed for `gemm` in format `fmt`: ceil(N / 16) panels, 64-byte aligned
    (`data`, uint8, keeps the storage alive)."""

    def __init__(self, n: int, k: int, fmt: str) -> None:
        native = lib()
        assert native is not None and fmt in FORMATS
        self.n, self.k, self.fmt = n, k, fmt
        size = native.xy_packed_bytes(FORMATS[fmt], n, k)
        storage = torch.empty(size + 64, dtype=torch.uint8)
        offset = -storage.data_ptr() % 64  # first 64-byte boundary
        self.data = storage[offset:offset + size]
        self.code, self.ptr = FORMATS[fmt], self.data.data_ptr()  # what each call passes

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def pack_panels(w: torch.Tensor, fmt: str = "fp32") -> Panels | None:
    """A float weight w (N, K) packed for `gemm` as fp32 or bf16 (rounded by torch: to nearest,
    ties to even); None where the C kernels are off, w is not a 2-D fp32 / bf16 / fp16 tensor,
    or fmt is another."""
    if (lib() is None or fmt not in ("fp32", "bf16") or w.dim() != 2
            or w.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or (fmt == "fp32" and w.dtype != torch.float32)):
        return None
    n, k = w.shape
    panels = Panels(n, k, fmt)
    if fmt == "fp32":
        lib().xy_pack_panels(w.contiguous().data_ptr(), n, k, panels.data.data_ptr())
    else:
        bits = w.to(torch.bfloat16).contiguous()
        lib().xy_pack_panels_bf16(bits.data_ptr(), n, k, panels.data.data_ptr())
    return panels


def pack_blocks(blocks: np.ndarray | torch.Tensor, n: int, k: int, fmt: str) -> Panels | None:
    """GGUF blocks of a weight (N, K), `blocks` (N, K / 32 * BLOCK_BYTES[fmt]) uint8 as a GGUF
    file stores them (row n = output n), packed for `gemm`; None where the C kernels are off,
    fmt is not q4_1 / q8_0 or K is not a multiple of 32. Other shapes raise ValueError."""
    if lib() is None or fmt not in BLOCK_BYTES or k % QUANT_BLOCK:
        return None
    raw = blocks.numpy() if isinstance(blocks, torch.Tensor) else blocks
    raw = np.ascontiguousarray(raw)  # (a GGUF file's read-only memory map: read in place)
    if raw.dtype != np.uint8 or raw.shape != (n, k // QUANT_BLOCK * BLOCK_BYTES[fmt]):
        raise ValueError(f"pack_blocks: {fmt} blocks of a ({n}, {k}) weight are "
                         f"({n}, {k // QUANT_BLOCK * BLOCK_BYTES[fmt]}) uint8, not "
                         f"{raw.shape} {raw.dtype}")
    panels = Panels(n, k, fmt)
    pack = lib().xy_pack_q4_1 if fmt == "q4_1" else lib().xy_pack_q8_0
    pack(raw.ctypes.data, n, k, panels.data.data_ptr())
    return panels


def as_bf16(blocks: Panels) -> Panels | None:
    """q4_1 / q8_0 panels read as the bf16 panels of the same weights hold them (each decoded
    weight rounded to the nearest bf16, even on ties, as torch rounds; x rounded to bf16 too):
    a `gemm` bit for bit the bf16 panels' on AMX tiles, reading a third (q4_1) or half (q8_0)
    of the bytes. The same storage; None where AMX is not granted or the format is another."""
    if blocks.fmt not in BLOCKS_AS_BF16 or not amx_granted():
        return None
    view = Panels.__new__(Panels)
    view.__dict__.update(blocks.__dict__)
    view.fmt, view.code = BLOCKS_AS_BF16[blocks.fmt]
    return view


def gemm(x: torch.Tensor, w: Panels, bias: torch.Tensor | None,
         bf16_activations: bool = True, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (M, K) @ w^T (+ bias (N,)) into out (M, N) fp32 (a new tensor when None), on torch's
    intra-op thread count; None where not handled (C kernels off, x not 2-D fp32 rows of K,
    bias not fp32 (N,), out not fp32 (M, N) rows, an fp32 w with more than GEMM_MAX_ROWS rows).
    bf16_activations=False keeps x in fp32 for bf16 panels on every CPU (else AVX512_BF16 CPUs
    round it to bf16). (Few torch calls: at M = 1 the Python side is most of a small product.)"""
    native = lib()
    if native is None or x.dtype != torch.float32 or x.dim() != 2:
        return None
    (m, k), (xs, x1) = x.shape, x.stride()
    if (x1 != 1 or k != w.k or m < 1 or (w.fmt == "fp32" and m > GEMM_MAX_ROWS)
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                                      or bias.shape != (w.n,)))):
        return None
    if out is None:
        out = torch.empty(m, w.n)
    elif out.dtype != torch.float32 or out.shape != (m, w.n) or out.stride(1) != 1:
        return None
    rc = native.xy_gemm_packed(w.code, x.data_ptr(), xs, w.ptr,
                               None if bias is None else bias.data_ptr(), w.n, k,
                               out.data_ptr(), out.stride(0), m, torch.get_num_threads(),
                               _BF16_ACTIVATIONS if bf16_activations else 0)
    if rc == -1:
        raise MemoryError("gemm: no memory for the bf16 activations")
    if rc != 0:
        raise ValueError(f"gemm: gemm.c refused a {w.fmt} weight ({w.n}, {w.k})")
    return out


def gather_rows(w: Panels, ids: torch.Tensor) -> torch.Tensor | None:
    """Rows ids (T,) of the packed weight as fp32 (T, K) (an embedding lookup in a table the
    LM head shares); None where the C kernels are off or ids is not int64. An id outside
    [0, N) raises IndexError."""
    native = lib()
    if native is None or ids.dtype != torch.int64 or ids.dim() != 1:
        return None
    ids = ids.contiguous()
    out = torch.empty(len(ids), w.k)
    if native.xy_gather_rows(w.code, w.ptr, w.n, w.k, ids.data_ptr(),
                             len(ids), out.data_ptr(), w.k) != 0:
        raise IndexError("gather_rows: an id outside the table")
    return out
