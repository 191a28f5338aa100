"""The C kernels of the CPU fast path (npu_sim.kernels.native), called directly: the panel GEMM
against torch and the paged decode and chunk attention against the float64 reference on ragged
shapes, thread counts that must not change a bit, the operands they decline, the out-of-range
indices they refuse, and the switch that turns them off. (The vector kernels are held to the
reference path in test_fast_paths.)"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from engine.lowering import ChunkShape
from npu_sim.kernels import native
from tests.npu_sim.attention_reference import dense_attention

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the C kernels cannot be built here")


def _with_threads(n: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("m", [1, 7, 16, 17, 33, native.GEMM_MAX_ROWS])
@pytest.mark.parametrize("n", [16, 50, 300])
def test_panel_gemm_matches_linear(m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n)
    k = 129
    w = torch.randn(n, k, generator=gen) / k**0.5
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    panels = native.pack_panels(w)
    assert panels is not None
    for b in (None, bias):
        out = native.gemm(x, panels, b)
        assert out is not None and out.shape == (m, n)
        torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_panel_gemm_reads_strided_rows_and_is_thread_count_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 64, generator=gen)
    wide = torch.randn(16, 200, generator=gen)
    x = wide[:, 10:74]  # rows 200 apart
    panels = native.pack_panels(w)
    one = _with_threads(1, lambda: native.gemm(x, panels, None))
    two = _with_threads(2, lambda: native.gemm(x, panels, None))
    assert torch.equal(one, two)  # each column is computed by one thread, in one order
    torch.testing.assert_close(one, x @ w.T, atol=1e-5, rtol=1e-5)


def test_panel_gemm_declines_what_it_does_not_take() -> None:
    w = torch.randn(32, 8)
    panels = native.pack_panels(w)
    assert native.pack_panels(w.bfloat16()) is None
    assert native.gemm(torch.randn(native.GEMM_MAX_ROWS + 1, 8), panels, None) is None
    assert native.gemm(torch.randn(4, 8).bfloat16(), panels, None) is None
    assert native.gemm(torch.randn(8, 4).T, panels, None) is None  # columns not contiguous


# ----------------------------------------------------------------------------------- attention


def _paged(num_seqs: int, hq: int, hkv: int, d: int, block_size: int, max_ctx: int,
           seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, max_ctx + 1, (num_seqs,), generator=gen)
    blocks_per_seq = -(-max_ctx // block_size)
    num_blocks = num_seqs * blocks_per_seq + 3
    tables = torch.randperm(num_blocks, generator=gen)[:num_seqs * blocks_per_seq]
    return {
        "q": torch.randn(num_seqs + 2, hq, d, generator=gen),  # two rows nobody reads
        "k_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen),
        "v_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen),
        "block_tables": tables.view(num_seqs, blocks_per_seq).contiguous(),
        "context_lens": ctx,
        "q_rows": torch.randperm(num_seqs + 2, generator=gen)[:num_seqs],
    }


def _dense(op: dict[str, torch.Tensor]) -> torch.Tensor:
    """The shared float64 reference, one single-token chunk per sequence, in sequence order."""
    bs = op["k_cache"].shape[1]
    chunks = [ChunkShape(int(ctx) - 1, 1, tuple(table.tolist()))
              for ctx, table in zip(op["context_lens"], op["block_tables"], strict=True)]
    return dense_attention(chunks, op["q"][op["q_rows"]], op["k_cache"], op["v_cache"], bs)


@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 16), (9, 3, 64), (8, 1, 128), (6, 2, 40)])
def test_decode_attention_matches_the_dense_reference(hq: int, hkv: int, d: int) -> None:
    op = _paged(num_seqs=7, hq=hq, hkv=hkv, d=d, block_size=16, max_ctx=150, seed=hq + d)
    out = torch.full_like(op["q"], 7.0)
    native.decode_attention(op["q"], op["k_cache"], op["v_cache"], op["block_tables"],
                            op["context_lens"], op["q_rows"], out, d**-0.5)
    expected = _dense(op).float()  # (scale 1 / sqrt(D), as above)
    torch.testing.assert_close(out[op["q_rows"]], expected, atol=1e-5, rtol=1e-5)
    untouched = [r for r in range(len(out)) if r not in op["q_rows"].tolist()]
    assert (out[untouched] == 7.0).all()


def test_decode_attention_is_thread_count_invariant() -> None:
    op = _paged(num_seqs=16, hq=9, hkv=3, d=64, block_size=16, max_ctx=300, seed=1)

    def run() -> torch.Tensor:
        out = torch.empty_like(op["q"])
        native.decode_attention(op["q"], op["k_cache"], op["v_cache"], op["block_tables"],
                                op["context_lens"], op["q_rows"], out, 0.125)
        return out[op["q_rows"]]

    assert torch.equal(_with_threads(1, run), _with_threads(2, run))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_long_decodes_are_attended_in_parts_on_every_thread(cache_dtype: torch.dtype) -> None:
    """Contexts past 256 keys are attended in parts whose partial sums are merged (fp32
    arithmetic): the dense reference's numbers, whatever the thread count."""
    op = _paged(num_seqs=3, hq=9, hkv=3, d=64, block_size=16, max_ctx=1600, seed=5)
    op["context_lens"] = torch.tensor([1537, 257, 200])  # 7 parts, 2, and one piece
    op["k_cache"], op["v_cache"] = op["k_cache"].to(cache_dtype), op["v_cache"].to(cache_dtype)

    def run() -> torch.Tensor:
        out = torch.empty_like(op["q"])
        native.decode_attention(op["q"], op["k_cache"], op["v_cache"], op["block_tables"],
                                op["context_lens"], op["q_rows"], out, 0.125,
                                bf16_matmul=False)
        return out[op["q_rows"]]

    one = _with_threads(1, run)
    assert torch.equal(one, _with_threads(2, run))
    dense = {**op, "k_cache": op["k_cache"].float(), "v_cache": op["v_cache"].float()}
    torch.testing.assert_close(one, _dense(dense).float(), atol=1e-5, rtol=1e-5)


