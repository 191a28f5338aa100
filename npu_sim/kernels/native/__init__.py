"""C kernels for the CPU fast path (cpu_kernels.c, attention.c, attention_chunk.c, gemm.c,
gemm_pack.c, decoder.c), compiled on first use and called through ctypes (which releases the GIL
for the call).

A decode step alternates weight-streaming GEMMs with small row-wise ops; after each GEMM the caches
hold weights only, so every ATen call of the small ops pays a cold dispatch (an RMSNorm is ~15
of them, an attention launch ~10 plus a gather of every key into a padded copy). Here each of
those launches is one call: RMSNorm (+ residual add), SiLU-mul, RoPE, the KV write, and the
attention of decodes and of prefill chunks, reading the paged cache in place (attention.c,
attention_chunk.c; fp32, bf16 or fp16 cache, fp32 arithmetic; on a bf16 cache AMX tiles where
the CPU has them, attention_amx.h). The GEMMs of few rows (decode batches) run on weights
packed into 16-column panels (gemm.c; fp32, bf16, or GGUF Q4_1 / Q8_0 blocks decoded in
registers: panels.py), streamed at close to the memory bound. Activations stay fp32
throughout. decoder.c replays a whole step's decoder layers, those same calls in one
(npu_sim.kernels.replay). caps.py says which instruction-set paths the build has, for the engine's
dtype and weight-format choices.

The library is built with the system C compiler on first use and cached per CPU
(native_build). Without a compiler, or with XYSERVE_NATIVE_KERNELS=0, `lib()` is None
and every wrapper returns None / False: the callers then take their ATen path. Each wrapper also
declines (returns None / False) operands it does not handle (another dtype, a non-unit inner
stride), so callers can always fall back.

The parallel regions run on torch's OpenMP threads. Start the process with
OMP_WAIT_POLICY=PASSIVE on a machine other work shares: libgomp's idle threads otherwise spin,
and a region then waits a scheduler time slice for a thread whose core another process holds (a
decode step's GEMMs: 1.4 s instead of 18 ms with a busy loop beside them; 12 instead of 10.3 ms
when the machine is idle); `xyserve serve` does, with a short spin (GOMP_SPINCOUNT=20000) for
the back-to-back regions of a step. libgomp reads both once, when torch loads it.
"""

from __future__ import annotations

import ctypes
import pathlib

import torch

import native_build

_SOURCES = tuple(pathlib.Path(__file__).with_name(f)
                 for f in ("cpu_kernels.c", "attention.c", "attention_chunk.c", "gemm.c",
                           "gemm_pack.c", "decoder.c"))
_HEADERS = tuple(pathlib.Path(__file__).with_name(f)
                 for f in ("exp_approx.h", "simd.h", "paged.h", "gemm_formats.h",
                           "gemm_row1_zmm.h", "gemm_bf16_dot.h", "amx.h", "gemm_amx.h",
                           "attention_amx.h"))
# -ffp-contract=off: a * b + c * d rounds like ATen's separate mul and add (no fused FMA);
# -fno-trapping-math: no code reads floating-point exception flags, and without it GCC keeps
# the branches of exp_approx's clamp and vectorises no loop that calls it (SiLU-mul ran 8x
# slower); it changes no result. -fopenmp: the parallel regions run on the libgomp torch has
# loaded (see gemm.c).
_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
          "-fno-trapping-math")

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ATTN_BF16_MATMUL = 1  # the attention kernels' flag: AMX tiles allowed (attention_amx.h)
_SIGNATURES = {
    "xy_add_rmsnorm": (None, [_P, _I, _P, _I, _P, _P, _I, _I, _I, _F]),
    "xy_silu_mul": (None, [_P, _I, _P, _I, _I, _I]),
    "xy_rope": (None, [_P, _I, _I, _I, _P, _P, _I, _I, _I]),
    "xy_kv_write": (ctypes.c_int, [_P, _P, _I, _P, _P, _I, _P, _I, _I, ctypes.c_int]),
    "xy_decode_attention": (ctypes.c_int, [_P, _I, _P, _P, _P, _I, _P, _P, _P, _I, _I, _I, _I,
                                           _I, _I, _I, _F, ctypes.c_int, ctypes.c_int,
                                           ctypes.c_int]),
    "xy_chunk_attention": (ctypes.c_int, [_P, _I, _P, _P, _P, _I, _I, _I, _P, _I, _I, _I, _I,
                                          _I, _I, _F, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int]),
    "xy_amx_granted": (ctypes.c_int, []),
    "xy_pin_team": (ctypes.c_int, [ctypes.c_int]),
    "xy_pack_panels": (None, [_P, _I, _I, _P]),
    "xy_gemm": (ctypes.c_int, [_P, _I, _P, _P, _I, _I, _P, _I, _I, ctypes.c_int]),
    "xy_packed_bytes": (_I, [ctypes.c_int, _I, _I]),
    "xy_pack_panels_bf16": (None, [_P, _I, _I, _P]),
    "xy_pack_q4_1": (None, [_P, _I, _I, _P]),
    "xy_pack_q8_0": (None, [_P, _I, _I, _P]),
    "xy_gemm_packed": (ctypes.c_int, [ctypes.c_int, _P, _I, _P, _P, _I, _I, _P, _I, _I,
                                      ctypes.c_int, ctypes.c_int]),
    "xy_gather_rows": (ctypes.c_int, [ctypes.c_int, _P, _I, _I, _P, _I, _P, _I]),
    "xy_argmax_rows": (None, [_P, _I, _I, _I, _P]),
    "xy_isa": (ctypes.c_int, []),
    "xy_decoder_layers": (ctypes.c_int, [_P, _P, _P]),
}


