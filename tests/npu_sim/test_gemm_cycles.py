"""The tiling search's launch cycles (npu_sim.gemm_cycles) are the device's, bit for bit, for
every candidate of decode, prefill and split-K shapes on several chips, costed alone or with
other shapes' candidates, in C and in numpy; so are the cube phases it keeps for the device
(CostModel.gemm)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pytest

import native_build
from npu_sim import cost_gemm, gemm_cycles, gemm_layout, gemm_tiling
from npu_sim.cost import CostModel
from npu_sim.cost_gemm import gemm_hbm_traffic
from npu_sim.device import Device
from npu_sim.gemm_cycles import CostedCandidates, gemm_launch_cycles, shapes_launch_cycles
from npu_sim.gemm_tiling import candidates, search_tiling, search_tilings
from npu_sim.hardware import get_chip
from npu_sim.tiling import gemm_menu

SHAPES = [(m, n, k) for m in (1, 7, 16, 33, 100, 255, 512, 777, 2048, 4100)
          for n, k in ((12288, 4096), (4096, 11008), (22016, 4096), (32000, 4096),
                       (152064, 3584), (1000, 300), (48, 30000))]


@pytest.fixture(params=["c", "numpy"])
def pricing(request: pytest.FixtureRequest) -> Iterator[str]:
    """Candidates priced by gemm_candidates.c, then by numpy (native code off)."""
    if request.param == "numpy":
        with native_build.disabled():
            yield "numpy"
        return
    if native_build.loaded(gemm_cycles._LIBRARY) is None:
        pytest.skip("no C compiler: the numpy pricing only")
    yield "c"


@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_launch_cycles_equal_the_devices(chip_name: str, pricing: str) -> None:
    chip = get_chip(chip_name)
    device, cm = Device(chip, compute=False, timeline=False), CostModel(chip)
    num_split = 0
    for m, n, k in SHAPES:
        tilings = candidates(m, n, k, chip)
        got = gemm_launch_cycles(cm, m, n, k, [(t.menu, t.cover, t.split_k) for t in tilings])
        for tiling, cycles in zip(tilings, got, strict=True):
            assert cycles == device.time(tiling.kernel("g", m, n, k, chip)).cycles, (m, n, k)
            num_split += tiling.split_k > 1
    assert num_split > 50  # the reduce phase is covered


@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_shapes_costed_together_as_alone(chip_name: str, pricing: str) -> None:
    """Several shapes' candidates in one batch: each candidate's cycles as costed alone, and
    the batched search picks what searching each shape alone picks."""
    chip = get_chip(chip_name)
    cm = CostModel(chip)
    for m in (1, 33, 512, 777, 2048):
        shapes = [(n, k) for rows, n, k in SHAPES if rows == m]
        batch = [(n, k, (t.menu, t.cover, t.split_k))
                 for n, k in shapes for t in candidates(m, n, k, chip)]
        alone = [gemm_launch_cycles(cm, m, n, k, [tiling])[0] for n, k, tiling in batch]
        assert shapes_launch_cycles(cm, m, batch) == alone, m
        gemm_tiling._SEARCHED.clear()
        together = search_tilings(m, shapes, chip)
        gemm_tiling._SEARCHED.clear()
        assert together == [search_tiling(m, n, k, chip) for n, k in shapes], m


def test_a_full_search_cache_starts_over_without_losing_a_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose shapes are part cached, part new, arriving when the cache is full: every
    tiling it returns is the one searching its shape alone gives."""
    chip = get_chip("910b2")
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    alone = [search_tiling(300, n, k, chip) for n, k in shapes]
    gemm_tiling._SEARCHED.clear()
    search_tilings(300, shapes[:2], chip)  # two cached
    monkeypatch.setattr(gemm_tiling, "_SEARCHED_LIMIT", 2)  # and the cache full
    assert search_tilings(300, shapes, chip) == alone
    assert len(gemm_tiling._SEARCHED) == 3  # started over: the batch alone