def test_decode_attention_supported_operands() -> None:
    op = _paged(num_seqs=2, hq=4, hkv=2, d=16, block_size=16, max_ctx=20, seed=2)
    q, kc, vc = op["q"], op["k_cache"], op["v_cache"]
    assert native.decode_attention_supported(q, kc, vc)
    assert not native.decode_attention_supported(q.bfloat16(), kc.bfloat16(), vc.bfloat16())
    assert not native.decode_attention_supported(q[..., :12], kc[..., :12], vc[..., :12])
    odd_blocks = torch.randn(4, 12, 2, 16)  # block size not a power of two
    assert not native.decode_attention_supported(q, odd_blocks, odd_blocks)
    with pytest.raises(ValueError):
        native.decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), op["block_tables"],
                                op["context_lens"], op["q_rows"], torch.empty_like(q), 0.25)


def test_decode_attention_refuses_out_of_range_indices() -> None:
    op = _paged(num_seqs=3, hq=4, hkv=2, d=16, block_size=16, max_ctx=40, seed=3)
    out = torch.full_like(op["q"], 7.0)
    args = (op["q"], op["k_cache"], op["v_cache"])
    bad_table = op["block_tables"].clone()
    bad_table[1, 0] = len(op["k_cache"])  # one past the cache
    too_long = op["block_tables"].shape[1] * 16 + 1
    for tables, ctx in ((bad_table, torch.full((3,), 20)),
                        (op["block_tables"], torch.tensor([1, too_long, 1]))):
        with pytest.raises(IndexError):
            native.decode_attention(*args, tables, ctx, op["q_rows"], out, 0.25)
    assert (out == 7.0).all()  # refused before anything was written


