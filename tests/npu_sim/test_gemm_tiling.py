"""GEMM tiling per shape (npu_sim.gemm_tiling): whole waves, masked remainder tiles, split-K
and its reduce phase, the M cover at the lowest modelled cost, the ATB pp_matmul port; and the
functional path on split-K task tables."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npu_sim.cost import CostModel
from npu_sim.device import Device
from npu_sim.gemm_tiling import GemmTiling, atb_tiling, candidates, search_tiling
from npu_sim.hardware import get_chip
from npu_sim.kernels import run_gemm
from npu_sim.tasks import TileShape
from npu_sim.tiling import cover_m, gemm_menu, gemm_reduce_tasks, gemm_tasks, k_slices
from npu_sim.trace import write_perfetto

B2 = get_chip("910b2")  # 24 AIC
B3 = get_chip("910b3")  # 20 AIC


def seconds(tiling: GemmTiling, m: int, n: int, k: int, chip=B2) -> float:
    return Device(chip, compute=False).time(tiling.kernel("g", m, n, k, chip)).seconds


def output_cover(kernel) -> np.ndarray:
    """How many tasks of each K slice write each output element: (split_k, m, n)."""
    count = np.zeros((kernel.split_k, kernel.m, kernel.n), dtype=np.int64)
    for m0, rows, n0, cols, _, _, _, split in kernel.tasks.tolist():
        count[max(split, 0), m0:m0 + rows, n0:n0 + cols] += 1
    return count


# ------------------------------------------------------------------------- whole waves

@pytest.mark.parametrize("chip,tn,last_cols", [(B2, 176, 4096 - 23 * 176),
                                               (B3, 208, 4096 - 19 * 208)])
def test_decode_gemm_fills_every_core_in_one_wave_with_a_masked_last_tile(chip, tn, last_cols):
    """N = 4096 in 256-wide tiles is 16 tasks: 8 of 24 AICs idle. The search re-tiles N so the
    tasks are one whole wave, the last tile masked (not a second pass of a few tiles)."""
    kernel = search_tiling(1, 4096, 4096, chip).kernel("o_proj", 1, 4096, 4096, chip)
    assert len(kernel.tasks) == chip.num_cube_cores and kernel.split_k == 1
    assert kernel.menu[0].tn == tn and sorted(kernel.tasks["n_cols"])[0] == last_cols
    assert (output_cover(kernel) == 1).all()
    fixed = GemmTiling(gemm_menu(chip), tuple(cover_m(1, gemm_menu(chip))), 1)
    assert len(fixed.kernel("o", 1, 4096, 4096, chip).tasks) == 16
    launch = chip.cube_launch_s  # the same for both
    assert seconds(search_tiling(1, 4096, 4096, chip), 1, 4096, 4096, chip) - launch < 0.9 * (
        seconds(fixed, 1, 4096, 4096, chip) - launch)


@pytest.mark.parametrize("m,n,k", [(1, 12288, 4096), (16, 22016, 4096), (100, 28672, 8192),
                                   (2048, 4096, 4096), (1, 152064, 3584)])
def test_task_counts_come_in_near_whole_waves(m: int, n: int, k: int) -> None:
    """The chosen tiling wastes under a tenth of a wave's slots (its last wave is >= 90% full or
    it has many waves), and is never slower than the fixed 256-wide greedy tiling."""
    tiling = search_tiling(m, n, k, B2)
    tasks = len(tiling.kernel("g", m, n, k, B2).tasks)
    waves = -(-tasks // B2.num_cube_cores)
    assert tasks / (waves * B2.num_cube_cores) >= 0.9 or waves >= 10
    fixed = GemmTiling(gemm_menu(B2), tuple(cover_m(m, gemm_menu(B2))), 1)
    assert seconds(tiling, m, n, k) <= seconds(fixed, m, n, k) * (1 + 1e-9)


def test_decode_weight_stream_reaches_the_hbm_rate() -> None:
    """A decode GEMM over all AICs streams its weight at >= 90% of the HBM's rate (the per-core
    GM rate no longer caps it), and never above it."""
    n, k = 22016, 4096
    t = seconds(search_tiling(1, n, k, B2), 1, n, k) - B2.cube_launch_s
    assert 0.9 * B2.hbm_bytes_per_s <= 2.0 * n * k / t <= B2.hbm_bytes_per_s


# ----------------------------------------------------------------------------- split-K

def test_k_slices_follow_catlass_block_split() -> None:
    """catlass MultiCoreSplitkMatmul: K = 10240 in 256-deep blocks (40) over 3 slices is
    14, 13, 13 blocks; the last slice ends at K even when K is ragged."""
    assert [n // 256 for _, n in k_slices(10240, 3)] == [14, 13, 13]
    assert k_slices(1000, 2) == [(0, 512), (512, 488)]
    with pytest.raises(ValueError):
        k_slices(512, 3)


def test_small_output_deep_k_splits_k_and_reduces_on_the_vector_cores() -> None:
    m, n, k = 16, 256, 8192  # one 16 x 256 output tile: without split-K one AIC does it all
    tiling = search_tiling(m, n, k, B2)
    kernel = tiling.kernel("g", m, n, k, B2)
    assert kernel.split_k > 1 and kernel.reduce_tasks is not None
    cover = output_cover(kernel)
    assert (cover == 1).all(), "every slice writes every output element once"
    for split in range(kernel.split_k):  # each slice's tasks span its K range
        rows = kernel.tasks[kernel.tasks["k_split"] == split]
        assert len(set(rows["k_start"].tolist())) == len(set(rows["k_len"].tolist())) == 1
    assert kernel.tasks["k_len"][kernel.tasks["n_start"] == 0].sum() == k
    reduce = kernel.reduce_tasks
    assert reduce["elem_start"][0] == 0 and reduce["num_elems"].sum() == m * n
    assert (reduce["elem_start"][1:] == np.cumsum(reduce["num_elems"])[:-1]).all()
    timing = Device(B2, compute=False).time(kernel)
    on_aiv = timing.task_unit == 1
    assert on_aiv.sum() == len(reduce) and timing.vector_busy_cycles.any()
    # the reduce phase starts after every partial is written
    assert timing.task_start_cycles[on_aiv].min() >= timing.task_start_cycles[~on_aiv].max()
    unsplit = GemmTiling(tiling.menu, tiling.cover, 1)
    launch = B2.cube_launch_s
    assert timing.seconds - launch < 0.5 * (seconds(unsplit, m, n, k) - launch)


def test_reduce_phase_costs_time_and_keeps_partials_in_l2() -> None:
    m, n, k = 16, 256, 8192
    split = search_tiling(m, n, k, B2).kernel("g", m, n, k, B2)
    cm = CostModel(B2)
    cube, reduce = cm.gemm(split), cm.gemm_reduce(split)
    partials = split.split_k * m * n * 4  # fp32, written by the cube tasks, read by the reduce
    assert cube.hbm_write_bytes == 0 and reduce.hbm_write_bytes == m * n * 2
    assert reduce.l2_bytes == partials and cube.l2_bytes >= partials
    assert reduce.core_overhead_cycles >= B2.cross_core_sync_cycles  # the all-core sync
    timing = Device(B2, compute=False).time(split)
    assert timing.hbm_write_bytes == pytest.approx(m * n * 2)  # only the reduced output
    no_reduce = dataclasses.replace(split, reduce_tasks=None)
    assert Device(B2, compute=False).time(no_reduce).cycles < timing.cycles


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,n,k,split", [(3, 100, 1000, 2), (17, 300, 777, 3), (1, 64, 2048, 8)])
def test_split_k_reference_matches_fast_and_torch(m: int, n: int, k: int, split: int,
                                                  bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 31 + n + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    menu = gemm_menu(B2, 64)
    tiling = GemmTiling(menu, tuple(cover_m(m, menu)), split)
    kernel = tiling.kernel("g", m, n, k, B2)
    assert kernel.split_k == split and (output_cover(kernel) == 1).all()
    strict = run_gemm(kernel, True, x=x, w=w, bias=b)
    fast = run_gemm(kernel, False, x=x, w=w, bias=b)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    torch.testing.assert_close(strict, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


def test_search_tilings_run_correctly_through_the_device() -> None:
    """Whatever the search picks (split-K or not), the strict path computes the product."""
    device = Device(B2, strict=True)
    for m, n, k in ((1, 512, 4096), (5, 96, 6000), (40, 700, 300)):
        kernel = search_tiling(m, n, k, B2).kernel("g", m, n, k, B2)
        x, w = torch.randn(m, k), torch.randn(n, k) / k**0.5
        out = device.launch(kernel, x=x, w=w)
        torch.testing.assert_close(out, x @ w.T, atol=1e-5, rtol=1e-5)


def test_reduce_tasks_split_the_output_over_the_vector_cores() -> None:
    tasks = gemm_reduce_tasks(64, 4096, B2)
    assert len(tasks) == B2.num_vector_cores and tasks["num_elems"].sum() == 64 * 4096
    tiny = gemm_reduce_tasks(1, 100, B2)  # at least 64 fp32 elements per AIV (catlass)
    assert tiny["num_elems"].tolist() == [64, 36]


# ---------------------------------------------------------------------------- M cover

def test_m_cover_is_chosen_by_modelled_cost_not_greedily() -> None:
    """M = 200: greedy is 128 + 64 + 16 (three weight streams); the search also costs 2 x 128
    (last masked) and 1 x 256 and takes the cheapest, here never the greedy three-tile cover."""
    m, n, k = 200, 12288, 4096
    tiling = search_tiling(m, n, k, B2)
    assert len(tiling.cover) < 3
    assert sum(rows for _, rows, _ in tiling.cover) == m
    costs = {len(t.cover): seconds(t, m, n, k) for t in candidates(m, n, k, B2)
             if t.split_k == 1}
    assert seconds(tiling, m, n, k) <= min(costs.values()) * (1 + 1e-9)
    assert costs[3] > seconds(tiling, m, n, k)


def test_gemm_task_table_with_split_k_is_cached_and_read_only() -> None:
    menu = gemm_menu(B2)
    a, b = gemm_tasks(16, 256, 4096, menu, None, 4), gemm_tasks(16, 256, 4096, menu, None, 4)
    assert a is b and not a.flags.writeable
    assert a["k_split"].tolist() == [0, 1, 2, 3] and a["k_len"].sum() == 4096


# --------------------------------------------------------------------------- ATB port

@pytest.mark.parametrize("m,n,k,tile", [
    (1, 4096, 4096, (16, 176)),  # one M tile, 16 % 24 < 18 -> N re-split over the cores
    (1, 12288, 4096, (16, 256)),  # 48 tiles: 48 % 24 = 0 -> re-split, but 512 overflows L1
    (4096, 4096, 4096, (128, 256)),  # least 1/n0 + 1/m0 with m0 x n0 fp32 in L0C
    (200, 12288, 4096, (208, 128)),  # m0 = RoundUp(200, 16) after the re-split
])
def test_atb_pp_matmul_tiling(m: int, n: int, k: int, tile: tuple[int, int]) -> None:
    tiling = atb_tiling(m, n, k, B2)
    assert (tiling.menu[0].tm, tiling.tn) == tile and tiling.split_k == 1
    assert (output_cover(tiling.kernel("g", m, n, k, B2)) == 1).all()


def test_split_k_launch_exports_to_perfetto(tmp_path: Path) -> None:
    device = Device(B2, compute=False)
    device.begin_step()
    device.launch(search_tiling(16, 256, 8192, B2).kernel("down_proj", 16, 256, 8192, B2))
    events = json.loads(write_perfetto(device.end_step(), tmp_path / "t.json").read_text())
    names = {e["name"].split()[0] for e in events["traceEvents"] if e.get("ph") == "X"}
    assert names == {"gemm", "gemm-reduce"}


def _greedy_cover(m: int, menu: tuple[TileShape, ...]) -> list[tuple[int, int, int]]:
    """cover_m tile by tile: the first menu tile of at most the rows left (else the last),
    masked to them."""
    cover, start = [], 0
    while start < m:
        fitting = [i for i, t in enumerate(menu) if t.tm <= m - start]
        tile = fitting[0] if fitting else len(menu) - 1
        cover.append((start, min(menu[tile].tm, m - start), tile))
        start += cover[-1][1]
    return cover


def test_cover_m_lays_full_tiles_then_covers_the_rest_tile_by_tile() -> None:
    """cover_m lays the full tiles of the first menu shape at once: the cover of taking the
    tiles one by one, for every token count up to past the budget, on the menus of several N
    tiles and on a menu not sorted largest first."""
    chip = get_chip("910b2")
    menus = [gemm_menu(chip, tn) for tn in (64, 128, 176, 256)]
    menus.append((TileShape(64, 128, 64), TileShape(128, 128, 64), TileShape(16, 128, 64)))
    for menu in menus:
        for m in range(0, 9000):
            assert cover_m(m, menu) == _greedy_cover(m, menu), (m, menu)
