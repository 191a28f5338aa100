"""Perfetto / Chrome trace-event export of a StepTrace."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from benchmarks.kernels.harness import time_step
from engine.arch import ModelArch
from engine.arch_presets import get_arch
from engine.lowering import BASELINE_POLICY
from npu_sim.hardware import get_chip
from npu_sim.trace import write_perfetto

B2 = get_chip("910b2")
LLAMA_2_LAYERS = dataclasses.replace(get_arch("llama-2-7b"), num_layers=2)  # 7B widths, fast
SPECS = [(0, 300), (120, 1), (900, 1), (40, 1)]


def _load(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert isinstance(doc["traceEvents"], list)
    return doc


def _used_cores(step) -> set[int]:
    """tids of the cores the step's launches kept busy: AIC c -> c, AIV v -> 24 + v."""
    cube = {int(c) for c in np.flatnonzero(step.cube_busy_s)}
    vector = {B2.num_cube_cores + int(v) for v in np.flatnonzero(step.vector_busy_s)}
    return cube | vector


def test_perfetto_json_has_one_track_per_core_used(tmp_path: Path) -> None:
    step = time_step(LLAMA_2_LAYERS, SPECS, B2)
    doc = _load(write_perfetto(step, tmp_path / "sub" / "step.json"))
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["tid"] for e in slices} == set(names) == _used_cores(step)
    assert len(names) == B2.num_cube_cores + B2.num_vector_cores  # this step uses every core
    assert names[0] == "AIC 0" and names[B2.num_cube_cores] == "AIV 0"
    assert all(e["pid"] == 0 and e["dur"] > 0 and e["ts"] >= 0 for e in slices)
    assert {e["cat"] for e in slices} == {"gemm", "vector", "attention"}
    assert any(e["name"].startswith("gemm qkv_proj 128x256x4096") for e in slices)
    assert any(e["name"].startswith("attention q128") for e in slices)
    end_us = max(e["ts"] + e["dur"] for e in slices)
    assert end_us <= step.device_s * 1e6 + 1e-3  # timestamps are rounded to 0.1 ns
    # slices on one core never overlap
    for tid in names:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == tid)
        assert all(a[1] <= b[0] + 1e-3 for a, b in itertools.pairwise(spans))


def test_a_small_step_uses_few_tracks(tmp_path: Path) -> None:
    small = ModelArch("LlamaForCausalLM", 2, 96, 6, 2, 16, 200, 1000, 1e-6, 4096, True, False,
                      (2,), 1)
    arch_step = time_step(small, [(10, 1)], B2, block_size=16)  # one token: a few tasks each
    doc = _load(write_perfetto(arch_step, tmp_path / "one.json"))
    tids = {e["tid"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert tids == _used_cores(arch_step)
    assert len(tids) < B2.num_cube_cores + B2.num_vector_cores


def test_baseline_trace_names_both_attention_kernels(tmp_path: Path) -> None:
    step = time_step(LLAMA_2_LAYERS, SPECS, B2, policy=BASELINE_POLICY)
    doc = _load(write_perfetto(step, tmp_path / "base.json"))
    kernels = {e["args"]["kernel"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert {"prefill_attention", "decode_attention", "qkv_proj_pad"} <= kernels


def test_summed_step_traces_are_what_the_constructor_builds() -> None:
    """summed_step_trace builds StepTraces field by field without the frozen __init__: every
    field set, the same values, and frozen all the same."""
    import pytest

    from npu_sim.host import DEFAULT_STACK, get_stack
    from npu_sim.trace import StepTrace, summed_step_trace

    chip = get_chip("910b2")
    sums = np.arange(7 + chip.num_cube_cores + chip.num_vector_cores, dtype=np.float64) + 1.0
    trace = summed_step_trace(chip.name, chip.clock_hz, get_stack(DEFAULT_STACK), 3,
                              chip.num_cube_cores, 3e14, sums, 10, {"gemm": 1e-3})
    fields = {f.name: getattr(trace, f.name) for f in dataclasses.fields(StepTrace)}
    assert set(vars(trace)) == set(fields)
    rebuilt = StepTrace(**fields)
    for name, value in fields.items():
        expected = getattr(rebuilt, name)
        assert (np.array_equal(value, expected) if isinstance(value, np.ndarray)
                else value == expected), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        trace.sim_s = 0.0  # type: ignore[misc]
