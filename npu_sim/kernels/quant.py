"""Quantized weights kept as a GGUF file ships them (weight-only Q4_1 / Q8_0 blocks), for the
panel GEMM's quantized formats (npu_sim.kernels.native.panels).

A block is 32 consecutive weights of one row (one output) along K:
  Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes of 4-bit q (weight i < 16 in the low nibble of byte
        i, weight 16 + i in its high nibble); w = d * q + m
  Q8_0  34 bytes: fp16 d, 32 int8 q; w = d * q
`QuantizedWeight.dequantize` is gguf's dequantize, the fp32 weights transformers' GGUF loader
builds (and the engine's fp32 model holds), so the kernels are checked against exactly those.

Where the blocks come from: a GGUF file (`from_gguf`: the `gguf` package's reader, with
llama.cpp's reordering of the Q and K projection rows undone by `unpermute_rows`), or an fp32
weight that some Q4_1 / Q8_0 blocks reproduce exactly (`quantize_exact`, e.g. a dequantized
GGUF weight), or any fp32 weight, lossily (`quantize`, gguf's quantizer; for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, ReaderTensor, dequantize
from gguf import quantize as gguf_quantize

BLOCK = 32  # weights per block along K
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
_QTYPES = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}
_FLOAT_QTYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass(frozen=True)
class QuantizedWeight:
    fmt: str  # "q4_1" | "q8_0"
    shape: tuple[int, int]  # (N, K): N outputs, K inputs (a multiple of BLOCK)
    blocks: np.ndarray  # (N, K / BLOCK * BLOCK_BYTES[fmt]) uint8: row n's blocks, in order

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.fmt not in BLOCK_BYTES or k % BLOCK:
            raise ValueError(f"{self.fmt} weight {self.shape}: K must be a multiple of {BLOCK}")
        if self.blocks.dtype != np.uint8 or self.blocks.shape != (n, k // BLOCK
                                                                  * BLOCK_BYTES[self.fmt]):
            raise ValueError(f"{self.fmt} blocks of {self.shape}: got {self.blocks.shape} "
                             f"{self.blocks.dtype}")

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (N, K), as gguf (and transformers' GGUF loader) dequantizes it."""
        return torch.from_numpy(dequantize(self.blocks, _QTYPES[self.fmt]).reshape(self.shape))

    def take_rows(self, rows: np.ndarray) -> QuantizedWeight:
        """The weight with its rows (outputs) in the order `rows` (blocks never span rows)."""
        return QuantizedWeight(self.fmt, (len(rows), self.shape[1]),
                               np.ascontiguousarray(self.blocks[rows]))

    @staticmethod
    def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The outputs of several weights of one format and K in one (a fused QKV or gate-up
        projection), in order."""
        fmt, k = parts[0].fmt, parts[0].shape[1]
        if any(p.fmt != fmt or p.shape[1] != k for p in parts):
            raise ValueError("stack: weights of one format and K only")
        blocks = np.concatenate([p.blocks for p in parts])
        return QuantizedWeight(fmt, (len(blocks), k), blocks)


def unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's conversion permutation of a Llama attn_q (heads =
    query heads) or attn_k (heads = KV heads) weight: weight_hf = weight_gguf[rows]. As
    transformers' LlamaTensorProcessor._reverse_permute_weights, on row indices."""
    half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(-1)


def from_gguf(tensor: ReaderTensor) -> QuantizedWeight | torch.Tensor:
    """A GGUF tensor (gguf.GGUFReader().tensors[i]): a Q4_1 / Q8_0 matrix as a
    QuantizedWeight (N, K), N its second GGUF dimension; an F32 / F16 / BF16 one as an fp32
    torch tensor (dimensions in torch order). Other types raise ValueError. The Q / K
    projections of a Llama file still need `take_rows(unpermute_rows(...))`."""
    dims = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest first
    if tensor.tensor_type in _FLOAT_QTYPES:
        return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).reshape(dims).copy())
    fmt = {q: f for f, q in _QTYPES.items()}.get(tensor.tensor_type)
    if fmt is None or len(dims) != 2:
        raise ValueError(f"{tensor.name}: GGUF {tensor.tensor_type.name} {dims} is not supported")
    return QuantizedWeight(fmt, dims, np.asarray(tensor.data).reshape(dims[0], -1))


