"""The CPU fast path's C kernels on the default model's shapes, each against what it replaced.

One decode step's worth of each kernel (30 layers, every layer its own weights or cache blocks,
so the data streams from DRAM as in a real step): the panel GEMM vs oneDNN with packed weights
for the layer products at M rows; the paged decode attention of 16 sequences at a few context
lengths; and the prefill-chunk attention vs the SDPA with an explicit mask it replaced. Times
are the best of several runs (other tenants' load only slows).

    .venv/bin/python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npu_sim.kernels import PackedWeight, native, pack_weight  # noqa: E402

NUM_LAYERS, HIDDEN, INTER = 30, 576, 1536  # SmolLM2-135M
HQ, HKV, D, BLOCK = 9, 3, 64, 16
LAYER_SHAPES = ((HQ + 2 * HKV) * D, HIDDEN), (HIDDEN, HQ * D), (2 * INTER, HIDDEN), (HIDDEN, INTER)


def best_ms(fn: Callable[[], object], repeats: int = 8) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def gemms(m: int) -> None:
    weights = [[torch.randn(n, k) for n, k in LAYER_SHAPES] for _ in range(NUM_LAYERS)]
    xs = [torch.randn(m, k) for _, k in LAYER_SHAPES]
    panels = [[native.pack_panels(w) for w in layer] for layer in weights]
    packed = [[pack_weight(w) for w in layer] for layer in weights]
    flops = 2 * m * NUM_LAYERS * sum(n * k for n, k in LAYER_SHAPES)

    def run_panels() -> None:
        for layer in panels:
            for x, p in zip(xs, layer, strict=True):
                native.gemm(x, p, None)

    def run_onednn() -> None:
        for layer in packed:
            for x, p in zip(xs, layer, strict=True):
                assert isinstance(p, PackedWeight)
                torch.ops.mkldnn._linear_pointwise(x, p.packed, None, "none", [], "")

    runs = {"panel GEMM": run_panels}
    if all(isinstance(p, PackedWeight) for p in packed[0]):
        runs["oneDNN packed"] = run_onednn
    for name, fn in runs.items():
        ms = best_ms(fn)
        print(f"  M={m:3d} {name:14s} {ms:7.2f} ms  {flops / ms / 1e6:6.1f} GFLOP/s")


def decode_attention(context_len: int, num_seqs: int = 16) -> None:
    blocks = -(-context_len // BLOCK)
    pool = num_seqs * blocks * NUM_LAYERS
    k_cache, v_cache = torch.randn(pool, BLOCK, HKV, D), torch.randn(pool, BLOCK, HKV, D)
    order = torch.randperm(pool)  # scattered blocks, a different run of them per layer
    tables = [order[i * num_seqs * blocks:(i + 1) * num_seqs * blocks].view(num_seqs, blocks)
              .contiguous() for i in range(NUM_LAYERS)]
    q, rows = torch.randn(num_seqs, HQ, D), torch.arange(num_seqs)
    out, ctx = torch.empty_like(q), torch.full((num_seqs,), context_len)

    def run() -> None:
        for table in tables:
            native.decode_attention(q, k_cache, v_cache, table, ctx, rows, out, D**-0.5)

    ms = best_ms(run)
    gb = 2 * num_seqs * context_len * HKV * D * 4 * NUM_LAYERS / 1e9
    print(f"  {num_seqs} x {context_len:4d} keys  {ms:7.2f} ms  {gb / ms * 1e3:5.1f} GB/s of K/V")


def chunk_attention(start_pos: int, q_len: int) -> None:
    context_len, g = start_pos + q_len, HQ // HKV
    blocks = -(-context_len // BLOCK)
    k_cache, v_cache = torch.randn(blocks, BLOCK, HKV, D), torch.randn(blocks, BLOCK, HKV, D)
    table = torch.randperm(blocks)
    q, out = torch.randn(q_len, HQ, D), torch.empty(q_len, HQ, D)
    pos = torch.arange(context_len)
    slots = table[pos // BLOCK] * BLOCK + pos % BLOCK
    mask = (pos[None, :] <= start_pos + torch.arange(q_len)[:, None]).repeat_interleave(g, 0)
    k_flat, v_flat = k_cache.view(-1, HKV, D), v_cache.view(-1, HKV, D)

    def sdpa() -> torch.Tensor:  # the ATen path: gather, stack the GQA heads, masked SDPA
        k = k_flat.index_select(0, slots).transpose(0, 1)[None]
        v = v_flat.index_select(0, slots).transpose(0, 1)[None]
        stacked = q.view(q_len, HKV, g, D).transpose(0, 1).reshape(1, HKV, q_len * g, D)
        return F.scaled_dot_product_attention(stacked, k, v, attn_mask=mask, scale=D**-0.5)

    def c_kernel() -> None:
        native.chunk_attention(q, k_cache, v_cache, table, start_pos, slice(0, q_len), out,
                               D**-0.5)

    before, after = best_ms(sdpa, 4), best_ms(c_kernel, 4)
    print(f"  keys {start_pos:4d} + chunk {q_len:4d}: SDPA + mask {before:6.2f} ms, "
          f"C {after:6.2f} ms ({before / after:.2f}x), one layer")


def main() -> None:
    if native.lib() is None:
        sys.exit("the C kernels cannot be built here")
    print(f"torch threads {torch.get_num_threads()}; {NUM_LAYERS} layers per step")
    print("layer GEMMs of one step:")
    for m in (1, 16, 64):
        gemms(m)
    print("decode attention of one step:")
    for context_len in (80, 300, 1000):
        decode_attention(context_len)
    print("prefill-chunk attention:")
    for start_pos, q_len in ((0, 150), (0, 256), (0, 1000), (768, 256)):
        chunk_attention(start_pos, q_len)


if __name__ == "__main__":
    main()
