"""GEMM primitive: `out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N])`.

The reference path executes the task table the way a cube core would: for each task it allocates
a full (tm, tn) fp32 accumulator (the on-chip tile), reads only the task's valid rows of x and
valid columns of w (selective read), accumulates over K in tk-deep steps, and stores only the
valid (m_rows, n_cols) corner (selective write). Masked rows and columns live in the accumulator
alone: no padded copy of x is ever made and nothing outside the M x N output is written.
The fast path is one torch call over the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_sim.tasks import GemmKernel


def run_gemm(kernel: GemmKernel, strict: bool, x: torch.Tensor, w: torch.Tensor,
             bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Execute a GEMM kernel. x: (M, K), w: (N, K), bias: (N,) or None, out: (M, N) or None."""
    assert x.shape == (kernel.m, kernel.k) and w.shape == (kernel.n, kernel.k), (
        f"{kernel.name}: x {tuple(x.shape)} w {tuple(w.shape)} vs m={kernel.m} n={kernel.n} "
        f"k={kernel.k}")
    if not strict:
        result = F.linear(x, w, bias)
        return result if out is None else out.copy_(result)
    if out is None:
        out = x.new_empty(kernel.m, kernel.n)
    for m_start, m_rows, n_start, n_cols, tile in kernel.tasks.tolist():
        shape = kernel.menu[tile]
        acc = torch.zeros(shape.tm, shape.tn, dtype=torch.float32)  # the L0C tile
        x_rows = x[m_start:m_start + m_rows]  # selective read: valid rows only
        w_cols = w[n_start:n_start + n_cols]
        for k_start in range(0, kernel.k, shape.tk):
            k_end = min(k_start + shape.tk, kernel.k)
            acc[:m_rows, :n_cols] += (x_rows[:, k_start:k_end].float()
                                      @ w_cols[:, k_start:k_end].float().T)
        if bias is not None:
            acc[:m_rows, :n_cols] += bias[n_start:n_start + n_cols].float()
        # selective write: only the valid corner leaves the tile
        out[m_start:m_start + m_rows, n_start:n_start + n_cols] = acc[:m_rows, :n_cols]
    return out
