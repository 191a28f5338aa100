"""The CPU fast path's C kernels on a model's shapes, each against what it replaced.

One decode step's worth of each (every layer its own weights or cache blocks, so the data streams
from DRAM as in a real step): the panel GEMM vs oneDNN with packed weights for the layer products
at M rows; the paged decode attention of 16 sequences at a few context lengths; and a prefill
chunk's attention launch (npu_sim.kernels.run_attention) with the C kernels vs without them
(the ATen path: gather, SDPA with an explicit mask); and, where the CPU has AMX, the attention
on a bf16 cache in fp32 arithmetic vs on AMX tiles. Times are the best of repeated runs.

    .venv/bin/python -m benchmarks.cpu_kernels [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import transformers

from benchmarks.machine import best_seconds
from engine.arch import ModelArch
from engine.config import (
    DEFAULT_MODEL,
    DEFAULT_NPU,
)
from engine.lowering import ChunkShape, lower_attention
from engine.models.loader import resolve_model_path
from npu_sim.hardware import get_chip
from npu_sim.kernels import PackedWeight, native, pack_weight, run_attention

BLOCK = 16  # KV cache block size


def best_ms(fn: Callable[[], object]) -> float:
    return best_seconds(fn) * 1e3


def layer_shapes(a: ModelArch) -> list[tuple[int, int]]:
    """(N, K) of a layer's products: fused QKV, O, fused gate-up, down."""
    return [((a.num_heads + 2 * a.num_kv_heads) * a.head_dim, a.hidden_size),
            (a.hidden_size, a.num_heads * a.head_dim), (2 * a.intermediate_size, a.hidden_size),
            (a.hidden_size, a.intermediate_size)]


def gemms(a: ModelArch, m: int) -> None:
    shapes = layer_shapes(a)
    weights = [[torch.randn(n, k) for n, k in shapes] for _ in range(a.num_layers)]
    xs = [torch.randn(m, k) for _, k in shapes]
    panels = [[native.pack_panels(w) for w in layer] for layer in weights]
    packed = [[pack_weight(w) for w in layer] for layer in weights]
    flops = 2 * m * a.num_layers * sum(n * k for n, k in shapes)

    def run_panels() -> None:
        for layer in panels:
            for x, p in zip(xs, layer, strict=True):
                native.gemm(x, p, None)

    def run_onednn() -> None:
        for layer in packed:
            for x, p in zip(xs, layer, strict=True):
                assert isinstance(p, PackedWeight) and p.packed is not None
                torch.ops.mkldnn._linear_pointwise(x, p.packed, None, "none", [], "")

    runs = {"panel GEMM": run_panels}
    if all(isinstance(p, PackedWeight) and p.packed is not None for p in packed[0]):
        runs["oneDNN packed"] = run_onednn
    for name, fn in runs.items():
        ms = best_ms(fn)
        print(f"  M={m:3d} {name:14s} {ms:7.2f} ms  {flops / ms / 1e6:6.1f} GFLOP/s")