@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_cube_costs_equal_the_cost_models(chip_name: str, pricing: str) -> None:
    """Every candidate's cube phase, costed with other shapes' candidates, is CostModel.gemm of
    its kernel priced alone, field by field, bit for bit."""
    chip = get_chip(chip_name)
    cm = CostModel(chip)
    cost_gemm._KEPT_GEMMS.clear()  # CostModel.gemm below prices every kernel afresh
    for m in (1, 7, 33, 255, 777, 2048, 4100):
        batch = [(n, k, t) for rows, n, k in SHAPES if rows == m
                 for t in candidates(m, n, k, chip)]
        costed = CostedCandidates(cm, m, [(n, k, (t.menu, t.cover, t.split_k))
                                          for n, k, t in batch])
        for i, (n, k, tiling) in enumerate(batch):
            want = cm.gemm(tiling.kernel("g", m, n, k, chip))
            got = costed.cube_costs(i)
            for field in dataclasses.fields(want):
                a, b = getattr(got, field.name), getattr(want, field.name)
                assert np.array_equal(a, b) if field.name == "cycles" else a == b, (
                    m, n, k, field.name)


def test_the_device_times_a_searched_gemm_as_one_priced_afresh() -> None:
    """A kernel of a searched tiling is priced from what the search kept (bf16 weights), and
    that timing is the one of the same kernel priced afresh; a quantized one is priced
    afresh."""
    chip = get_chip("910b2")
    gemm_tiling._SEARCHED.clear()
    for m, n, k in ((3, 12288, 4096), (500, 22016, 4096), (2048, 4096, 11008)):
        kernel = search_tiling(m, n, k, chip).kernel("g", m, n, k, chip)
        assert cost_gemm._KEPT_GEMMS[id(kernel.tasks)][0] is kernel.tasks
        kept = Device(chip, compute=False, timeline=False).time(kernel)
        assert CostModel(chip).gemm(kernel) is cost_gemm._KEPT_GEMMS[id(kernel.tasks)][2]
        quantized = dataclasses.replace(kernel, weights="w8a16")
        assert CostModel(chip).gemm(quantized) is not cost_gemm._KEPT_GEMMS[id(kernel.tasks)][2]
        cost_gemm._KEPT_GEMMS.clear()
        afresh = Device(chip, compute=False, timeline=False).time(kernel)
        assert kept.step_sums.tolist() == afresh.step_sums.tolist()
        assert (kept.cycles, kept.bound, kept.block_dim) == (
            afresh.cycles, afresh.bound, afresh.block_dim)


