"""Chip presets and chip files (JSON / YAML overrides of a preset)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from npu_sim.hardware import GIB, KIB, MIB, PRESETS, get_chip, load_chip


def test_presets_carry_the_ini_numbers() -> None:
    expect = {"910b1": (24, 1850e6, 64 * GIB, 192 * MIB),
              "910b2": (24, 1800e6, 64 * GIB, 192 * MIB),
              "910b3": (20, 1800e6, 64 * GIB, 192 * MIB),
              "910b4": (20, 1500e6, 32 * GIB, 96 * MIB)}
    for name, (aic, clock, hbm, l2) in expect.items():
        c = get_chip(name)
        assert (c.num_cube_cores, c.num_vector_cores, c.clock_hz, c.hbm_bytes, c.l2_bytes) == (
            aic, 2 * aic, clock, hbm, l2)
        assert (c.l1_bytes, c.l0a_bytes, c.l0b_bytes, c.l0c_bytes, c.ub_bytes) == (
            512 * KIB, 64 * KIB, 64 * KIB, 128 * KIB, 192 * KIB)
        assert c.cube_macs_per_cycle("fp16") == 4096 and c.cube_macs_per_cycle("int8") == 8192
    assert get_chip("910B4").hbm_bytes_per_s == get_chip("910b2").hbm_bytes_per_s / 2
    assert load_chip("910b3") is PRESETS["910b3"]


def test_unknown_names_are_value_errors() -> None:
    with pytest.raises(ValueError, match="910b9"):
        get_chip("910b9")
    with pytest.raises(ValueError, match="not a preset"):
        load_chip("no-such-chip")
    with pytest.raises(ValueError, match="unknown cube dtype"):
        get_chip("910b2").cube_macs_per_cycle("fp8")


def test_json_file_overrides_its_base(tmp_path: Path) -> None:
    path = tmp_path / "slow.json"
    path.write_text(json.dumps({"base": "910b3", "hbm_bytes_per_s": 1.0e12, "cube_launch_s": 0}))
    chip = load_chip(path)
    base = get_chip("910b3")
    assert chip.hbm_bytes_per_s == 1.0e12 and chip.cube_launch_s == 0
    assert chip.num_cube_cores == base.num_cube_cores and chip.name == "910b3+slow"
    assert chip != base


def test_yaml_file_overrides_and_defaults_to_910b2(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: big\nnum_cube_cores: 32\nnum_vector_cores: 64\n")
    chip = load_chip(str(path))
    assert (chip.name, chip.num_cube_cores, chip.clock_hz) == ("big", 32, 1.8e9)


@pytest.mark.parametrize("override,field", [
    ({"hbm_bandwidth": 1e12}, "hbm_bandwidth"),  # not a field
    ({"num_cube_cores": 0}, "num_cube_cores"),
    ({"num_cube_cores": 2.5}, "num_cube_cores"),
    ({"clock_hz": "fast"}, "clock_hz"),
    ({"mte2_hbm_bytes_per_cycle": -1}, "mte2_hbm_bytes_per_cycle"),
    ({"num_vector_cores": 4}, "num_vector_cores"),  # fewer than the cube cores
    ({"cube_launch_s": True}, "cube_launch_s"),
])
def test_bad_overrides_name_the_field(tmp_path: Path, override: dict, field: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"base": "910b2", **override}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {field}:"):  # file, field
        load_chip(path)


def test_a_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        load_chip(path)