def _chunk_op(hq: int, hkv: int, d: int, block_size: int, start_pos: int, q_len: int,
              seed: int) -> dict[str, torch.Tensor]:
    """One sequence's chunk: rows 3 .. 3 + q_len of q (rows around it nobody reads), its keys
    in scattered blocks of a larger cache."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-(start_pos + q_len) // block_size)
    pool = 2 * num_blocks + 3
    return {
        "q": torch.randn(q_len + 5, hq, d, generator=gen),
        "k_cache": torch.randn(pool, block_size, hkv, d, generator=gen),
        "v_cache": torch.randn(pool, block_size, hkv, d, generator=gen),
        "table": torch.randperm(pool, generator=gen)[:num_blocks].contiguous(),
    }


def _chunk(op: dict[str, torch.Tensor], start_pos: int, q_len: int) -> torch.Tensor:
    out = torch.full_like(op["q"], 7.0)
    native.chunk_attention(op["q"], op["k_cache"], op["v_cache"], op["table"], start_pos,
                           slice(3, 3 + q_len), out, op["q"].shape[-1] ** -0.5)
    return out


@pytest.mark.parametrize(("hq", "hkv", "d", "block_size", "start_pos", "q_len"), [
    (4, 4, 16, 16, 0, 33),  # a first chunk, ragged last row tile
    (9, 3, 64, 16, 0, 150),
    (9, 3, 64, 16, 100, 70),  # a later chunk: every row sees the earlier keys too
    (8, 1, 128, 32, 37, 40),  # key tiles across block boundaries, prefix not tile-aligned
    (6, 2, 32, 8, 5, 16),
    (9, 3, 64, 16, 0, 3),  # a short prompt: fewer rows than a row tile
    (4, 2, 32, 16, 40, 5),  # a verify's few rows after a long context
])
def test_chunk_attention_matches_the_dense_reference(hq: int, hkv: int, d: int, block_size: int,
                                                     start_pos: int, q_len: int) -> None:
    op = _chunk_op(hq, hkv, d, block_size, start_pos, q_len, seed=hq + d + q_len)
    out = _chunk(op, start_pos, q_len)
    chunk = ChunkShape(start_pos, q_len, tuple(op["table"].tolist()))
    expected = dense_attention([chunk], op["q"][3:3 + q_len], op["k_cache"], op["v_cache"],
                               block_size).float()
    torch.testing.assert_close(out[3:3 + q_len], expected, atol=1e-5, rtol=1e-5)
    assert (out[:3] == 7.0).all() and (out[3 + q_len:] == 7.0).all()


def test_chunk_attention_is_thread_count_invariant() -> None:
    op = _chunk_op(9, 3, 64, 16, 40, 100, seed=5)
    assert torch.equal(_with_threads(1, lambda: _chunk(op, 40, 100)),
                       _with_threads(2, lambda: _chunk(op, 40, 100)))


def test_chunk_attention_declines_and_refuses() -> None:
    op = _chunk_op(4, 2, 16, 16, 10, 40, seed=6)
    q, kc, vc = op["q"], op["k_cache"], op["v_cache"]
    assert native.chunk_attention_supported(q, kc, vc)
    assert not native.chunk_attention_supported(q[..., :8], kc[..., :8], vc[..., :8])  # D % 16
    wide, one_kv = torch.randn(2, 130, 16), kc[:, :, :1].contiguous()  # 130 heads share 1
    assert native.decode_attention_supported(wide, one_kv, one_kv)
    assert not native.chunk_attention_supported(wide, one_kv, one_kv)
    with pytest.raises(ValueError):
        native.chunk_attention(q, kc, vc, op["table"].int(), 10, slice(0, 40),
                               torch.empty_like(q), 0.25)
    out = torch.full_like(q, 7.0)
    bad_table = op["table"].clone()
    bad_table[-1] = len(kc)  # one past the cache
    # the table holds 4 blocks (64 positions): 25 + 40 reaches one past it
    for table, start_pos in ((bad_table, 10), (op["table"], 25)):
        with pytest.raises(IndexError):
            native.chunk_attention(q, kc, vc, table, start_pos, slice(0, 40), out, 0.25)
    assert (out == 7.0).all()  # refused before anything was written


def test_kv_write_refuses_a_slot_outside_the_cache() -> None:
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    assert native.kv_write(2, k, v, k_cache, v_cache, torch.tensor([11, 0]))
    assert torch.equal(k_cache.view(-1, 2, 8)[11], k[0]) and torch.equal(v_cache[0, 0], v[1])
    with pytest.raises(IndexError):
        native.kv_write(2, k, v, k_cache, v_cache, torch.tensor([1, 12]))


# -------------------------------------------------------------------------------------- switch


def _lib_is_none_in_a_process_with(env: dict[str, str]) -> tuple[bool, str]:
    code = "from npu_sim.kernels import native; print(native.lib() is None)"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=root,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True", done.stderr


def test_disabled_block_and_environment_switch_them_off() -> None:
    with native.disabled():
        assert native.lib() is None and native.pack_panels(torch.randn(4, 4)) is None
    assert native.lib() is not None
    assert _lib_is_none_in_a_process_with({"XYSERVE_NATIVE_KERNELS": "0"})[0]


def test_without_a_compiler_the_fast_path_stays_on_aten(tmp_path: pathlib.Path) -> None:
    none, stderr = _lib_is_none_in_a_process_with({"CC": str(tmp_path / "no-such-cc"),
                                                   "XDG_CACHE_HOME": str(tmp_path)})
    assert none and "without the CPU fast path's C kernels" in stderr


# -------------------------------------------------------------------------------------- argmax


def test_argmax_rows_is_torch_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1000, generator=gen)
    x[1, 5] = x[1, 900] = 50.0  # a tie: the first wins
    x[2, :] = float("-inf")  # nothing finite: index 0
    x[3, 999] = 99.0  # the last column
    x[4, 10], x[4, 20] = float("nan"), float("nan")  # NaN is the maximum, the first NaN wins
    x[5, 3], x[5, 700] = float("inf"), float("inf")
    x[6, 0] = float("nan")  # in the first vectors
    x[7, 998] = float("nan")  # in the tail
    for rows in (x, x[:, :-1], x[:, 1:], x[::2], x[:, :20], x[:, 37:70]):
        # ragged widths (the tail, and rows shorter than the vectors), offsets, row strides
        assert torch.equal(native.argmax_rows(rows), rows.argmax(dim=-1))
    assert native.argmax_rows(torch.randn(2, 3, 4)) is None
    assert native.argmax_rows(x.to(torch.float64)) is None
    assert native.argmax_rows(x.t()) is None  # no unit inner stride


def test_argmax_rows_breaks_ties_like_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    for cols in (1, 31, 32, 33, 64, 100, 333):
        x = torch.randint(0, 4, (16, cols), generator=gen).float()  # ties everywhere
        assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1)), cols


def _allowed_cpus(task: pathlib.Path) -> set[int]:
    """The CPUs a thread of this process may run on, from /proc (its Cpus_allowed_list)."""
    for line in (task / "status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cpus: set[int] = set()
            for part in line.split(":", 1)[1].strip().split(","):
                first, _, last = part.partition("-")
                cpus.update(range(int(first), int(last or first) + 1))
            return cpus
    raise AssertionError(f"no Cpus_allowed_list in {task}/status")


def test_pin_team_pins_each_thread_of_the_callers_team_to_its_own_cpu() -> None:
    """On a thread of its own (its team, pinned, goes with it): the caller on the first usable
    CPU, a thread of its team on each of the others; another thread count pins nothing; the
    process's other threads keep their CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    seen: dict[str, object] = {}

    def run() -> None:
        seen["mismatch"] = native.pin_team(len(cpus) + 1)
        seen["unchanged"] = os.sched_getaffinity(0)
        seen["pinned"] = native.pin_team(len(cpus))
        seen["caller"] = os.sched_getaffinity(0)  # (0: the calling thread, on Linux)
        seen["threads"] = [_allowed_cpus(t) for t in pathlib.Path("/proc/self/task").iterdir()]

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["mismatch"] is False and seen["unchanged"] == set(cpus)
    assert seen["pinned"] is True and seen["caller"] == {cpus[0]}
    threads = seen["threads"]
    assert isinstance(threads, list)
    for cpu in cpus[1:]:
        assert {cpu} in threads
    assert os.sched_getaffinity(0) == set(cpus)
