"""What the compute engine needs to know about the CPU it runs on, in one place: the fastest path
it has (activation dtype, weight format, KV-cache dtype: measured once per CPU model and cached),
the process allocator's tuning, and how many KV blocks a memory budget holds.

Nothing here is about the simulated NPU (its chip comes from the config); what the C kernels can
run here comes from npu_sim.kernels.native.caps.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform as platform_module
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.arch import ModelArch
from engine.config import BF16_WEIGHT_FORMATS, DEFAULT_NPU, CacheConfig, EngineConfig
from engine.models.loader import default_cache_dir
from npu_sim.kernels.gemm import PackedWeight, pack_quantized, pack_weight, run_gemm
from npu_sim.kernels.native.caps import Capabilities, capabilities
from npu_sim.kernels.quant import quantize

Candidate = tuple[str, str]  # (activation dtype name, weight format)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_ROWS = (1, 16)  # GEMM rows the probe times: a lone stream's decode and a batch's
_PROBE_VERSION = 2  # what the probe times (cached verdicts of another version are not read)


def pin_kernel_threads() -> bool:
    """Pin the calling thread's kernel threads (its OpenMP team of torch.get_num_threads()) one
    per CPU, where that is one thread per CPU the thread may use (npu_sim.kernels.native.
    pin_team); the server's engine loop calls it before its first step. Returns whether they
    were pinned."""
    from npu_sim.kernels import native

    return native.pin_team(torch.get_num_threads())


@dataclass(frozen=True)
class FastPath:
    """How the compute engine runs on this CPU."""

    dtype: torch.dtype  # activations
    weight_format: str  # GEMM weights: fp32 | bf16 | gguf
    kv_cache_dtype: torch.dtype  # the paged KV cache
    reason: str  # one line for the log: what was measured or asked for


def candidates(caps: Capabilities, ships_quantized: bool) -> list[Candidate]:
    """The paths worth timing here: fp32; the model's own 4- / 8-bit blocks where the C kernels
    decode them in registers (exact: the fp32 weights are their dequantization); where the CPU
    computes bf16 natively (ATen's bf16 is ~80x slower than fp32 without it), bf16 weights with
    fp32 activations (the C kernels and the layers' replay; each GEMM rounds its input to bf16
    and multiplies on AMX tiles or vdpbf16ps), the same with the model's blocks for a lone
    stream's steps (gguf+bf16), and bf16 weights and activations (ATen / oneDNN between the
    GEMMs)."""
    out: list[Candidate] = [("float32", "fp32")]
    if ships_quantized and caps.simd_kernels:
        out.append(("float32", "gguf"))
    if caps.native_bf16:
        if caps.simd_kernels:
            out.append(("float32", "bf16"))
            if ships_quantized:
                out.append(("float32", "gguf+bf16"))
        out.append(("bfloat16", "bf16"))
    return out


def choose_fast_path(config: EngineConfig, arch: ModelArch, ships_quantized: bool,
                     measure: Callable[[Candidate, ModelArch], float] | None = None,
                     caps: Capabilities | None = None,
                     cache_file: pathlib.Path | None = None) -> FastPath:
    """The dtype, weight format and KV-cache dtype for `config` (its explicit choices kept, its
    `auto`s filled in by the fastest candidate consistent with them, measured by `measure`
    (default: timing the model's own GEMM shapes, `probe_seconds`) once per CPU and model
    shape, the verdict cached in `cache_file`). ValueError for an explicit choice this machine
    or model cannot run (gguf weights without a GGUF source)."""
    if config.weight_format == "gguf" and not ships_quantized:
        raise ValueError(f"weight format gguf: {config.model} does not ship GGUF blocks (a "
                         f"preset or a .gguf file does)")
    caps = caps or capabilities()
    pool = candidates(caps, ships_quantized)
    if config.dtype != "auto" or config.weight_format != "auto":
        # an explicit float32 keeps the weights exact (fp32, or the blocks they dequantize
        # from) unless a format is asked for too
        inexact = (BF16_WEIGHT_FORMATS if config.dtype == "float32"
                   and config.weight_format == "auto" else ())
        wanted = [(d, f) for d, f in pool if config.dtype in ("auto", d)
                  and config.weight_format in ("auto", f) and f not in inexact]
        if not wanted:  # an explicit pair outside the probe's pool: as asked
            dtype = config.dtype if config.dtype != "auto" else "float32"
            fmt = config.weight_format if config.weight_format != "auto" else (
                "bf16" if dtype == "bfloat16" else "fp32")
            wanted = [(dtype, fmt)]
        pool = wanted
    if len(pool) == 1:
        (dtype, fmt), reason = pool[0], "as configured"
    else:
        times = _probe_cached(pool, arch, caps, measure or probe_seconds,
                              cache_file or default_cache_dir() / "fast-path.json")
        dtype, fmt = min(pool, key=lambda c: times[_key(c)])
        reason = "measured " + ", ".join(
            f"{d} activations + {f} weights {1e3 * times[_key((d, f))]:.2f} ms" for d, f in pool)
    kv = auto_kv_cache_dtype(dtype, fmt) if config.kv_cache_dtype == "auto" else (
        config.kv_cache_dtype)
    return FastPath(_DTYPES[dtype], fmt, _DTYPES[kv], reason)


def auto_kv_cache_dtype(dtype: str, weight_format: str) -> str:
    """The KV cache `--kv-cache-dtype auto` gives: bf16 beside bf16 weights (a path already
    rounding every GEMM's input and weight to bf16; it halves attention's reads: decode-heavy
    served 850-884 against 782-804 tok/s on fp32 activations with gguf+bf16 weights, on a
    2-core AMX Xeon), else the activations' dtype (fp32 stays exact)."""
    return "bfloat16" if weight_format in BF16_WEIGHT_FORMATS else dtype


def probe_seconds(candidate: Candidate, arch: ModelArch) -> float:
    """Best-of-three seconds of a step's MLP GEMMs (gate/up, down of every layer, each layer's
    weights its own, as a step streams them) at PROBE_ROWS rows, on random weights in the
    candidate's dtype and format (Q4_1 blocks for gguf). Every layer's: one layer's weights
    stay in cache, where bf16 tiles beat 4-bit blocks even at one row; a whole step's come
    from memory, where a lone stream's step is bound by the bytes it reads."""
    from engine.lowering import DEFAULT_POLICY, lower_gemm
    from npu_sim.hardware import get_chip

    dtype, fmt = candidate
    act = _DTYPES[dtype]
    h, i = arch.hidden_size, arch.intermediate_size
    gen = torch.Generator().manual_seed(0)
    weights = [_probe_weight(torch.randn(n, k, generator=gen) * 0.02, fmt, act)
               for _ in range(arch.num_layers) for n, k in ((2 * i, h), (h, i))]
    chip = get_chip(DEFAULT_NPU)
    runs = []
    for m in PROBE_ROWS:
        inputs = {k: torch.randn(m, k, generator=gen).to(act) for k in (h, i)}
        for w in weights:
            n, k = w.shape
            _, kernel = lower_gemm("probe", m, n, k, chip, DEFAULT_POLICY)
            runs.append((kernel, inputs[k], w))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for kernel, x, w in runs:
            run_gemm(kernel, False, x, w)
        best = min(best, time.perf_counter() - start)
    return best


def _probe_weight(w: torch.Tensor, fmt: str, act: torch.dtype) -> PackedWeight | torch.Tensor:
    """w packed as the engine packs a GEMM weight in `fmt` (engine.models.llama)."""
    if fmt == "gguf":
        return pack_quantized(quantize(w, "q4_1"))
    if fmt == "gguf+bf16":  # the blocks, and bf16 rounded from them (the model's own)
        from engine.models.llama import with_lone_stream_blocks

        blocks = quantize(w, "q4_1")
        return with_lone_stream_blocks(pack_weight(blocks.dequantize(), "bf16"),
                                       pack_quantized(blocks))
    return pack_weight(w.to(act), fmt)


def _key(candidate: Candidate) -> str:
    return f"{candidate[0]}+{candidate[1]}"


def _probe_cached(pool: list[Candidate], arch: ModelArch, caps: Capabilities,
                  measure: Callable[[Candidate, ModelArch], float],
                  cache_file: pathlib.Path) -> dict[str, float]:
    """Seconds per candidate, from `cache_file` when this CPU model (and library, torch and
    model shape) was measured before; measured and stored otherwise."""
    machine = (f"{_cpu_model()}|isa={sorted(caps.library_isa)}|torch={torch.__version__}|"
               f"h={arch.hidden_size},i={arch.intermediate_size},layers={arch.num_layers}|"
               f"probe={_PROBE_VERSION}")
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    times = cached.get(machine, {}) if isinstance(cached, dict) else {}
    missing = [c for c in pool if _key(c) not in times]
    if missing:
        times = {**times, **{_key(c): measure(c, arch) for c in missing}}
        cached = {**(cached if isinstance(cached, dict) else {}), machine: times}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(cache_file)  # atomic: concurrent servers never read half a file
        except OSError:
            pass  # a read-only home: measured again next time
    return times


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform_module.processor() or "unknown"


def kv_block_bytes(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * elem


def num_kv_blocks(cache: CacheConfig, arch: ModelArch, dtype: torch.dtype) -> int:
    """The pool size: `cache.num_kv_blocks` when given, else as many blocks as the memory budget
    holds (at least one)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    return max(1, cache.kv_cache_memory_bytes // kv_block_bytes(arch, cache.block_size, dtype))
