"""GEMM and vector primitives: the task-by-task reference path (strict) against the fast path,
both against plain torch/float64 math, and the task tables they run (cover, masks, tiles);
plus how the Device routes and counts launches."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.kernels import run_gemm, run_vector
from npu_sim.tasks import GEMM_TASK, VECTOR_TASK, GemmKernel, Primitive, VectorKernel, VectorOp
from npu_sim.tiling import ACCUM_BYTES, VECTOR_BUFFERS, cover_m, gemm_menu, gemm_tasks
from npu_sim.tiling import vector_tasks as tile_vector_tasks

CHIP = get_chip("910b2")
MENU = gemm_menu(CHIP)
SMALL_CHIP = dataclasses.replace(CHIP, num_cube_cores=2, num_vector_cores=4)


def gemm_kernel(m: int, n: int, k: int, menu=MENU) -> GemmKernel:
    return GemmKernel(name="test", m=m, n=n, k=k, menu=menu, tasks=gemm_tasks(m, n, k, menu))


def vector_kernel(op: VectorOp, rows: int, row_len: int, chip=CHIP) -> VectorKernel:
    return VectorKernel(
        name="test",
        op=op,
        num_rows=rows,
        row_len=row_len,
        tasks=tile_vector_tasks(rows, row_len, chip),
    )


def coverage_count(tasks: np.ndarray, m: int, n: int) -> np.ndarray:
    """How many GEMM tasks write each output element."""
    count = np.zeros((m, n), dtype=np.int64)
    for m_start, m_rows, n_start, n_cols, *_ in tasks.tolist():
        count[m_start : m_start + m_rows, n_start : n_start + n_cols] += 1
    return count


# ------------------------------------------------------------------------------------- GEMM

GEMM_MS = [1, 15, 16, 17, 200, 513, int(np.random.default_rng(0).integers(1, 601))]
GEMM_NKS = [(960, 576), (100, 64), (256, 100), (300, 129)]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", GEMM_NKS, ids=[f"n{n}k{k}" for n, k in GEMM_NKS])
@pytest.mark.parametrize("m", GEMM_MS)
def test_gemm_strict_matches_fast_and_torch(m: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    kernel = gemm_kernel(m, n, k)
    strict = run_gemm(kernel, True, x=x, w=w, bias=b)
    fast = run_gemm(kernel, False, x=x, w=w, bias=b)
    expected = (x.double() @ w.double().T + (b.double() if bias else 0)).float()
    assert strict.shape == fast.shape == (m, n)
    tol = 1e-5 * math.sqrt(k) * 4  # |x w| ~ sqrt(k): ~1e-4 relative to the magnitude
    torch.testing.assert_close(strict, fast, atol=tol, rtol=1e-5)
    torch.testing.assert_close(strict, expected, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "fast"])
@pytest.mark.parametrize("m,n,k", [(1, 960, 64), (17, 100, 576), (200, 960, 100), (513, 300, 64)])
def test_gemm_virtual_padding_writes_only_the_output_view(
    m: int, n: int, k: int, strict: bool
) -> None:
    gen = torch.Generator().manual_seed(m + n + k)
    x, w, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n)
    buf = torch.full((m + 16, n + 16), math.nan)
    out = buf[:m, :n]
    result = run_gemm(gemm_kernel(m, n, k), strict, x=x, w=w, bias=b, out=out)
    assert result.data_ptr() == out.data_ptr(), "must write into the given out view"
    assert not torch.isnan(buf[:m, :n]).any(), "every valid output element written"
    assert torch.isnan(buf[m:, :]).all() and torch.isnan(buf[:, n:]).all(), (
        "masked rows / columns of the edge tiles leaked into memory"
    )
    torch.testing.assert_close(buf[:m, :n], F.linear(x, w, b), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_low_precision_strict_matches_fast(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    m, n, k = 37, 300, 192
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    kernel = gemm_kernel(m, n, k)
    strict = run_gemm(kernel, True, x=x, w=w)
    fast = run_gemm(kernel, False, x=x, w=w)
    assert strict.dtype == fast.dtype == dtype
    expected = (x.double() @ w.double().T).to(dtype)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(strict, expected, atol=4 * eps, rtol=4 * eps)
    torch.testing.assert_close(fast, expected, atol=4 * eps, rtol=4 * eps)


@pytest.mark.parametrize("m", [*range(1, 70), 127, 128, 129, 200, 255, 256, 257, 513, 600, 1000])
@pytest.mark.parametrize("n", [1, 100, 256, 960, 1000])
def test_gemm_tasks_cover_output_exactly_once(m: int, n: int) -> None:
    tasks = gemm_tasks(m, n, 64, MENU)
    assert tasks.dtype == GEMM_TASK
    tm = np.array([MENU[t].tm for t in tasks["tile"]])
    tn = np.array([MENU[t].tn for t in tasks["tile"]])
    assert (tasks["m_rows"] >= 1).all() and (tasks["m_rows"] <= tm).all()
    assert (tasks["n_cols"] >= 1).all() and (tasks["n_cols"] <= tn).all()
    assert (coverage_count(tasks, m, n) == 1).all(), "overlap or gap in the output cover"
    # the M cover never pads M: only the last m-tile may be masked, by less than one cube fractal
    m_tiles = sorted({(s, r, t) for s, r, _, _, t, *_ in tasks.tolist()})
    assert sum(r for _, r, _ in m_tiles) == m
    masked = [MENU[t].tm - r for _, r, t in m_tiles if MENU[t].tm > r]
    assert len(masked) <= 1 and all(pad < CHIP.cube_m for pad in masked)
    if masked:
        assert m_tiles[-1][1] < MENU[m_tiles[-1][2]].tm


def test_cover_of_200_is_128_64_16_with_8_valid_rows() -> None:
    assert [(MENU[t].tm, rows) for _, rows, t in cover_m(200, MENU)] == [
        (128, 128),
        (64, 64),
        (16, 8),
    ]
    assert [start for start, _, _ in cover_m(200, MENU)] == [0, 128, 192]
    tasks = gemm_tasks(200, 960, 64, MENU)
    last_m = tasks[tasks["m_start"] == 192]
    assert (last_m["m_rows"] == 8).all() and {MENU[t].tm for t in last_m["tile"]} == {16}
    assert sorted(tasks["n_cols"][tasks["m_start"] == 0].tolist()) == [192, 256, 256, 256]


def test_cover_small_m_uses_smallest_tile() -> None:
    assert cover_m(1, MENU) == [(0, 1, len(MENU) - 1)]
    assert cover_m(0, MENU) == []
    assert len(gemm_tasks(0, 960, 64, MENU)) == 0


@pytest.mark.parametrize(
    "m,n,expected",
    [
        # one 16x256 tile, 1 x 256 valid
        (1, 256, 1 - 1 / 16),
        # full tiles only
        (128, 512, 0.0),
        # rows 128 + 64 + 16(8 valid); cols 3 x 256 + 256(192 valid)
        (200, 960, 1 - (200 * 960) / ((128 + 64 + 16) * 4 * 256)),
        # rows 16(15 valid); cols 256(100 valid)
        (15, 100, 1 - (15 * 100) / (16 * 256)),
    ],
)
def test_gemm_padding_waste_by_hand(m: int, n: int, expected: float) -> None:
    assert gemm_kernel(m, n, 64).padding_waste == pytest.approx(expected)


def test_gemm_task_tables_are_cached_and_read_only() -> None:
    a, b = gemm_tasks(200, 960, 64, MENU), gemm_tasks(200, 960, 64, MENU)
    assert a is b
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a["m_rows"][0] = 1


def test_gemm_reference_runs_only_its_tasks() -> None:
    """A task table covering part of the output writes only that part (selective write)."""
    m, n, k = 40, 512, 64
    tasks = np.array([(16, 16, 256, 100, len(MENU) - 1, 0, k, -1)], dtype=GEMM_TASK)
    kernel = GemmKernel(name="partial", m=m, n=n, k=k, menu=MENU, tasks=tasks)
    x, w = torch.randn(m, k), torch.randn(n, k)
    out = torch.full((m, n), math.nan)
    run_gemm(kernel, True, x=x, w=w, out=out)
    written = ~torch.isnan(out)
    assert written[16:32, 256:356].all() and written.sum() == 16 * 100
    torch.testing.assert_close(out[16:32, 256:356], x[16:32] @ w[256:356].T, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------- vector

T, H, INTER, HQ, HKV, D = 37, 48, 40, 6, 2, 16
NB, BS = 12, 8


def _rope_tables(positions: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([positions.double()[:, None] * inv_freq] * 2, dim=-1)
    return emb.cos().float(), emb.sin().float()


def _vector_case(op: VectorOp, rows: int, seed: int) -> dict:
    """Fresh operands of `op` for `rows` rows; in-place operands laid out as the model has them."""
    gen = torch.Generator().manual_seed(seed)
    if op is VectorOp.EMBED:
        return {
            "table": torch.randn(50, H, generator=gen),
            "token_ids": torch.randint(0, 50, (rows,), generator=gen),
        }
    if op is VectorOp.RMSNORM:
        return {
            "x": torch.randn(rows, H, generator=gen) * 3,
            "weight": torch.randn(H, generator=gen),
            "eps": 1e-5,
        }
    if op is VectorOp.ADD_RMSNORM:
        return {
            "x": torch.randn(rows, H, generator=gen),
            "residual": torch.randn(rows, H, generator=gen),
            "weight": torch.randn(H, generator=gen),
            "eps": 1e-6,
        }
    if op is VectorOp.SILU_MUL:
        return {"gate_up": torch.randn(rows, 2 * INTER, generator=gen)}
    qkv = torch.randn(rows, (HQ + 2 * HKV) * D, generator=gen)
    q = qkv[:, : HQ * D].view(rows, HQ, D)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(rows, HKV, D)
    v = qkv[:, (HQ + HKV) * D :].view(rows, HKV, D)
    if op is VectorOp.ROPE:
        positions = torch.randint(0, 4000, (rows,), generator=gen)
        cos, sin = _rope_tables(positions, D)
        return {"q": q, "k": k, "cos": cos, "sin": sin, "_qkv": qkv}
    assert op is VectorOp.KV_WRITE
    slots = torch.randperm(NB * BS, generator=gen)[:rows]
    return {
        "k": k,
        "v": v,
        "k_cache": torch.randn(NB, BS, HKV, D, generator=gen),
        "v_cache": torch.randn(NB, BS, HKV, D, generator=gen),
        "slot_mapping": slots,
        "_qkv": qkv,
    }


def _run(kernel: VectorKernel, strict: bool, case: dict) -> torch.Tensor | None:
    return run_vector(kernel, strict, **{k: v for k, v in case.items() if not k.startswith("_")})


def _clone(case: dict) -> dict:
    """Deep copy keeping views views (q, k, v re-derived from the cloned qkv)."""
    new = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    if "_qkv" in case:
        qkv = new["_qkv"]
        rows = qkv.shape[0]
        views = {
            "q": qkv[:, : HQ * D].view(rows, HQ, D),
            "k": qkv[:, HQ * D : (HQ + HKV) * D].view(rows, HKV, D),
            "v": qkv[:, (HQ + HKV) * D :].view(rows, HKV, D),
        }
        new.update({name: view for name, view in views.items() if name in case})
    return new


def _rms64(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).float()


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _expected(op: VectorOp, case: dict) -> dict[str, torch.Tensor]:
    """Independent float64 math for `op` on `case` (not yet run): {name: expected tensor}."""
    if op is VectorOp.EMBED:
        return {"out": case["table"][case["token_ids"]]}
    if op is VectorOp.RMSNORM:
        return {"out": _rms64(case["x"], case["weight"], case["eps"])}
    if op is VectorOp.ADD_RMSNORM:
        res = case["residual"].double() + case["x"].double()
        return {"out": _rms64(res, case["weight"], case["eps"]), "residual": res.float()}
    if op is VectorOp.SILU_MUL:
        g, u = case["gate_up"].double().chunk(2, dim=-1)
        return {"out": (g * torch.sigmoid(g) * u).float()}
    if op is VectorOp.ROPE:
        c, s = case["cos"].double()[:, None], case["sin"].double()[:, None]
        q, k = case["q"].double(), case["k"].double()
        qkv = case["_qkv"].clone()
        qkv[:, : HQ * D] = (q * c + _rotate_half(q) * s).reshape(len(q), -1).float()
        qkv[:, HQ * D : (HQ + HKV) * D] = (k * c + _rotate_half(k) * s).reshape(len(k), -1).float()
        return {"_qkv": qkv}
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    for r, slot in enumerate(case["slot_mapping"].tolist()):
        kc[slot // BS, slot % BS] = case["k"][r]
        vc[slot // BS, slot % BS] = case["v"][r]
    return {"k_cache": kc, "v_cache": vc, "_qkv": case["_qkv"].clone()}


def _row_len(op: VectorOp) -> int:
    return {
        VectorOp.SILU_MUL: 2 * INTER,
        VectorOp.ROPE: (HQ + HKV) * D,
        VectorOp.KV_WRITE: 2 * HKV * D,
    }.get(op, H)


@pytest.mark.parametrize("rows", [1, 5, T])
@pytest.mark.parametrize("op", list(VectorOp), ids=lambda op: op.value)
def test_vector_strict_matches_fast_and_reference(op: VectorOp, rows: int) -> None:
    kernel = vector_kernel(op, rows, _row_len(op), SMALL_CHIP)
    if rows > SMALL_CHIP.num_vector_cores:
        assert len(kernel.tasks) > 1, "test must exercise several row tiles"
    base = _vector_case(op, rows, seed=rows)
    expected = _expected(op, base)
    strict_case, fast_case = _clone(base), _clone(base)
    strict_out = _run(kernel, True, strict_case)
    fast_out = _run(kernel, False, fast_case)
    if "out" in expected:
        assert strict_out is not None and fast_out is not None
        torch.testing.assert_close(strict_out, fast_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(strict_out, expected["out"], atol=1e-5, rtol=1e-5)
    else:
        assert strict_out is None and fast_out is None
    for name, want in expected.items():
        if name == "out":
            continue
        # in-place operands updated identically on both paths, and correctly
        torch.testing.assert_close(strict_case[name], fast_case[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(strict_case[name], want, atol=1e-5, rtol=1e-5)
    for name, value in base.items():  # pure inputs untouched
        if isinstance(value, torch.Tensor) and name not in expected and name not in {"q", "k", "v"}:
            assert torch.equal(strict_case[name], value), name
            assert torch.equal(fast_case[name], value), name


@pytest.mark.parametrize("op", list(VectorOp), ids=lambda op: op.value)
def test_vector_task_touches_only_its_rows(op: VectorOp) -> None:
    """Strict run of a table covering rows [2, 5) and [9, 12) of 16: other rows untouched."""
    rows = 16
    covered = torch.zeros(rows, dtype=torch.bool)
    covered[2:5] = covered[9:12] = True
    tasks = np.array([(2, 3), (9, 3)], dtype=VECTOR_TASK)
    kernel = VectorKernel(name="partial", op=op, num_rows=rows, row_len=_row_len(op), tasks=tasks)
    base = _vector_case(op, rows, seed=11)
    expected = _expected(op, base)
    case = _clone(base)
    out = _run(kernel, True, case)
    if "out" in expected:
        torch.testing.assert_close(out[covered], expected["out"][covered], atol=1e-5, rtol=1e-5)
    if op is VectorOp.ADD_RMSNORM:
        assert torch.equal(case["residual"][~covered], base["residual"][~covered])
        torch.testing.assert_close(case["residual"][covered], expected["residual"][covered])
    if op is VectorOp.ROPE:
        assert torch.equal(case["_qkv"][~covered], base["_qkv"][~covered])
        torch.testing.assert_close(case["_qkv"][covered], expected["_qkv"][covered])
    if op is VectorOp.KV_WRITE:
        assert torch.equal(case["_qkv"], base["_qkv"])
        written = set(base["slot_mapping"][covered].tolist())
        for name in ("k_cache", "v_cache"):
            flat, flat0 = case[name].view(NB * BS, -1), base[name].view(NB * BS, -1)
            want = expected[name].view(NB * BS, -1)
            for slot in range(NB * BS):
                assert torch.equal(flat[slot], want[slot] if slot in written else flat0[slot])


@pytest.mark.parametrize("chip", [CHIP, SMALL_CHIP], ids=["910b2", "4aiv"])
@pytest.mark.parametrize("row_len", [1, 48, 896, 4864, 8192, 20000])
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 47, 48, 49, 200, 1000])
def test_vector_tasks_cover_rows_once_within_ub(rows: int, row_len: int, chip) -> None:
    tasks = tile_vector_tasks(rows, row_len, chip)
    assert tasks.dtype == VECTOR_TASK and not tasks.flags.writeable
    count = np.zeros(rows, dtype=np.int64)
    for start, num in tasks.tolist():
        assert num >= 1
        count[start : start + num] += 1
    assert (count == 1).all()
    ub_rows = chip.ub_bytes // (row_len * ACCUM_BYTES * VECTOR_BUFFERS)
    if ub_rows >= 1:  # a row that alone overflows UB still gets a task of its own
        assert (tasks["num_rows"] <= ub_rows).all()
        if ub_rows * chip.num_vector_cores >= rows:  # fits in one wave: spread over the cores
            assert len(tasks) <= chip.num_vector_cores
    else:
        assert (tasks["num_rows"] == 1).all()


# ---------------------------------------------------------------------------------- device


def test_device_counts_launches_and_tasks_per_primitive() -> None:
    device = Device(SMALL_CHIP)
    g = gemm_kernel(200, 960, 64)
    v = vector_kernel(VectorOp.SILU_MUL, T, 2 * INTER, SMALL_CHIP)
    x, w = torch.randn(200, 64), torch.randn(960, 64)
    device.launch(g, x=x, w=w)
    device.launch(g, x=x, w=w)
    device.launch(v, gate_up=torch.randn(T, 2 * INTER))
    assert device.num_launches == {Primitive.GEMM: 2, Primitive.VECTOR: 1}
    assert device.num_tasks == {Primitive.GEMM: 2 * len(g.tasks), Primitive.VECTOR: len(v.tasks)}


def test_device_rejects_a_non_kernel_with_type_error_and_counts_nothing() -> None:
    device = Device(CHIP)
    with pytest.raises(TypeError, match="not a kernel: object"):
        device.launch(object())
    assert not device.num_launches and not device.num_tasks


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "fast"])
def test_device_strict_flag_picks_the_path(strict: bool) -> None:
    """The reference path runs only the task table; the fast path computes the whole output.
    A kernel whose table covers part of its output tells them apart without monkeypatching."""
    m, n, k = 32, 512, 64
    tasks = np.array([(0, 16, 0, 256, len(MENU) - 1, 0, k, -1)], dtype=GEMM_TASK)
    kernel = GemmKernel(name="partial", m=m, n=n, k=k, menu=MENU, tasks=tasks)
    device = Device(CHIP, strict=strict)
    out = torch.full((m, n), math.nan)
    device.launch(kernel, x=torch.randn(m, k), w=torch.randn(n, k), out=out)
    assert int((~torch.isnan(out)).sum()) == (16 * 256 if strict else m * n)
    assert device.num_tasks[Primitive.GEMM] == 1


def test_device_strict_and_fast_give_equal_results() -> None:
    strict_dev, fast_dev = Device(CHIP, strict=True), Device(CHIP)
    g = gemm_kernel(17, 100, 576)
    x, w, b = torch.randn(17, 576), torch.randn(100, 576), torch.randn(100)
    torch.testing.assert_close(
        strict_dev.launch(g, x=x, w=w, bias=b),
        fast_dev.launch(g, x=x, w=w, bias=b),
        atol=1e-4,
        rtol=1e-5,
    )
    case = _vector_case(VectorOp.ADD_RMSNORM, T, seed=5)
    kernel = vector_kernel(VectorOp.ADD_RMSNORM, T, H)
    a, b2 = _clone(case), _clone(case)
    torch.testing.assert_close(strict_dev.launch(kernel, **a), fast_dev.launch(kernel, **b2))
    torch.testing.assert_close(a["residual"], b2["residual"])
    assert strict_dev.num_tasks == fast_dev.num_tasks
    assert (
        strict_dev.num_launches == fast_dev.num_launches == {Primitive.GEMM: 1, Primitive.VECTOR: 1}
    )
