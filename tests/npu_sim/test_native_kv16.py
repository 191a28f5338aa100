"""A 16-bit KV cache (bf16 or fp16) in the C kernels: the KV write rounds fp32 keys and values
exactly as torch's .to() does (ties, NaN, infinities, fp16 subnormals and overflow, rows that
are not a multiple of 8 long), and the decode and chunk attention read it widened to fp32,
against the float64 reference on the same (widened) cache (a bf16 cache also on AMX tiles,
within 2^-16): ragged shapes, thread counts that
must not change a bit, the operands they decline, out-of-range indices refused before anything
is written, and run_attention with and without the C kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.lowering import ChunkShape, lower_attention
from npu_sim.hardware import get_chip
from npu_sim.kernels import native, run_attention, run_vector
from npu_sim.tasks import VECTOR_TASK, VectorKernel, VectorOp
from tests.npu_sim.attention_reference import dense_attention, make_arch
from tests.npu_sim.test_native_kernels import _with_threads

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the C kernels cannot be built here")

DTYPES = [torch.bfloat16, torch.float16]
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _special_values(n: int) -> torch.Tensor:
    """n fp32 values that probe rounding: halfway cases of both 16-bit formats, NaN, +-inf,
    -0, fp16 subnormals and overflow, bf16's largest finite, then random ones."""
    one = torch.tensor([1.0]).view(torch.int32)
    ties = torch.cat([(one + 0x8000).view(torch.float32), (one + 0x18000).view(torch.float32),
                      (one + 0x1000).view(torch.float32), (one + 0x3000).view(torch.float32)])
    fixed = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 65504.0, 65520.0,
                          65519.0, 1e-7, -3e-8, 2.0**-24 * 1.5, 2.0**-25, 6e-5, 3.3895e38, 1e-40])
    rest = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 10
    return torch.cat([ties, fixed, rest])[:n]


