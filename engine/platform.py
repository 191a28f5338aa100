"""What the compute engine needs to know about the CPU it runs on, in one place: the compute dtype,
the process allocator's tuning, and how many KV blocks a memory budget holds.

Nothing here is about the simulated NPU (its chip comes from the config); the fast-path question
("do fp32 launches run on the C kernels?") is answered by the device itself.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

import torch

from engine.arch import ModelArch
from engine.config import AUTO_FP32_MAX_PARAMS, CacheConfig
from npu_sim.device import Device


@cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512_BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, num_params: int) -> torch.dtype:
    """The torch dtype for a config dtype name and a model of num_params parameters.

    auto: float32 for a model of up to AUTO_FP32_MAX_PARAMS where the device runs fp32 on its C
    kernels (on the default model both faster than bf16 on ATen, 380 vs 297 decode tok/s at
    batch 16, and exact against transformers' fp32; the fast path then keeps up to three copies
    of each fp32 weight); else bf16 where the CPU computes it natively; else float32.
    """
    if name == "auto":
        if num_params <= AUTO_FP32_MAX_PARAMS and Device.fast_fp32_available():
            return torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def keep_freed_tensor_memory() -> bool:
    """Let glibc serve tensors of up to 32 MiB from the heap and keep up to 256 MiB it frees.

    By default glibc maps every allocation above a (dynamic) threshold afresh and gives freed
    heap tops back to the OS, so a step's large temporaries (gathered K/V, GEMM outputs of a long
    chunk) page-fault on every launch: measured here, gathering 11 MB of K cost 5.4 ms that way
    and 0.6 ms with the memory kept. Process-wide; skipped where the user set MALLOC_* tunables
    or the C library has no mallopt. Returns whether it applied.
    """
    if any(k.startswith(("MALLOC_MMAP_THRESHOLD", "MALLOC_TRIM_THRESHOLD")) for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


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
