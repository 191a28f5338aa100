"""The capability probe (npu_sim.kernels.native.caps) on fake CPUs and builds: which instruction-
set paths it reads, and the dtype and weight format it recommends from them; and that the C
kernels run on torch's own OpenMP runtime (one libgomp in the process, so no second pool of
threads spins against torch's)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from npu_sim.kernels import native
from npu_sim.kernels.native.caps import (
    Capabilities,
    capabilities,
    recommend_dtype,
    recommend_weight_format,
)

ZEN2 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2\n"
SAPPHIRE_RAPIDS = ("flags\t\t: avx avx2 fma f16c avx512f avx512bw avx512_bf16 amx_tile amx_bf16 "
                   "amx_int8\n")
ALL_FORMATS = ("fp32", "bf16", "q4_1", "q8_0")


def test_reads_cpu_flags_and_library_bits() -> None:
    caps = capabilities(cpuinfo=ZEN2, isa_bits=1 | 2 | 4)
    assert caps.cpu_flags == {"avx2", "fma", "f16c"} and caps.library
    assert caps.library_isa == {"avx2", "fma", "f16c"}
    assert caps.simd_kernels and not caps.bf16_dot and not caps.native_bf16
    spr = capabilities(cpuinfo=SAPPHIRE_RAPIDS, isa_bits=1 | 2 | 4 | 8 | 16 | 32)
    assert spr.bf16_dot and spr.native_bf16 and "amx_bf16" in spr.library_isa
    none = capabilities(cpuinfo=ZEN2, isa_bits=-1)
    assert not none.library and not none.library_isa and not none.simd_kernels
    assert capabilities(cpuinfo="", isa_bits=0).cpu_flags == frozenset()


@pytest.mark.parametrize(("cpuinfo", "isa_bits", "dtype", "fmt"), [
    (ZEN2, 1 | 2 | 4, "float32", "q4_1"),  # AVX2: 4-bit weights, fp32 activations
    (SAPPHIRE_RAPIDS, 1 | 2 | 4 | 8 | 16 | 32, "bfloat16", "q4_1"),
    (ZEN2, 0, "float32", "fp32"),  # a build without SIMD decodes slowly: plain weights
    (ZEN2, -1, "float32", "fp32"),  # no C kernels: ATen on the plain weight
    (SAPPHIRE_RAPIDS, -1, "bfloat16", "fp32"),
])
def test_recommendations(cpuinfo: str, isa_bits: int, dtype: str, fmt: str) -> None:
    caps = capabilities(cpuinfo=cpuinfo, isa_bits=isa_bits)
    assert recommend_dtype(caps) == dtype
    assert recommend_weight_format(caps, ALL_FORMATS) == fmt


def test_weight_format_among_those_the_model_offers() -> None:
    caps = Capabilities(frozenset({"avx2"}), True, frozenset({"avx2", "fma", "f16c"}))
    assert recommend_weight_format(caps, ("fp32", "bf16")) == "bf16"  # a safetensors model
    assert recommend_weight_format(caps, ("fp32",)) == "fp32"


def test_this_machine() -> None:
    caps = native.capabilities()
    assert caps.library == (native.lib() is not None)
    if caps.library:
        assert caps.library_isa == capabilities(isa_bits=native.lib().xy_isa()).library_isa


@pytest.mark.skipif(native.lib() is None, reason="the C kernels cannot be built here")
def test_one_openmp_runtime_in_the_process() -> None:
    """The C kernels' parallel regions run on the libgomp torch loaded (see gemm.c)."""
    panels = native.pack_panels(torch.randn(512, 64))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native.gemm(torch.randn(4, 64), panels, None)  # a parallel region
    finally:
        torch.set_num_threads(before)
    maps = pathlib.Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc here")
    runtimes = {line.split()[-1] for line in maps.read_text().splitlines()
                if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes
