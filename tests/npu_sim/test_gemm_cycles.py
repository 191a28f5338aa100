"""The tiling search's launch cycles (npu_sim.gemm_cycles) are the device's, bit for bit, for
every candidate of decode, prefill and split-K shapes on several chips, costed alone or with
other shapes' candidates."""

from __future__ import annotations

import pytest

from npu_sim import gemm_tiling
from npu_sim.cost import CostModel
from npu_sim.device import Device
from npu_sim.gemm_cycles import gemm_launch_cycles, shapes_launch_cycles
from npu_sim.gemm_tiling import candidates, search_tiling, search_tilings
from npu_sim.hardware import get_chip

SHAPES = [(m, n, k) for m in (1, 7, 16, 33, 100, 255, 512, 777, 2048, 4100)
          for n, k in ((12288, 4096), (4096, 11008), (22016, 4096), (32000, 4096),
                       (152064, 3584), (1000, 300), (48, 30000))]


@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
def test_launch_cycles_equal_the_devices(chip_name: str) -> None:
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
def test_shapes_costed_together_as_alone(chip_name: str) -> None:
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
