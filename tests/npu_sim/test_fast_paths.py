"""The CPU fast paths compute what the reference paths compute.

Vector ops, on the default model's shapes, in fp32 and bf16, including RoPE over q and k adjacent
in one fused qkv row: the ATen fast path bit for bit (it fuses calls, never changes the
arithmetic); the C kernels (fp32) bit for bit for the embedding, RoPE, the KV write and the
residual add, and within fp32 rounding for RMSNorm and SiLU (another summation order, their own
exp).
GEMM with a pre-packed weight: the same product as the plain weight, within fp32 rounding.
Attention: the per-kernel plan (gather slots, masks) derived once is reused across launches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.arch import ModelArch
from engine.lowering import ChunkShape, lower_attention
from npu_sim.hardware import get_chip
from npu_sim.kernels import (
    PackedWeight,
    attention,
    pack_weight,
    run_attention,
    run_gemm,
    run_vector,
)
from npu_sim.tasks import GEMM_TASK, VECTOR_TASK, GemmKernel, TileShape, VectorKernel, VectorOp

H, HQ, HKV, D, INTER = 576, 9, 3, 64, 1536  # the default model's layer


def _kernel(op: VectorOp, rows: int, row_len: int) -> VectorKernel:
    return VectorKernel(name="t", op=op, num_rows=rows, row_len=row_len,
                        tasks=np.array([(0, rows)], dtype=VECTOR_TASK))


def _rope_tables(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(n).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_vector_fast_path_matches_the_reference(dtype: torch.dtype, rows: int,
                                                cpu_kernels: str) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, H, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)
    results = {}
    for strict in (True, False):
        residual = torch.randn(rows, H, generator=torch.Generator().manual_seed(1)).to(dtype)
        qkv = torch.randn(rows, (HQ + 2 * HKV) * D, generator=torch.Generator().manual_seed(2))
        qkv = qkv.to(dtype)
        q, k, _ = qkv.view(rows, -1, D).split((HQ, HKV, HKV), dim=1)
        cos, sin = _rope_tables(rows, dtype)
        gate_up = torch.randn(rows, 2 * INTER, generator=torch.Generator().manual_seed(3))
        table = torch.randn(50, H, generator=torch.Generator().manual_seed(4)).to(dtype)
        ids = torch.randint(0, 50, (rows,), generator=torch.Generator().manual_seed(5))
        k_cache = torch.zeros(2 * rows, 2, HKV, D, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(4 * rows, generator=torch.Generator().manual_seed(6))[:rows]
        results[strict] = {
            "rmsnorm": run_vector(_kernel(VectorOp.RMSNORM, rows, H), strict, x=x, weight=weight,
                                  eps=1e-5),
            "add_rmsnorm": run_vector(_kernel(VectorOp.ADD_RMSNORM, rows, H), strict, x=x,
                                      residual=residual, weight=weight, eps=1e-5),
            "residual": residual,
            "rope": run_vector(_kernel(VectorOp.ROPE, rows, (HQ + HKV) * D), strict, q=q, k=k,
                               cos=cos, sin=sin),
            "qkv": qkv,
            "kv_write": run_vector(_kernel(VectorOp.KV_WRITE, rows, 2 * HKV * D), strict, k=k,
                                   v=qkv.view(rows, -1, D)[:, HQ + HKV:], k_cache=k_cache,
                                   v_cache=v_cache, slot_mapping=slots),
            "caches": torch.cat([k_cache, v_cache]),
            "silu_mul": run_vector(_kernel(VectorOp.SILU_MUL, rows, 2 * INTER), strict,
                                   gate_up=gate_up.to(dtype)),
            "embed": run_vector(_kernel(VectorOp.EMBED, rows, H), strict, table=table,
                                token_ids=ids),
        }
    rounded = {"rmsnorm", "add_rmsnorm", "silu_mul"} if (
        cpu_kernels == "native" and dtype == torch.float32) else set()
    for name, strict_out in results[True].items():
        fast_out = results[False][name]
        if strict_out is None:
            assert fast_out is None
        elif name in rounded:
            torch.testing.assert_close(fast_out, strict_out, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(strict_out, fast_out), name


def test_rope_fast_path_handles_separate_q_and_k(cpu_kernels: str) -> None:
    """q and k not adjacent in memory (no fused view): rotated one after the other."""
    rows = 7
    cos, sin = _rope_tables(rows, torch.float32)
    q, k = torch.randn(rows, HQ, D), torch.randn(rows, HKV, D)
    q2, k2 = q.clone(), k.clone()
    run_vector(_kernel(VectorOp.ROPE, rows, (HQ + HKV) * D), True, q=q, k=k, cos=cos, sin=sin)
    run_vector(_kernel(VectorOp.ROPE, rows, (HQ + HKV) * D), False, q=q2, k=k2, cos=cos, sin=sin)
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 16, 77])
def test_packed_weight_gemm_matches_plain(dtype: torch.dtype, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    n, k = 300, 129
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    menu = (TileShape(16, 128, 64),)
    tasks = np.array([(0, m, 0, n, 0, 0, k, -1)], dtype=GEMM_TASK)  # coverage: not the point
    kernel = GemmKernel(name="t", m=m, n=n, k=k, menu=menu, tasks=tasks)
    packed = pack_weight(w)
    fast = run_gemm(kernel, False, x=x, w=packed, bias=bias)
    plain = F.linear(x, w, bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast, plain, atol=tol, rtol=tol)
    if isinstance(packed, PackedWeight):  # the reference path reads the plain weight
        assert packed.shape == w.shape and packed.weight is w


def test_attention_plan_is_derived_once_per_kernel() -> None:
    arch = ModelArch(architecture="LlamaForCausalLM", num_layers=1, hidden_size=HQ * D,
                     num_heads=HQ, num_kv_heads=HKV, head_dim=D, intermediate_size=INTER,
                     vocab_size=100, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     tie_word_embeddings=True, attention_bias=False, eos_token_ids=(2,),
                     bos_token_id=1)
    chunks = [ChunkShape(0, 5, (0,)), ChunkShape(20, 1, (1, 2)), ChunkShape(7, 1, (3,))]
    kernel = lower_attention(chunks, arch, get_chip("910b2"), 16)
    q = torch.randn(7, arch.num_heads, arch.head_dim)
    cache = torch.randn(4, 16, arch.num_kv_heads, arch.head_dim)
    first = run_attention(kernel, False, q, cache, cache)
    plan = attention._plan_memo[0][2]
    again = run_attention(kernel, False, q, cache, cache)
    assert attention._plan_memo[0][2] is plan
    assert torch.equal(first, again)
    torch.testing.assert_close(run_attention(kernel, True, q, cache, cache), first,
                               atol=1e-5, rtol=1e-5)