# The kernels' library (native_build builds, caches and loads it)
_KERNELS = native_build.Library("cpu_kernels", _SOURCES, _HEADERS, _FLAGS, _SIGNATURES,
                                "the CPU fast path's C kernels")
enabled = native_build.enabled
disabled = native_build.disabled


def lib() -> ctypes.CDLL | None:
    """The loaded library (built first if needed), or None where it is disabled or cannot be
    built here."""
    return native_build.loaded(_KERNELS)


# ------------------------------------------------------------------------------------ wrappers

# KV cache element types the C kernels read and write (simd.h's KV_*): a 16-bit cache halves the
# bytes a decode reads per key; queries, scores and outputs stay fp32.
KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _fp32_rows(*tensors: torch.Tensor) -> bool:
    """All fp32 with unit stride along the last dimension."""
    return all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)


def add_rmsnorm(n: int, x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> torch.Tensor | None:
    """Rows [0, n) of residual (+= x first when x is given, in place), RMS-normalised and
    scaled by weight: (n, H) fp32; None where not handled."""
    native = lib()
    operands = (residual, weight) if x is None else (x, residual, weight)
    if (native is None or not _fp32_rows(*operands) or residual.dim() != 2
            or not weight.is_contiguous()):
        return None
    hidden = residual.shape[1]
    out = residual.new_empty(n, hidden)
    native.xy_add_rmsnorm(None if x is None else x.data_ptr(), 0 if x is None else x.stride(0),
                          residual.data_ptr(), residual.stride(0), weight.data_ptr(),
                          out.data_ptr(), hidden, n, hidden, eps)
    return out


def silu_mul(n: int, gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up over rows [0, n) of gate_up (T, 2I): (n, I); None where not handled."""
    native = lib()
    if (native is None or not _fp32_rows(gate_up) or gate_up.dim() != 2 or gate_up.shape[1] % 2
            or len(gate_up) < n):
        return None
    inter = gate_up.shape[1] // 2
    out = gate_up.new_empty(n, inter)
    native.xy_silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), inter, n, inter)
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x.argmax(dim=-1) of x (R, V) fp32 with unit inner stride: (R,) int64, the first maximum
    of each row (a NaN counts as the maximum, as in torch); None where not handled."""
    native = lib()
    if native is None or x.dim() != 2 or not _fp32_rows(x) or x.shape[1] == 0:
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    native.xy_argmax_rows(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out


def rope(n: int, parts: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate rows [0, n) of each of `parts` (T, heads, D) in place by cos, sin (T, D); False
    where any is not handled (then nothing is written)."""
    native = lib()
    if (native is None or not _fp32_rows(*parts, cos, sin) or cos.stride() != sin.stride()
            or cos.shape != sin.shape or len(cos) < n
            or any(t.dim() != 3 or t.shape[2] != cos.shape[-1] or len(t) < n for t in parts)):
        return False
    for t in parts:
        native.xy_rope(t.data_ptr(), t.stride(0), t.stride(1), t.shape[1], cos.data_ptr(),
                       sin.data_ptr(), cos.stride(0), n, t.shape[2])
    return True


def kv_write(n: int, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Write rows [0, n) of k, v (T, Hkv, D) fp32 to the cache slots slot_mapping[:n] of a fp32,
    bf16 or fp16 cache (rounded to nearest even, as torch's .to()); False where not handled
    (nothing written). A slot outside the cache raises IndexError."""
    native = lib()
    row_len = k.shape[1] * k.shape[2]
    if (native is None or not _fp32_rows(k, v) or k_cache.dtype not in KV_DTYPES
            or v_cache.dtype != k_cache.dtype or k.stride() != v.stride()
            or k.stride(1) != k.shape[2] or k_cache.shape != v_cache.shape
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or k_cache.numel() % row_len or slot_mapping.dtype != torch.int64
            or not slot_mapping.is_contiguous()):
        return False
    if native.xy_kv_write(k.data_ptr(), v.data_ptr(), k.stride(0), k_cache.data_ptr(),
                          v_cache.data_ptr(), k_cache.numel() // row_len,
                          slot_mapping.data_ptr(), n, row_len, KV_DTYPES[k_cache.dtype]) != 0:
        raise IndexError("kv_write: a slot outside the cache")
    return True


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor) -> bool:
    """Whether decode_attention takes these operands: the library loaded, q fp32 rows of
    contiguous heads (at most 1024, a multiple of the KV heads), D a multiple of 8, a
    contiguous fp32, bf16 or fp16 cache (keys and values alike) with a power-of-two block
    size."""
    bs, d = k_cache.shape[1], q.shape[-1]
    return (lib() is not None and q.dtype == torch.float32 and k_cache.dtype in KV_DTYPES
            and v_cache.dtype == k_cache.dtype
            and q.dim() == 3 and q.stride(2) == 1 and q.stride(1) == d and d % 8 == 0
            and q.shape[1] <= 1024 and q.shape[1] % k_cache.shape[2] == 0
            and bs & (bs - 1) == 0 and k_cache.shape == v_cache.shape
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     q_rows: torch.Tensor, out: torch.Tensor, scale: float,
                     bf16_matmul: bool = True) -> None:
    """One query row per sequence (q_rows (S,) of q (T, Hq, D)) attending to all of its
    context_lens (S,) keys in the paged cache (NB, BS, Hkv, D) through block_tables (S, B);
    writes the same rows of out (T, Hq, D), a contiguous tensor like q; on torch's intra-op
    thread count. The index tensors are contiguous int64. Operands must pass
    `decode_attention_supported` (else ValueError); a context past its table or a block outside
    the cache raises IndexError. bf16_matmul: as chunk_attention's (AMX tiles on a bf16 cache
    also need at most 16 query heads per KV head)."""
    index = (block_tables, context_lens, q_rows)
    if (not decode_attention_supported(q, k_cache, v_cache) or out.shape != q.shape
            or not out.is_contiguous() or out.dtype != q.dtype
            or any(t.dtype != torch.int64 or not t.is_contiguous() for t in index)):
        raise ValueError("decode_attention: operands it does not take")
    nb, bs, hkv, _ = k_cache.shape
    _, hq, d = q.shape
    rc = lib().xy_decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(),
                                   v_cache.data_ptr(), block_tables.data_ptr(),
                                   block_tables.stride(0), context_lens.data_ptr(),
                                   q_rows.data_ptr(), out.data_ptr(), out.stride(0),
                                   len(context_lens), hq, hkv, d, nb, bs, scale,
                                   torch.get_num_threads(), KV_DTYPES[k_cache.dtype],
                                   ATTN_BF16_MATMUL if bf16_matmul else 0)
    _raise_for(rc, "decode_attention", "a context")


def chunk_attention_supported(q: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor) -> bool:
    """Whether chunk_attention takes these operands: as decode_attention, with D a multiple of
    16 up to 256 and at most 64 query heads per KV head (attention_chunk.c's scratch)."""
    return attention_support(q, k_cache, v_cache)[1]


def attention_support(q: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor) -> tuple[bool, bool]:
    """(decode_attention_supported, chunk_attention_supported) of these operands, the shared
    checks made once (an attention launch asks both)."""
    d = q.shape[-1]
    decodes = decode_attention_supported(q, k_cache, v_cache)
    return decodes, decodes and d % 16 == 0 and d <= 256 and q.shape[1] // k_cache.shape[2] <= 64


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, start_pos: int, rows: slice, out: torch.Tensor,
                    scale: float, bf16_matmul: bool = True) -> None:
    """One sequence's prefill chunk: row rows.start + r of q (T, Hq, D) is the token at position
    start_pos + r and attends causally to the keys at positions [0, start_pos + r] in the paged
    cache (NB, BS, Hkv, D) through block_table (B,) (contiguous int64); writes the same rows of
    out (T, Hq, D), a contiguous tensor like q; on torch's intra-op thread count. Operands must
    pass `chunk_attention_supported` (else ValueError); a chunk past its table or a block
    outside the cache raises IndexError. bf16_matmul: a bf16 cache may take AMX tiles, its
    query rows and softmax weights each split in two bf16 parts (within ~2^-16 of fp32
    arithmetic: attention_amx.h; where the CPU has AMX, D is a multiple of 32 and blocks hold
    16 slots or more; `bf16_attention_for` says when a step's callers allow it); False: fp32
    arithmetic always."""
    if (not chunk_attention_supported(q, k_cache, v_cache) or out.shape != q.shape
            or not out.is_contiguous() or out.dtype != q.dtype
            or block_table.dtype != torch.int64 or not block_table.is_contiguous()
            or not 0 <= rows.start < rows.stop <= len(q) or start_pos < 0):
        raise ValueError("chunk_attention: operands it does not take")
    nb, bs, hkv, _ = k_cache.shape
    _, hq, d = q.shape
    rc = lib().xy_chunk_attention(
        q.data_ptr() + rows.start * q.stride(0) * q.element_size(), q.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(), len(block_table),
        start_pos, rows.stop - rows.start,
        out.data_ptr() + rows.start * out.stride(0) * out.element_size(), out.stride(0),
        hq, hkv, d, nb, bs, scale, torch.get_num_threads(), KV_DTYPES[k_cache.dtype],
        ATTN_BF16_MATMUL if bf16_matmul else 0)
    _raise_for(rc, "chunk_attention", "the chunk")


def bf16_attention_for(num_rows: int) -> bool:
    """The `bf16_matmul` of a step of `num_rows` rows (what its callers pass the attention
    kernels): every step but one of a single row. A lone stream's steps multiply 4-bit blocks
    on AVX-512 (a gguf+bf16 weight's small panels), and waking the tile unit for its short
    attention alone cost 2-5% of its ITL on the AMX Xeon; where the step's GEMMs run on the
    tiles anyway, its attention on them costs nothing extra."""
    return num_rows > 1


def amx_granted() -> bool:
    """Whether the library's AMX paths run in this process (built with them, and the kernel
    grants the tiles): the bf16 GEMMs and the attention kernels' `bf16_matmul` take them."""
    native = lib()
    return native is not None and bool(native.xy_amx_granted())


def pin_team(num_threads: int) -> bool:
    """Pin the calling thread's OpenMP team (num_threads threads, torch's intra-op team on that
    thread) one thread per CPU, where the calling thread may run on exactly num_threads CPUs
    (cpu_kernels.c's xy_pin_team). Returns whether it pinned them; False without the library,
    with another CPU count, or when the kernel refused."""
    native = lib()
    return native is not None and native.xy_pin_team(num_threads) == 0


def _raise_for(rc: int, kernel: str, what: str) -> None:
    """The exception for an attention kernel's return code (0: none)."""
    if rc == -1:
        raise MemoryError(f"{kernel}: no memory for its scratch")
    if rc == -2:
        raise ValueError(f"{kernel}: a shape the C kernel does not take")
    if rc != 0:
        raise IndexError(f"{kernel}: {what} reaches outside its block table or the cache")


# The GEMM wrappers live in panels.py, the capability probe in caps.py (both need lib() above).
from npu_sim.kernels.native.caps import Capabilities, capabilities  # noqa: E402
from npu_sim.kernels.native.panels import (  # noqa: E402
    FORMATS,
    GEMM_MAX_ROWS,
    PANEL_COLS,
    Panels,
    as_bf16,
    gather_rows,
    gemm,
    pack_blocks,
    pack_panels,
)

__all__ = ["ATTN_BF16_MATMUL", "FORMATS", "GEMM_MAX_ROWS", "KV_DTYPES", "PANEL_COLS",
           "Capabilities", "Panels", "add_rmsnorm", "amx_granted", "argmax_rows", "as_bf16",
           "attention_support", "bf16_attention_for", "capabilities", "chunk_attention",
           "chunk_attention_supported", "decode_attention", "decode_attention_supported",
           "disabled", "enabled", "gather_rows", "gemm", "kv_write", "lib", "pack_blocks",
           "pack_panels", "pin_team", "rope", "silu_mul"]
