"""`--dtype auto` and `--weight-format auto`: the fastest path this CPU has, measured once per
CPU model (and cached), among the candidates its instruction sets allow; explicit choices kept.
The CPU and the measurements are faked here; the real probe runs once at the end."""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine.arch_presets import get_arch
from engine.config import EngineConfig
from engine.platform import Candidate, candidates, choose_fast_path, probe_seconds
from npu_sim.kernels.native.caps import Capabilities

ARCH = get_arch("llama-2-7b")
AVX2 = Capabilities(frozenset({"avx2", "fma", "f16c"}), True, frozenset({"avx2", "fma", "f16c"}))
AMX = Capabilities(frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"}),
                   True, frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_bf16"}))
NO_C = Capabilities(frozenset({"avx2"}), False, frozenset())


class FakeClock:
    """Seconds per candidate, counting how often each is measured."""

    def __init__(self, seconds: dict[Candidate, float]) -> None:
        self.seconds = seconds
        self.calls: list[Candidate] = []

    def __call__(self, candidate: Candidate, arch: object) -> float:
        self.calls.append(candidate)
        return self.seconds[candidate]


def test_candidates_follow_the_instruction_sets() -> None:
    assert candidates(AVX2, ships_quantized=True) == [("float32", "fp32"), ("float32", "gguf")]
    assert candidates(AVX2, ships_quantized=False) == [("float32", "fp32")]
    assert candidates(NO_C, ships_quantized=True) == [("float32", "fp32")]
    assert candidates(AMX, ships_quantized=False) == [
        ("float32", "fp32"), ("float32", "bf16"), ("bfloat16", "bf16")]
    assert ("float32", "gguf+bf16") in candidates(AMX, ships_quantized=True)


@pytest.mark.parametrize(("caps", "times", "expected"), [
    (AVX2, {("float32", "fp32"): 0.020, ("float32", "gguf"): 0.006}, (torch.float32, "gguf")),
    (AVX2, {("float32", "fp32"): 0.005, ("float32", "gguf"): 0.006}, (torch.float32, "fp32")),
    (AMX, {("float32", "fp32"): 0.020, ("float32", "gguf"): 0.009, ("float32", "bf16"): 0.004,
           ("float32", "gguf+bf16"): 0.005, ("bfloat16", "bf16"): 0.003},
     (torch.bfloat16, "bf16")),
    (AMX, {("float32", "fp32"): 0.020, ("float32", "gguf"): 0.009, ("float32", "bf16"): 0.002,
           ("float32", "gguf+bf16"): 0.0025, ("bfloat16", "bf16"): 0.003},
     (torch.float32, "bf16")),
    (AMX, {("float32", "fp32"): 0.020, ("float32", "gguf"): 0.009, ("float32", "bf16"): 0.002,
           ("float32", "gguf+bf16"): 0.0015, ("bfloat16", "bf16"): 0.003},
     (torch.float32, "gguf+bf16")),
])
def test_auto_takes_the_fastest_measured(tmp_path: pathlib.Path, caps: Capabilities,
                                         times: dict[Candidate, float],
                                         expected: tuple[torch.dtype, str]) -> None:
    clock = FakeClock(times)
    fast = choose_fast_path(EngineConfig(), ARCH, True, clock, caps, tmp_path / "probe.json")
    assert (fast.dtype, fast.weight_format) == expected
    # auto: bf16 beside bf16 weights, else the activation dtype
    assert fast.kv_cache_dtype == (torch.bfloat16 if "bf16" in expected[1] else expected[0])
    assert "measured" in fast.reason
    # measured once per CPU model: a second engine reads the cached verdict
    again = choose_fast_path(EngineConfig(), ARCH, True, clock, caps, tmp_path / "probe.json")
    assert (again.dtype, again.weight_format) == expected
    assert len(clock.calls) == len(times)


def test_explicit_choices_are_kept(tmp_path: pathlib.Path) -> None:
    clock = FakeClock({("float32", "fp32"): 0.02, ("float32", "gguf"): 0.001})
    cache = tmp_path / "probe.json"
    fp32 = choose_fast_path(EngineConfig(weight_format="fp32"), ARCH, True, clock, AVX2, cache)
    assert (fp32.dtype, fp32.weight_format) == (torch.float32, "fp32") and not clock.calls
    f32_auto = choose_fast_path(EngineConfig(dtype="float32"), ARCH, True, clock, AVX2, cache)
    assert f32_auto.weight_format == "gguf"  # the format is still measured
    bf16 = choose_fast_path(EngineConfig(dtype="bfloat16"), ARCH, True, clock, AVX2, cache)
    assert (bf16.dtype, bf16.weight_format) == (torch.bfloat16, "bf16")  # as asked
    # an explicit float32 never rounds the weights unless asked: bf16 is not measured
    amx_clock = FakeClock({("float32", "fp32"): 0.02, ("float32", "gguf"): 0.01})
    exact = choose_fast_path(EngineConfig(dtype="float32"), ARCH, True, amx_clock, AMX, cache)
    assert (exact.dtype, exact.weight_format) == (torch.float32, "gguf")
    rounded = choose_fast_path(EngineConfig(dtype="float32", weight_format="bf16"), ARCH, True,
                               amx_clock, AMX, cache)
    assert (rounded.dtype, rounded.weight_format) == (torch.float32, "bf16")
    kv = choose_fast_path(EngineConfig(dtype="float32", weight_format="fp32",
                                       kv_cache_dtype="float16"), ARCH, True, clock, AVX2, cache)
    assert kv.kv_cache_dtype == torch.float16
    with pytest.raises(ValueError, match="does not ship GGUF blocks"):
        choose_fast_path(EngineConfig(weight_format="gguf"), ARCH, False, clock, AVX2, cache)


def test_a_corrupt_cache_is_measured_again(tmp_path: pathlib.Path) -> None:
    cache = tmp_path / "probe.json"
    cache.write_text("{not json")
    clock = FakeClock({("float32", "fp32"): 0.02, ("float32", "gguf"): 0.01})
    assert choose_fast_path(EngineConfig(), ARCH, True, clock, AVX2, cache).weight_format == "gguf"
    assert len(clock.calls) == 2


def test_the_real_probe_times_each_candidate() -> None:
    arch = get_arch("llama-2-7b")
    small = type(arch)(**{**arch.__dict__, "hidden_size": 256, "intermediate_size": 512})
    from npu_sim.kernels.native.caps import capabilities

    more = [("float32", "bf16"), ("float32", "gguf+bf16")] if capabilities().native_bf16 else []
    for candidate in (("float32", "fp32"), ("float32", "gguf"), *more):
        seconds = probe_seconds(candidate, small)
        assert 0 < seconds < 5