def decode_attention(a: ModelArch, context_len: int, num_seqs: int = 16) -> None:
    hkv, d = a.num_kv_heads, a.head_dim
    blocks = -(-context_len // BLOCK)
    pool = num_seqs * blocks * a.num_layers
    k_cache, v_cache = torch.randn(pool, BLOCK, hkv, d), torch.randn(pool, BLOCK, hkv, d)
    order = torch.randperm(pool)  # scattered blocks, a different run of them per layer
    tables = [order[i * num_seqs * blocks:(i + 1) * num_seqs * blocks].view(num_seqs, blocks)
              .contiguous() for i in range(a.num_layers)]
    q, rows = torch.randn(num_seqs, a.num_heads, d), torch.arange(num_seqs)
    out, ctx = torch.empty_like(q), torch.full((num_seqs,), context_len)

    def run() -> None:
        for table in tables:
            native.decode_attention(q, k_cache, v_cache, table, ctx, rows, out, d**-0.5)

    ms = best_ms(run)
    gb = 2 * num_seqs * context_len * hkv * d * 4 * a.num_layers / 1e9
    print(f"  {num_seqs} x {context_len:4d} keys  {ms:7.2f} ms  {gb / ms * 1e3:5.1f} GB/s of K/V")


def chunk_attention(a: ModelArch, start_pos: int, q_len: int) -> None:
    blocks = -(-(start_pos + q_len) // BLOCK)
    k_cache = torch.randn(blocks, BLOCK, a.num_kv_heads, a.head_dim)
    v_cache = torch.randn_like(k_cache)
    chunk = ChunkShape(start_pos, q_len, tuple(torch.randperm(blocks).tolist()))
    kernel = lower_attention([chunk], a, get_chip(DEFAULT_NPU), BLOCK)
    q = torch.randn(q_len, a.num_heads, a.head_dim)

    def launch() -> None:
        run_attention(kernel, False, q, k_cache, v_cache)

    with native.disabled():
        before = best_ms(launch)
    after = best_ms(launch)
    print(f"  keys {start_pos:4d} + chunk {q_len:4d}: ATen (SDPA + mask) {before:6.2f} ms, "
          f"C {after:6.2f} ms ({before / after:.2f}x), one layer")


def bf16_attention(a: ModelArch, num_seqs: int, context_len: int, q_len: int) -> None:
    """On a bf16 cache, the C attention in fp32 arithmetic vs on AMX tiles (bf16_matmul): one
    step's decodes of num_seqs sequences (q_len 1) or one prefill chunk of q_len rows after
    context_len - q_len keys, every layer its own cache blocks."""
    hkv, d = a.num_kv_heads, a.head_dim
    blocks = -(-context_len // BLOCK)
    pool = num_seqs * blocks * a.num_layers
    k_cache = torch.randn(pool, BLOCK, hkv, d).bfloat16()
    v_cache = torch.randn(pool, BLOCK, hkv, d).bfloat16()
    order = torch.randperm(pool)
    tables = [order[i * num_seqs * blocks:(i + 1) * num_seqs * blocks].view(num_seqs, blocks)
              .contiguous() for i in range(a.num_layers)]
    q = torch.randn(num_seqs * q_len, a.num_heads, d)
    out, scale = torch.empty_like(q), d**-0.5
    rows, ctx = torch.arange(num_seqs), torch.full((num_seqs,), context_len)

    def run(tiles: bool) -> None:
        for table in tables:
            if q_len == 1:
                native.decode_attention(q, k_cache, v_cache, table, ctx, rows, out, scale, tiles)
            else:
                native.chunk_attention(q, k_cache, v_cache, table[0], context_len - q_len,
                                       slice(0, q_len), out, scale, tiles)

    fp32, amx = best_ms(lambda: run(False)), best_ms(lambda: run(True))
    what = (f"{num_seqs} decodes x {context_len:4d} keys" if q_len == 1 else
            f"chunk of {q_len:4d} after {context_len - q_len:4d} keys")
    print(f"  {what}: fp32 arithmetic {fp32:6.2f} ms, AMX tiles {amx:6.2f} ms "
          f"({fp32 / amx:.2f}x), {a.num_layers} layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="preset or local HF directory")
    args = parser.parse_args()
    if native.lib() is None:
        sys.exit("the C kernels cannot be built here")
    config = transformers.AutoConfig.from_pretrained(resolve_model_path(args.model))
    arch = ModelArch.from_hf_config(config)
    print(f"{args.model}: {arch.num_layers} layers per step; torch threads "
          f"{torch.get_num_threads()}")
    print("layer GEMMs of one step:")
    for m in (1, 16, 64):
        gemms(arch, m)
    print("decode attention of one step:")
    for context_len in (80, 300, 1000):
        decode_attention(arch, context_len)
    print("prefill-chunk attention:")
    for start_pos, q_len in ((0, 150), (0, 256), (0, 1000), (768, 256)):
        chunk_attention(arch, start_pos, q_len)
    if not native.amx_granted():
        print("no AMX tiles here: the bf16 attention runs in fp32 arithmetic")
        return
    print("attention on a bf16 cache, fp32 arithmetic vs AMX tiles:")
    for num_seqs, context_len in ((1, 100), (16, 80), (16, 300), (16, 1000)):
        bf16_attention(arch, num_seqs, context_len, 1)
    for context_len, q_len in ((150, 150), (1000, 1000), (1024, 256)):
        bf16_attention(arch, 1, context_len, q_len)


if __name__ == "__main__":
    main()
