"""Ascend 910B-family chip presets.

Sources (see ../shared/research/xyserve-ascend.md section 2):
- [INI] CANN 8.1.RC1 platform configs `Ascend910B{1,2,3,4}.ini`: core counts, cube clock, L2 size,
  per-core buffer sizes (L1 512 KiB, L0A/L0B 64 KiB, L0C 128 KiB, UB 192 KiB), cube MKN 16x16x16,
  vector width 128 lanes (`vec_calc_size`), per-core data-path rates in bytes per cycle.
- [MSM] Huawei's msmodeling `tensor_cast/device.py`: HBM 1.6 TiB/s for the 64 GiB parts and
  0.8 TiB/s for the 32 GiB part.
The INI is the compiler's own description of the chip, so it wins wherever it speaks; it says
nothing of HBM bandwidth, for which MSM is the only first-party figure.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True)
class ChipSpec:
    """One NPU's resources, as the lowering and the cost model see them."""

    name: str  # preset name, e.g. "910b2"
    num_cube_cores: int  # AIC count [INI ai_core_cnt]
    num_vector_cores: int  # AIV count, two per AIC in split mode [INI vector_core_cnt]
    clock_hz: float  # cube/vector clock [INI cube_freq]
    cube_m: int  # cube fractal M: one MMA is cube_m x cube_k x cube_n per cycle [INI]
    cube_n: int
    cube_k: int
    vector_lanes: int  # fp16 elements per vector instruction per cycle [INI vec_calc_size]
    l1_bytes: int  # per AIC [INI l1_size]
    l0a_bytes: int  # per AIC [INI l0_a_size]
    l0b_bytes: int  # per AIC [INI l0_b_size]
    l0c_bytes: int  # per AIC, fp32 accumulators [INI l0_c_size]
    ub_bytes: int  # unified buffer per AIV [INI ub_size]
    l2_bytes: int  # shared L2 [INI l2_size]
    hbm_bytes: int  # device memory [INI memory_size]
    hbm_bytes_per_s: float  # nominal HBM bandwidth [MSM]

    def __post_init__(self) -> None:
        if self.num_cube_cores < 1 or self.num_vector_cores < self.num_cube_cores:
            raise ValueError(f"{self.name}: need >= 1 cube core and >= as many vector cores")


def _910b(name: str, num_cube_cores: int, clock_mhz: int, hbm_gib: int, l2_mib: int,
          hbm_tib_per_s: float) -> ChipSpec:
    # Everything not passed here is identical across B1-B4 in the INI files.
    return ChipSpec(
        name=name, num_cube_cores=num_cube_cores, num_vector_cores=2 * num_cube_cores,
        clock_hz=clock_mhz * 1e6, cube_m=16, cube_n=16, cube_k=16, vector_lanes=128,
        l1_bytes=512 * KIB, l0a_bytes=64 * KIB, l0b_bytes=64 * KIB, l0c_bytes=128 * KIB,
        ub_bytes=192 * KIB, l2_bytes=l2_mib * MIB, hbm_bytes=hbm_gib * GIB,
        hbm_bytes_per_s=hbm_tib_per_s * 1024**4,
    )


PRESETS: dict[str, ChipSpec] = {
    "910b1": _910b("910b1", 24, 1850, 64, 192, 1.6),
    "910b2": _910b("910b2", 24, 1800, 64, 192, 1.6),
    "910b3": _910b("910b3", 20, 1800, 64, 192, 1.6),
    "910b4": _910b("910b4", 20, 1500, 32, 96, 0.8),
}
DEFAULT_CHIP = "910b2"


def get_chip(name: str) -> ChipSpec:
    """The preset called `name` (case-insensitive); ValueError listing the presets otherwise."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown NPU {name!r}; known: {', '.join(PRESETS)}") from None