def check_kv_write_rounding(dtype: torch.dtype) -> None:
    """kv_write's 16-bit rows bit for bit as torch rounds them (rows of 12: a vector of 8 and
    a scalar tail)."""
    t, hkv, d = 6, 3, 4
    k = _special_values(t * hkv * d).view(t, hkv, d)
    v = -k.flip(0)
    k_cache = torch.zeros(4, 4, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([13, 0, 7, 5, 2, 15])
    assert native.kv_write(t, k, v, k_cache, v_cache, slots)
    for cache, src in ((k_cache, k), (v_cache, v)):
        expected = torch.zeros_like(cache)
        expected.view(-1, hkv, d)[slots] = src.to(dtype)
        got, want = cache.view(_BITS[dtype]), expected.view(_BITS[dtype])
        nan = expected.isnan()
        assert torch.equal(got[~nan], want[~nan]) and cache[nan].isnan().all()


def _paged(dtype: torch.dtype, num_seqs: int, hq: int, hkv: int, d: int, block_size: int,
           max_ctx: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, max_ctx + 1, (num_seqs,), generator=gen)
    per_seq = -(-max_ctx // block_size)
    num_blocks = num_seqs * per_seq + 3
    tables = torch.randperm(num_blocks, generator=gen)[:num_seqs * per_seq]
    return {
        "q": torch.randn(num_seqs + 2, hq, d, generator=gen),  # two rows nobody reads
        "k_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype),
        "v_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype),
        "block_tables": tables.view(num_seqs, per_seq).contiguous(),
        "context_lens": ctx,
        "q_rows": torch.randperm(num_seqs + 2, generator=gen)[:num_seqs],
    }


def _decode(op: dict[str, torch.Tensor], bf16_matmul: bool = False) -> torch.Tensor:
    out = torch.full_like(op["q"], 7.0)
    native.decode_attention(op["q"], op["k_cache"], op["v_cache"], op["block_tables"],
                            op["context_lens"], op["q_rows"], out, op["q"].shape[-1] ** -0.5,
                            bf16_matmul)
    return out


def _decode_reference(op: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float64 reference of every decode's row (in q_rows' order)."""
    chunks = [ChunkShape(int(c) - 1, 1, tuple(t.tolist()))
              for c, t in zip(op["context_lens"], op["block_tables"], strict=True)]
    return dense_attention(chunks, op["q"][op["q_rows"]].double(), op["k_cache"].double(),
                           op["v_cache"].double(), op["k_cache"].shape[1])


def check_decode_attention(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    """fp32 arithmetic: the reference's numbers to fp32 rounding."""
    op = _paged(dtype, num_seqs=7, hq=hq, hkv=hkv, d=d, block_size=16, max_ctx=150, seed=hq + d)
    out = _decode(op)
    torch.testing.assert_close(out[op["q_rows"]], _decode_reference(op).float(), atol=1e-5,
                               rtol=1e-5)
    untouched = [r for r in range(len(out)) if r not in op["q_rows"].tolist()]
    assert (out[untouched] == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_kv_write_rounds_as_torch(dtype: torch.dtype) -> None:
    check_kv_write_rounding(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 16), (9, 3, 64), (8, 1, 128), (6, 2, 40)])
def test_decode_attention_on_a_16_bit_cache(dtype: torch.dtype, hq: int, hkv: int,
                                            d: int) -> None:
    check_decode_attention(dtype, hq, hkv, d)


def _chunk_case(dtype: torch.dtype, hq: int, hkv: int, d: int, block_size: int, start_pos: int,
                q_len: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A chunk's operands on a scattered 16-bit cache (q with 3 rows before the chunk and 5
    after, which must stay untouched) and the float64 reference of its rows."""
    gen = torch.Generator().manual_seed(q_len)
    blocks = -(-(start_pos + q_len) // block_size)
    pool = 2 * blocks + 3
    op = {"q": torch.randn(q_len + 5, hq, d, generator=gen),
          "k_cache": torch.randn(pool, block_size, hkv, d, generator=gen).to(dtype),
          "v_cache": torch.randn(pool, block_size, hkv, d, generator=gen).to(dtype),
          "table": torch.randperm(pool, generator=gen)[:blocks].contiguous()}
    expected = dense_attention([ChunkShape(start_pos, q_len, tuple(op["table"].tolist()))],
                               op["q"][3:3 + q_len].double(), op["k_cache"].double(),
                               op["v_cache"].double(), block_size)
    return op, expected


def _run_chunk(op: dict[str, torch.Tensor], start_pos: int, q_len: int,
               bf16_matmul: bool) -> torch.Tensor:
    out = torch.full_like(op["q"], 7.0)
    native.chunk_attention(op["q"], op["k_cache"], op["v_cache"], op["table"], start_pos,
                           slice(3, 3 + q_len), out, op["q"].shape[-1] ** -0.5, bf16_matmul)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(("hq", "hkv", "d", "block_size", "start_pos", "q_len"), [
    (4, 4, 16, 16, 0, 33),
    (9, 3, 64, 16, 100, 70),
    (8, 1, 128, 32, 37, 40),
])
def test_chunk_attention_on_a_16_bit_cache(dtype: torch.dtype, hq: int, hkv: int, d: int,
                                           block_size: int, start_pos: int, q_len: int) -> None:
    """fp32 arithmetic (bf16_matmul=False): the reference's numbers to fp32 rounding."""
    op, expected = _chunk_case(dtype, hq, hkv, d, block_size, start_pos, q_len)

    def run() -> torch.Tensor:
        return _run_chunk(op, start_pos, q_len, bf16_matmul=False)

    out = run()
    torch.testing.assert_close(out[3:3 + q_len], expected.float(), atol=1e-5, rtol=1e-5)
    assert (out[:3] == 7.0).all() and (out[3 + q_len:] == 7.0).all()
    assert torch.equal(_with_threads(1, run), _with_threads(2, run))


@pytest.mark.parametrize(("hq", "hkv", "d", "block_size", "start_pos", "q_len"), [
    (4, 4, 32, 16, 0, 33),  # one tile of d; a last key tile of one key
    (9, 3, 64, 16, 100, 70),  # the default model's heads: 48 query vectors, 3 blocks of 16
    (9, 3, 64, 16, 768, 240),  # a long context
    (8, 1, 128, 32, 37, 40),  # two column passes of P V; 32-slot blocks
    (6, 2, 96, 64, 5, 17),  # d of 3 tiles: a pass of 4 columns and one of 2
    (64, 1, 64, 16, 3, 20),  # the widest group: 64 blocks of queries
    (9, 3, 64, 16, 0, 1),  # one query row, one key
])
def test_chunk_attention_bf16_matmul_within_bf16_rounding(
        hq: int, hkv: int, d: int, block_size: int, start_pos: int, q_len: int) -> None:
    """bf16_matmul=True on a bf16 cache: where AMX runs, the query rows and softmax weights go
    in as two bf16 parts each (~16 bits of their mantissas), so each output is within 2^-16 of
    the largest |V| of the float64 reference (measured up to ~1e-5, against ~1e-6 for fp32
    arithmetic); elsewhere the fp32 path's numbers exactly. Rows outside the chunk untouched,
    thread counts change no bit."""
    op, expected = _chunk_case(torch.bfloat16, hq, hkv, d, block_size, start_pos, q_len)

    def run() -> torch.Tensor:
        return _run_chunk(op, start_pos, q_len, bf16_matmul=True)

    out = run()
    fp32 = _run_chunk(op, start_pos, q_len, bf16_matmul=False)
    bound = 2.0**-16 * float(op["v_cache"].abs().max())
    assert float((out[3:3 + q_len].double() - expected).abs().max()) <= bound
    assert (out[:3] == 7.0).all() and (out[3 + q_len:] == 7.0).all()
    assert torch.equal(_with_threads(1, run), _with_threads(2, run))
    # the tiles ran exactly where they may (a single key's weight is exactly 1 either way)
    assert torch.equal(out, fp32) == (not native.amx_granted() or q_len + start_pos == 1)


def test_chunk_attention_bf16_matmul_needs_a_bf16_cache_and_tiles_that_fit() -> None:
    """bf16_matmul leaves fp32 arithmetic where the tiles cannot run: an fp16 cache, d not a
    multiple of 32, blocks of fewer than 16 slots."""
    for dtype, d, block_size in ((torch.float16, 64, 16), (torch.bfloat16, 48, 16),
                                 (torch.bfloat16, 64, 8)):
        op, _ = _chunk_case(dtype, 4, 2, d, block_size, 9, 30)
        assert torch.equal(_run_chunk(op, 9, 30, bf16_matmul=True),
                           _run_chunk(op, 9, 30, bf16_matmul=False))


@pytest.mark.parametrize(("hq", "hkv", "d", "block_size", "max_ctx"), [
    (9, 3, 64, 16, 300),  # the default model's heads
    (9, 3, 64, 16, 2500),  # contexts past 1,024 keys, attended in parts (attention.c)
    (4, 4, 32, 16, 40),  # one tile of d, one query head per KV head
    (8, 1, 128, 32, 70),  # two column passes of P V; 32-slot blocks
    (6, 2, 96, 64, 33),  # a pass of 4 columns and one of 2
    (16, 1, 64, 16, 20),  # the widest group the tiles take
])
def test_decode_attention_bf16_matmul_within_bf16_rounding(hq: int, hkv: int, d: int,
                                                           block_size: int, max_ctx: int) -> None:
    """bf16_matmul=True on a bf16 cache: where AMX runs, within 2^-16 of the largest |V| of the
    float64 reference (the chunk test's bound: Q and P in two bf16 parts each), elsewhere the
    fp32 path's numbers; other rows untouched; thread counts change no bit."""
    op = _paged(torch.bfloat16, num_seqs=7, hq=hq, hkv=hkv, d=d, block_size=block_size,
                max_ctx=max_ctx, seed=hq + d)
    op["context_lens"][0] = 1  # one key: its weight is exactly 1 either way
    out = _decode(op, bf16_matmul=True)
    bound = 2.0**-16 * float(op["v_cache"].abs().max())
    assert float((out[op["q_rows"]].double() - _decode_reference(op)).abs().max()) <= bound
    untouched = [r for r in range(len(out)) if r not in op["q_rows"].tolist()]
    assert (out[untouched] == 7.0).all()
    assert torch.equal(_with_threads(1, lambda: _decode(op, True)),
                       _with_threads(2, lambda: _decode(op, True)))
    fp32 = _decode(op)
    first = op["q_rows"][0]
    assert torch.equal(out[first], fp32[first])
    assert torch.equal(out, fp32) == (not native.amx_granted())


def test_decode_attention_bf16_matmul_needs_tiles_that_fit() -> None:
    """bf16_matmul leaves fp32 arithmetic where the tiles cannot run: an fp16 cache, d not a
    multiple of 32, blocks of fewer than 16 slots, more than 16 query heads per KV head."""
    for dtype, hq, d, block_size in ((torch.float16, 4, 64, 16), (torch.bfloat16, 4, 48, 16),
                                     (torch.bfloat16, 4, 64, 8), (torch.bfloat16, 17, 32, 16)):
        op = _paged(dtype, num_seqs=3, hq=hq, hkv=1, d=d, block_size=block_size, max_ctx=50,
                    seed=5)
        assert torch.equal(_decode(op, bf16_matmul=True), _decode(op))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_decode_attention_16_bit_is_thread_count_invariant(dtype: torch.dtype) -> None:
    op = _paged(dtype, num_seqs=16, hq=9, hkv=3, d=64, block_size=16, max_ctx=300, seed=1)
    assert torch.equal(_with_threads(1, lambda: _decode(op)), _with_threads(2, lambda: _decode(op)))


def test_declines_and_refuses() -> None:
    op = _paged(torch.bfloat16, num_seqs=3, hq=4, hkv=2, d=16, block_size=16, max_ctx=40, seed=3)
    q, kc, vc = op["q"], op["k_cache"], op["v_cache"]
    assert native.attention_support(q, kc, vc) == (True, True)
    assert not native.decode_attention_supported(q.bfloat16(), kc, vc)  # queries stay fp32
    assert not native.decode_attention_supported(q, kc, vc.half())  # keys and values alike
    int8 = torch.zeros(kc.shape, dtype=torch.int8)
    assert not native.decode_attention_supported(q, int8, int8)
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    assert not native.kv_write(2, k.bfloat16(), v.bfloat16(), kc, vc, torch.tensor([0, 1]))
    assert not native.kv_write(2, k, v, kc, vc.half(), torch.tensor([0, 1]))
    before = kc.clone()
    with pytest.raises(IndexError):
        native.kv_write(2, k, v, kc, vc, torch.tensor([1, kc.shape[0] * 16]))
    assert torch.equal(kc.view(torch.int16), before.view(torch.int16))  # nothing written
    out = torch.full_like(q, 7.0)
    bad = op["block_tables"].clone()
    bad[1, 0] = len(kc)  # one past the cache
    with pytest.raises(IndexError):
        native.decode_attention(q, kc, vc, bad, torch.full((3,), 20), op["q_rows"], out, 0.25)
    with pytest.raises(IndexError):
        native.chunk_attention(q, kc, vc, bad[1], 0, slice(0, 5), out, 0.25)
    assert (out == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_run_attention_and_kv_write_with_a_16_bit_cache(dtype: torch.dtype,
                                                        cpu_kernels: str) -> None:
    """The fast path (C kernels, or ATen widening the gathered keys) against the task-by-task
    reference path, on a mixed batch: decodes, a short chunk, a long chunk."""
    arch = make_arch(num_heads=6, num_kv_heads=2, head_dim=16)
    chunks = [ChunkShape(40, 1, (0, 1, 2)), ChunkShape(0, 5, (3,)), ChunkShape(9, 1, (4,)),
              ChunkShape(16, 40, (5, 6, 7, 8))]
    kernel = lower_attention(chunks, arch, get_chip("910b2"), 16)
    gen = torch.Generator().manual_seed(0)
    t = sum(c.num_tokens for c in chunks)
    k_cache = torch.randn(9, 16, 2, 16, generator=gen).to(dtype)
    v_cache = torch.randn(9, 16, 2, 16, generator=gen).to(dtype)
    k, v = torch.randn(t, 2, 16, generator=gen), torch.randn(t, 2, 16, generator=gen)
    slots = torch.from_numpy(np.array([c.block_ids[(c.start_pos + i) // 16] * 16
                                       + (c.start_pos + i) % 16
                                       for c in chunks for i in range(c.num_tokens)]))
    write = VectorKernel(name="kv", op=VectorOp.KV_WRITE, num_rows=t, row_len=64,
                         tasks=np.array([(0, t)], dtype=VECTOR_TASK))
    strict_k, strict_v = k_cache.clone(), v_cache.clone()
    run_vector(write, True, k=k, v=v, k_cache=strict_k, v_cache=strict_v, slot_mapping=slots)
    run_vector(write, False, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
    assert torch.equal(k_cache.view(torch.int16), strict_k.view(torch.int16))
    assert torch.equal(v_cache.view(torch.int16), strict_v.view(torch.int16))
    q = torch.randn(t, 6, 16, generator=gen)
    fast = run_attention(kernel, False, q, k_cache, v_cache)
    torch.testing.assert_close(fast, run_attention(kernel, True, q, k_cache, v_cache),
                               atol=1e-5, rtol=1e-5)