def _blocked_hbm_traffic(cm: CostModel, m: int, n: int, k: int, menu: tuple) -> float:
    """gemm_hbm_traffic as npu_sim.cost's docstring states it, every block tried afresh:
    Mb = m or the smallest tm doubled while below m, Nb the widest multiple of the N tile L2
    holds next to Mb rows (at least one tile)."""
    b, tn = cm.bytes, menu[0].tn
    a_bytes, b_bytes = m * k * b, n * k * b
    if a_bytes + b_bytes <= cm.l2_cap:
        return float(a_bytes + b_bytes)
    rows_fit = cm.l2_cap // (k * b)
    blocks, mb = {m}, menu[-1].tm
    while mb < m:
        blocks.add(mb)
        mb *= 2
    best = min((a_bytes * math.ceil(n / nb) + b_bytes * math.ceil(m / mb)
                for mb in blocks if (nb := (rows_fit - mb) // tn * tn) >= tn), default=math.inf)
    return float(best)


@pytest.mark.parametrize("chip_name", ["910b2", "910b4"])
def test_hbm_traffic_equals_every_block_tried(chip_name: str) -> None:
    """gemm_hbm_traffic, whose power-of-two blocks are kept per (n, k, N tile), is the best
    blocking tried block by block, for every m up to past the token budget."""
    chip = get_chip(chip_name)
    cm = CostModel(chip)
    for n, k in ((12288, 4096), (4096, 11008), (152064, 8192), (1000, 300), (48, 300000)):
        for tn in (128, 176, 256):
            menu = gemm_menu(chip, tn)
            for m in (*range(1, 4200), 8191, 8192, 8193, 16384):
                assert gemm_hbm_traffic(cm, m, n, k, menu) == _blocked_hbm_traffic(
                    cm, m, n, k, menu), (m, n, k, tn)


def test_candidates_are_distinct() -> None:
    """The search lists each candidate tiling once (its covers differ, and so do a cover's
    split-K and N tile pairs): nothing to deduplicate."""
    chip = get_chip("910b2")
    for m, n, k in SHAPES:
        tilings = candidates(m, n, k, chip)
        assert len(set(tilings)) == len(tilings), (m, n, k)


def test_task_layouts_kept_from_other_token_counts_cost_as_afresh() -> None:
    """Neighbouring token counts share their covers' patterns, so a search prices most of its
    candidates with task layouts kept from earlier ones (gemm_layout.task_layout): the same
    cycles, and the same kept cube phases, as with every layout built afresh."""
    chip = get_chip("910b2")
    cm = CostModel(chip)
    shapes = ((12288, 4096), (4096, 11008))
    for m in (*range(1, 40), *range(1000, 1040), 2047, 2048):
        batch = [(n, k, (t.menu, t.cover, t.split_k))
                 for n, k in shapes for t in candidates(m, n, k, chip)]
        kept = CostedCandidates(cm, m, batch)
        gemm_layout.task_layout.cache_clear()
        afresh = CostedCandidates(cm, m, batch)
        assert kept.cycles == afresh.cycles, m
        for i in range(len(batch)):
            a, b = kept.cube_costs(i), afresh.cube_costs(i)
            for field in dataclasses.fields(a):
                x, y = getattr(a, field.name), getattr(b, field.name)
                assert np.array_equal(x, y) if field.name == "cycles" else x == y, (m, i)


def test_searches_on_plans_kept_from_other_token_counts_pick_as_afresh() -> None:
    """A search prices its token count on the plan kept for covers of the same tiles and
    patterns (gemm_tiling._PLANS): the tilings it picks, and the cube phases it keeps for the
    device, are those of a search planned afresh."""
    chip = get_chip("910b2")
    shapes = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))
    for m in (*range(1, 70), *range(990, 1100), 2040, 2047, 2048, 4100):
        gemm_tiling._SEARCHED.clear()
        kept = search_tilings(m, shapes, chip)
        kept_costs = [cost_gemm._KEPT_GEMMS[id(t.kernel("", m, n, k, chip).tasks)][2]
                      for t, (n, k) in zip(kept, shapes, strict=True)]
        gemm_tiling._SEARCHED.clear()
        gemm_tiling._PLANS.clear()
        assert search_tilings(m, shapes, chip) == kept, m
        for t, (n, k), a in zip(kept, shapes, kept_costs, strict=True):
            b = cost_gemm._KEPT_GEMMS[id(t.kernel("", m, n, k, chip).tasks)][2]
            for field in dataclasses.fields(a):
                x, y = getattr(a, field.name), getattr(b, field.name)
                assert np.array_equal(x, y) if field.name == "cycles" else x == y, (m, n)


def test_c_pricing_equals_numpys_for_every_token_count() -> None:
    """gemm_candidates.c and numpy price every candidate the same, every array bit for bit,
    over token counts up to past the budget, shapes whose L2 blocking varies (an LM head, a
    K so deep that no block fits) and split-K ones."""
    chip = get_chip("910b2")
    if native_build.loaded(gemm_cycles._LIBRARY) is None:
        pytest.skip("no C compiler: the numpy pricing only")
    cm = CostModel(chip)
    shapes = ((12288, 4096), (4096, 11008), (152064, 3584), (48, 300000), (1000, 300))
    assert math.isinf(gemm_hbm_traffic(cm, 1000, 48, 300000, gemm_menu(chip, 256)))  # (met)
    fields = ("_cycles", "_active", "_macs", "_useful", "_total", "_hbm_read", "_written",
              "_overhead")
    for m in (*range(1, 300, 7), *range(300, 4200, 97), 8192):
        batch = [(n, k, (t.menu, t.cover, t.split_k))
                 for n, k in shapes for t in candidates(m, n, k, chip)]
        in_c = CostedCandidates(cm, m, batch)
        with native_build.disabled():
            in_numpy = CostedCandidates(cm, m, batch)
        assert in_c.cycles == in_numpy.cycles, m
        for name in fields:
            assert np.array_equal(getattr(in_c, name), getattr(in_numpy, name)), (m, name)
