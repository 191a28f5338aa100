"""The attention sweeps of `xyserve kernels` (benchmarks.kernels.sweeps): the meta-kernel vs the
split prefill / decode kernels on skewed batches of every row kind, and the paper's verify sweep
(XYS 7.2.4: Llama-2-7B, token trees of batch 4 x specLen 31 and batch 8 x specLen 15 over context
lengths; the meta-kernel's verify tiles and tree masks in one launch vs the split baseline's
full-mask prefill-style kernel). Timing only, through engine.lowering.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.kernels.harness import fake_chunks
from engine.arch_presets import get_arch
from engine.lowering import ChunkShape, lower_attention, lower_attention_split
from npu_sim.device import Device
from npu_sim.trace import KernelTiming

ATTENTION_MODELS = ("llama-2-7b", "qwen2.5-7b")
BLOCK_SIZE = 128
# The paper's verify shapes, (batch, specLen). specLen counts a request's draft tokens; its verify
# chunk adds the root (its last real token), 1 + specLen = 32 / 16 query rows, so both shapes
# verify 128 tokens per batch (XYS 5.1.2 calls the draft block the specLen x specLen mask).
VERIFY_SHAPES = ((4, 31), (8, 15))
VERIFY_MODEL = "llama-2-7b"
VERIFY_CONTEXTS = (512, 1024, 2048, 4096)  # cached tokens before each request's root
QUICK_VERIFY_CONTEXTS = (512, 4096)


def seconds(device: Device, kernels: Sequence[Any]) -> tuple[float, list[KernelTiming]]:
    """(total seconds, timings) of launching `kernels` (None entries skipped) back to back."""
    timings = [device.time(k) for k in kernels if k is not None]
    return sum(t.seconds for t in timings), timings


def _lengths(rng: np.random.Generator, n: int, median: float, lo: int, hi: int) -> list[int]:
    """Skewed (log-normal, sigma 1) lengths: most short, a few long."""
    return [int(x) for x in np.clip(rng.lognormal(math.log(median), 1.0, n), lo, hi)]


def attention_scenarios(quick: bool = False) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """(name, kind, [(start_pos, num_tokens), ...]) batches, seeded."""
    rng = np.random.default_rng(2412)
    out: list[tuple[str, str, list[tuple[int, int]]]] = []
    for bs in (8, 32) if quick else (8, 32, 64, 128):
        out.append((f"decode bs{bs}", "decode", [(c, 1) for c in _lengths(rng, bs, 600, 64, 4096)]))
    prompts = _lengths(rng, 6, 500, 32, 4096)
    out.append(("prefill 4k + 6 skewed", "prefill", [(0, 4096)] + [(0, p) for p in prompts]))
    if not quick:
        out.append(("prefill 8k", "prefill", [(0, 8192)]))
        out.append(("prefill 4k, 2k prefix + 2 short", "prefill",
                    [(2048, 2048), (0, 300), (0, 90)]))
        out.append(("prefill 8k, 4k prefix", "prefill", [(4096, 4096)]))
    dec = [(c, 1) for c in _lengths(rng, 63, 600, 64, 4096)]
    out.append(("mixed 8k prefill + 63 decodes", "mixed", [(0, 8192), *dec]))
    if not quick:
        dec = [(c, 1) for c in _lengths(rng, 64, 600, 64, 4096)]
        out.append(("mixed chunk 4032@8k + 64 decodes", "mixed", [(8192, 4032), *dec]))
        dec = [(c, 1) for c in _lengths(rng, 32, 1500, 64, 8192)]
        out.append(("mixed chunk 2048@0 + 32 decodes", "mixed", [(0, 2048), *dec]))
        out.append(("verify bs4 spec31", "verify",
                    [(c, 32) for c in _lengths(rng, 4, 1000, 64, 4096)]))
        out.append(("verify bs8 spec15", "verify",
                    [(c, 16) for c in _lengths(rng, 8, 1000, 64, 4096)]))
    return out


def binary_tree(num_nodes: int) -> tuple[int, ...]:
    """Parents of a complete binary draft tree in breadth-first order (two candidates per node,
    e.g. top-2 expansions): 31 nodes are 5 levels, 15 nodes 4."""
    return tuple((j - 1) // 2 if j else -1 for j in range(num_nodes))


def verify_chunks(specs: Sequence[tuple[int, int]]) -> list[ChunkShape]:
    """Chunks for (start_pos, num_tokens) verify specs: a root and a binary draft tree each."""
    return [dataclasses.replace(c, draft_parents=binary_tree(c.num_tokens - 1))
            for c in fake_chunks(specs, BLOCK_SIZE)]


def _balance(timings: Sequence[KernelTiming], num_cores: int) -> float:
    """Perfect-balance time / actual makespan over the kernels (1 = perfectly balanced)."""
    busy = sum(float(t.cube_busy_cycles.sum()) for t in timings)
    span = sum(t.cycles - t.launch_cycles for t in timings)
    return busy / num_cores / span if span else 1.0


def attention_sweep(device: Device, models: Sequence[str], quick: bool) -> list[dict[str, Any]]:
    rows = []
    chip = device.chip
    for model in models:
        arch = get_arch(model)
        for name, kind, specs in attention_scenarios(quick):
            chunks = verify_chunks(specs) if kind == "verify" else fake_chunks(specs, BLOCK_SIZE)
            kernel = lower_attention(chunks, arch, chip, BLOCK_SIZE)
            t_m, meta = seconds(device, [kernel])
            t_c, _ = seconds(device, [dataclasses.replace(kernel, vector_qk=False)])
            t_s, split = seconds(device, lower_attention_split(chunks, arch, chip, BLOCK_SIZE))
            rows.append({
                "model": model, "scenario": name, "kind": kind, "num_seqs": len(specs),
                "tokens": sum(n for _, n in specs),
                "kv_tokens": sum(p + n for p, n in specs),
                "meta_us": t_m * 1e6, "split_us": t_s * 1e6, "speedup": t_s / t_m,
                # the meta-kernel with QK kept on the cube (no 2-stage variant): separates the
                # decode pipeline's gain from the balancing's
                "meta_cube_qk_us": t_c * 1e6, "speedup_cube_qk": t_s / t_c,
                "meta_pipeline": meta[0].pipeline,
                "meta_balance": _balance(meta, chip.num_cube_cores),
                "split_balance": _balance(split, chip.num_cube_cores),
                "split_kernels": len(split),
            })
    return rows


def verify_sweep(device: Device, contexts: Sequence[int]) -> list[dict[str, Any]]:
    """The paper's verify sweep: per (batch, specLen) and context, every request's root at
    `context` followed by a specLen-node binary draft tree; meta-kernel vs full-mask split."""
    rows = []
    chip, arch = device.chip, get_arch(VERIFY_MODEL)
    for batch, spec_len in VERIFY_SHAPES:
        for context in contexts:
            chunks = verify_chunks([(context, 1 + spec_len)] * batch)
            t_m, meta = seconds(device, [lower_attention(chunks, arch, chip, BLOCK_SIZE)])
            t_s, split = seconds(device, lower_attention_split(chunks, arch, chip, BLOCK_SIZE))
            rows.append({
                "model": VERIFY_MODEL, "scenario": f"verify bs{batch} spec{spec_len} @{context}",
                "batch": batch, "spec_len": spec_len, "context": context,
                "tokens": batch * (1 + spec_len), "meta_us": t_m * 1e6, "split_us": t_s * 1e6,
                "speedup": t_s / t_m, "meta_pipeline": meta[0].pipeline,
                "meta_tile_rows": int(meta[0].kernel.tasks["tile_rows"].max()),
                "split_tile_rows": int(split[0].kernel.tasks["tile_rows"].max()),
                "meta_balance": _balance(meta, chip.num_cube_cores),
                "split_balance": _balance(split, chip.num_cube_cores),
            })
    return rows