def quantize(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Any fp32 weight (N, K) quantized to fmt by gguf's quantizer (lossy)."""
    n, k = w.shape
    blocks = gguf_quantize(w.float().contiguous().numpy(), _QTYPES[fmt])
    return QuantizedWeight(fmt, (n, k), blocks.reshape(n, -1))


def quantize_exact(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Blocks that dequantize to exactly w (N, K) fp32 (e.g. w a dequantized GGUF weight);
    ValueError where some block of 32 has no such encoding."""
    n, k = w.shape
    if k % BLOCK or w.dtype != torch.float32:
        raise ValueError(f"quantize_exact: fp32 (N, K) with K % {BLOCK} == 0, not {w.dtype} "
                         f"{tuple(w.shape)}")
    v = w.contiguous().view(-1, BLOCK)
    d, m, q = _fit_q4_1(v) if fmt == "q4_1" else _fit_q8_0(v)
    halves = torch.stack([d, m], 1) if m is not None else d[:, None]
    head = halves.to(torch.float16).view(torch.uint8)  # (B, 2 or 4) little-endian fp16
    if fmt == "q4_1":
        body = (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)
    else:
        body = q.to(torch.int8).view(torch.uint8)
    blocks = torch.cat([head, body], 1).reshape(n, -1)
    return QuantizedWeight(fmt, (n, k), blocks.numpy())


def _fit_q4_1(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, m, q) of blocks v (B, 32) with w = d * q + m exact, q in [0, 15]. The weights span
    d * (qmax - qmin): try spans 15, 14, .. 1 with qmin = 0, 1, .. for the blocks left."""
    lo, hi = v.min(1).values, v.max(1).values
    d, m = torch.zeros_like(lo), lo.clone()
    q = torch.zeros(v.shape, dtype=torch.int32)
    done = (hi == lo) & (lo.half().float() == lo)  # constant blocks: d = 0, m = the value
    for span in range(15, 0, -1):
        for qmin in range(0, 16 - span):
            left = (~done).nonzero().squeeze(1)
            if not len(left):
                return d, m, q
            dc = ((hi[left] - lo[left]) / span).half().float()
            mc = (lo[left] - dc * qmin).half().float()
            qc = torch.where(dc[:, None] > 0, ((v[left] - mc[:, None]) / dc[:, None]).round(),
                             torch.zeros(())).clamp(0, 15)
            ok = (dc[:, None] * qc + mc[:, None] == v[left]).all(1)
            d[left[ok]], m[left[ok]], q[left[ok]] = dc[ok], mc[ok], qc[ok].int()
            done[left[ok]] = True
    if not bool(done.all()):
        raise ValueError("quantize_exact: a block of 32 weights has no exact Q4_1 encoding")
    return d, m, q


def _fit_q8_0(v: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
    """(d, None, q) of blocks v (B, 32) with w = d * q exact, q in [-128, 127]: the largest
    magnitude is d * qa, qa = 127 first (gguf's choice), then smaller."""
    amax = v.abs().max(1).values
    d = torch.zeros_like(amax)
    q = torch.zeros(v.shape, dtype=torch.int32)
    done = amax == 0
    for qa in range(127, 0, -1):
        left = (~done).nonzero().squeeze(1)
        if not len(left):
            break
        dc = (amax[left] / qa).half().float()
        qc = (v[left] / dc[:, None]).round().clamp(-128, 127)
        ok = (dc[:, None] * qc == v[left]).all(1) & (dc > 0)
        d[left[ok]], q[left[ok]] = dc[ok], qc[ok].int()
        done[left[ok]] = True
    if not bool(done.all()):
        raise ValueError("quantize_exact: a block of 32 weights has no exact Q8_0 encoding")
    return d, None, q
