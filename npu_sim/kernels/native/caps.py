"""What this CPU and the built C library can run fast, for the engine's `--dtype auto` and
`--weight-format auto`: the CPU's flags (/proc/cpuinfo) and the instruction-set paths compiled
into the library (xy_isa; -march=native, so the build machine's). Pure functions of those two,
so the choices are tested with fake ones (`Capabilities(...)`, `capabilities(cpuinfo=...,
isa_bits=...)`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Collection
from dataclasses import dataclass

# xy_isa's bits (gemm_pack.c)
_ISA_BITS = {1: "avx2", 2: "fma", 4: "f16c", 8: "avx512f", 16: "avx512_bf16", 32: "amx_bf16"}
_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Capabilities:
    cpu_flags: frozenset[str]  # those of _CPU_FLAGS the CPU reports
    library: bool  # the C kernels loaded
    library_isa: frozenset[str]  # the paths of _ISA_BITS compiled into them (empty: none)

    @property
    def simd_kernels(self) -> bool:
        """The library's GEMM and attention run on 256-bit FMA vectors (AVX2 + FMA + F16C):
        the weight formats decode in registers at close to the memory bound."""
        return {"avx2", "fma", "f16c"} <= self.library_isa

    @property
    def bf16_dot(self) -> bool:
        """The bf16 GEMM can take vdpbf16ps (bf16 activations allowed)."""
        return "avx512_bf16" in self.library_isa

    @property
    def native_bf16(self) -> bool:
        """The CPU computes bf16 in hardware (ATen / oneDNN bf16 then beat fp32)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)


def capabilities(cpuinfo: str | None = None, isa_bits: int | None = None) -> Capabilities:
    """This machine's (or, for tests, those of the given /proc/cpuinfo text and xy_isa bits;
    isa_bits=-1: no library)."""
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    if isa_bits is None:
        from npu_sim.kernels.native import lib

        native = lib()
        isa_bits = -1 if native is None else native.xy_isa()
    isa = frozenset(name for bit, name in _ISA_BITS.items() if isa_bits >= 0 and isa_bits & bit)
    return Capabilities(frozenset(f for f in _CPU_FLAGS if f in flags), isa_bits >= 0, isa)


def recommend_dtype(caps: Capabilities) -> str:
    """`--dtype auto`'s activation dtype: bfloat16 where the CPU computes bf16 natively (ATen's
    bf16 kernels beat its fp32 ones there), else float32 (on an AVX2-only CPU ATen's bf16 is
    ~80x slower; the C kernels keep fp32 activations with bf16 or 4-bit weights anyway)."""
    return "bfloat16" if caps.native_bf16 else "float32"


def recommend_weight_format(caps: Capabilities, available: Collection[str]) -> str:
    """`--weight-format auto` among the formats the model offers (e.g. {"fp32", "bf16",
    "q4_1"} for the default GGUF): the fewest bytes a weight where the C kernels decode them
    in registers (a decode step streams every weight once), else fp32 (ATen then computes on
    the plain weight: nothing to gain from a packed format it cannot read)."""
    if caps.simd_kernels:
        for fmt in ("q4_1", "q8_0", "bf16"):
            if fmt in available:
                return fmt
    return "fp32"
