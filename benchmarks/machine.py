"""This machine, measured: CPU, versions, the GEMM roofline, and other processes' load.

Machines differ (DESIGN section 6), so every benchmark measures the GEMM rate it is judged
against when it starts, per dtype and per library path, and the roofline is the best fp32 rate
measured here (oneDNN with packed weights or MKL through torch.matmul, whichever is faster on
this CPU). A model's work is its matmul FLOPs: 2 x (layer weights) per computed token, plus
2 x (LM head) per sampled token.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
                     "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, object]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"model": model, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "flags": [f for f in INTERESTING_FLAGS if f in flags],
            "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("xyserve", "torch", "transformers", "numpy", "fastapi", "uvicorn", "httptools"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    out["onednn"] = str(torch.backends.mkldnn.is_available())
    return out


def best_seconds(fn: Callable[[], object], seconds: float = 0.6) -> float:
    """The fastest of repeated timed calls of fn() for about `seconds` after one warm-up call
    (other tenants' load only ever slows a call, so the best is the closest to the CPU)."""
    fn()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _rate(fn: Callable[[], object], flops: float) -> float:
    """Best GFLOP/s of fn()."""
    return flops / best_seconds(fn) / 1e9


def gemm_rates(n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n^3 GEMM: fp32 / bf16, via torch.matmul (MKL for fp32 on x86) and via
    oneDNN with a pre-packed weight (the engine's fast path). Where the CPU has no bf16
    arithmetic (no AVX512_BF16 or AMX) bf16 is emulated at a few GFLOP/s, and measured at
    n / 4 so that one call takes seconds, not minutes."""
    from npu_sim.kernels import PackedWeight, pack_weight

    flags = set(cpu_info()["flags"])  # type: ignore[arg-type]
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    out: dict[str, float] = {}
    for name, dtype, size in (("fp32", torch.float32, n),
                              ("bf16", torch.bfloat16, n if native_bf16 else n // 4)):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        with torch.inference_mode():
            out[f"{name}_matmul"] = _rate(lambda a=a, b=b: a @ b, 2 * size**3)
            packed = pack_weight(b)
            if isinstance(packed, PackedWeight):
                out[f"{name}_onednn_packed"] = _rate(
                    lambda a=a, p=packed: torch.ops.mkldnn._linear_pointwise(
                        a, p.packed, None, "none", [], ""), 2 * size**3)
    out["fp32_roofline"] = max(v for k, v in out.items() if k.startswith("fp32"))
    out["bf16_roofline"] = max(v for k, v in out.items() if k.startswith("bf16"))
    return out


def best_rates(*measured: dict[str, float]) -> dict[str, float]:
    """Entry by entry, the best of several measurements of the same rates: other tenants of a
    shared machine only ever slow a measurement down, so the best is the closest to the CPU."""
    return {key: max(m[key] for m in measured) for key in measured[0]}


def memory_read_gbs(num_bytes: int = 256 << 20) -> float:
    """GB/s of reading a tensor far larger than the caches (the best of repeated sums)."""
    x = torch.ones(num_bytes // 4)
    return _rate(lambda: x.sum(), num_bytes)  # "GFLOP/s" of one flop per byte = GB/s


@dataclass(frozen=True)
class ModelFlops:
    """Matmul GFLOP of one token of a llama-family model."""

    per_token: float  # the decoder layers, for every computed token
    lm_head: float  # the LM head, for every sampled token

    @staticmethod
    def of(arch) -> ModelFlops:
        return ModelFlops(2 * arch.num_layer_gemm_params * arch.num_layers / 1e9,
                          2 * arch.hidden_size * arch.vocab_size / 1e9)

    def work(self, computed_tokens: float, sampled_tokens: float) -> float:
        return computed_tokens * self.per_token + sampled_tokens * self.lm_head

    def weight_gb(self, bytes_per_weight: float) -> float:
        """GB of matmul weights (each multiply-add reads one weight once per token)."""
        return (self.per_token + self.lm_head) / 2 * bytes_per_weight

    def decode_bound_gflops(self, batch: int, peak_gflops: float, read_gbs: float) -> float:
        """The GFLOP/s a decode step of `batch` sequences can reach at best: it computes
        batch tokens and reads every weight once, so it takes at least the longer of the two."""
        flops = batch * (self.per_token + self.lm_head)
        return flops / max(flops / peak_gflops, self.weight_gb(4) / read_gbs)

    def attainable_output_rate(self, num_prompts: int, input_len: int, output_len: int,
                               concurrency: int, peak_gflops: float, read_gbs: float,
                               bytes_per_weight: float) -> float:
        """Output tok/s no engine can beat on a closed-loop run: it computes every token at
        least once at the peak GEMM rate, and needs at least output_len x num_prompts /
        concurrency decode steps, each reading every weight once at the memory bandwidth."""
        work = self.work(num_prompts * (input_len + output_len), num_prompts * output_len)
        num_steps = output_len * math.ceil(num_prompts / concurrency)
        seconds = max(work / peak_gflops, num_steps * self.weight_gb(bytes_per_weight) / read_gbs)
        return num_prompts * output_len / seconds


# Bytes each GEMM weight costs to stream, per weight format (gguf: SmolLM2's Q4_1 blocks, 20 bytes
# per 32 weights; its few Q8_0 tensors are not counted, so the bound is slightly optimistic).
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "gguf": 20 / 32}


def with_descendants(pids: list[int]) -> list[int]:
    """pids and every process below them (vLLM's engine core, xyserve's engine process: child
    processes of the server)."""
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return out


def process_ticks(pid: int) -> int:
    """The CPU clock ticks (utime + stime, every thread) process `pid` has used; 0 once it is
    gone (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds the processes `pids` have used so far."""
    return sum(map(process_ticks, pids)) / os.sysconf("SC_CLK_TCK")


class CpuLoad:
    """Share of the machine's CPU used by processes other than `pids`, their descendants and this
    one between start() and stop(): other work on a shared machine skews a benchmark."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    @staticmethod
    def _busy_ticks() -> int:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _own_ticks(self) -> int:
        return sum(map(process_ticks, with_descendants([*self.pids, os.getpid()])))

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0, self._own0 = self._busy_ticks(), self._own_ticks()

    def stop(self) -> float:
        """Foreign CPU as a fraction of all cores over the interval (0 = we were alone)."""
        elapsed = time.monotonic() - self._t0
        ticks = os.sysconf("SC_CLK_TCK") * elapsed * (os.cpu_count() or 1)
        foreign = (self._busy_ticks() - self._busy0) - (self._own_ticks() - self._own0)
        return max(0.0, foreign / ticks) if ticks else 0.0
