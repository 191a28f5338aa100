"""Ascend 910B-family chip presets, and chip files that override them.

Sources (the research notes ../shared/research/xyserve-ascend.md section 2 quote them):
- [INI] CANN 8.1.RC1 platform configs `Ascend910B{1,2,3,4}.ini`: core counts, cube clock, L2 size,
  per-core buffer sizes, cube fractal per dtype (`[DtypeMKN]`), vector width (`vec_calc_size`),
  and the per-core data-path rates of `[AICoreMemoryRates]`. The INI does not give their unit;
  we read them as bytes per cycle per core (then L1->L0A = 512 B/cycle is exactly one 16x16 fp16
  fractal per cycle, which is what the cube consumes).
- [MSM] Huawei's simulator msmodeling `tensor_cast/device.py`: HBM bandwidth, per-op static costs,
  per-dtype peak TFLOPS.
- [catlass] `hicann/catlass` (arch.hpp, matmul_fast_tuning.md, fai_kernel.cpp, and the
  per-core GM read rates of its kernel-selection model, examples/102_dynamic_optimized_matmul),
  [ATB] `hicann/ascend-transformer-boost` (pp_matmul tiling), [XYS] the XY-Serve paper.
- [CC1, CC2] the calibration set's measured HCCL collectives (research/npu-calibration.md): the
  only fitted constant here, hccs_efficiency.
The INI is the compiler's own description of the chip, so it wins wherever it speaks. It says
nothing of HBM bandwidth, for which MSM is the only first-party figure, nor of latencies and
overheads, for which we name the source or write down the assumption.

`get_chip(name)` picks a preset; `load_chip(path_or_name)` also reads a JSON or YAML file:
`{"base": "910b2", "hbm_bytes_per_s": 1.2e12, ...}` (base defaults to 910b2; every other key
must be a ChipSpec field, and a bad key or value is a ValueError naming the field).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True)
class ChipSpec:
    """One NPU's resources, as the lowering and the cost model see them.

    Rates are per core and per cycle of `clock_hz` unless the name says `_per_s`.
    """

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
    # --- cube throughput: MACs per cycle per AIC, per operand dtype
    cube_macs_fp16: int = 4096  # 16x16x16 MMA per cycle [INI DtypeMKN]
    cube_macs_bf16: int = 4096  # same fractal [INI]; MSM's bf16 peak 353.9 TF = 24*4096*2*1.8G
    cube_macs_int8: int = 8192  # 16x32x16 [INI DtypeMKN]
    # fp32 (hf32) on the cube: MSM lists 99.5 TF next to 353.9 bf16 (0.28x); a quarter rate is the
    # nearest fractal-shaped choice. Unused by the fp16/bf16 simulation.
    cube_macs_fp32: int = 1024
    # --- per-core data paths, bytes per cycle [INI AICoreMemoryRates unless noted]
    # GM(HBM)->L1 on one AIC. catlass's kernel-selection cost model takes an aligned GM read at
    # 80 GB/s per AIC (examples/102_dynamic_optimized_matmul select_kernel_b16.h,
    # aBandwidthAfterPaddingAic = 80, "single core GB/s"): 80e9 / 1.8e9 = 44.4 B/cycle. 24 AICs
    # then ask 1.92 TB/s, more than the HBM delivers, so a weight stream over all cores runs at
    # the HBM's rate (the device's shared bound), not at a per-core cap. The INI's ddr_rate = 32
    # (24 x 32 B x 1.8 GHz = 1.38 TB/s) would cap a full-chip stream below the HBM.
    mte2_hbm_bytes_per_cycle: float = 80e9 / 1.8e9
    # GM(HBM)->UB on one AIV [INI ddr_rate]: 48 AIVs x 32 B x 1.8 GHz = 2.8 TB/s, past the HBM too.
    aiv_mte2_hbm_bytes_per_cycle: float = 32.0
    mte2_l2_bytes_per_cycle: float = 110.0  # GM reads that hit L2 [INI l2_rate, read]
    l2_write_bytes_per_cycle: float = 86.0  # [INI l2 write rate]
    mte1_l0a_bytes_per_cycle: float = 512.0  # L1->L0A [INI l1_to_l0_a_rate]
    mte1_l0b_bytes_per_cycle: float = 256.0  # L1->L0B [INI l1_to_l0_b_rate]
    # L0C->GM through the fixpipe: the INI gives no fixpipe->GM rate. Its out-to-GM paths are
    # ub_to_ddr = ub_to_l2 = 64 and the L2 write port is 86; we take 64 (the conservative one).
    fixpipe_bytes_per_cycle: float = 64.0
    mte3_bytes_per_cycle: float = 64.0  # UB->GM [INI ub_to_ddr_rate = ub_to_l2_rate]
    # Aggregate L2 bandwidth, all traffic of all cores: ATB's matmul tiling cost model takes
    # L2 = 5x HBM (pp_matmul_info.h), 8.8 TB/s with MSM's HBM. The INI's per-core rate times the
    # AIC count (24 x 110 B x 1.8 GHz = 4.75 TB/s) is only the AICs' ports; the AIVs have their
    # own, so it is no bound on L2 itself. The per-core rates above bound each core either way.
    l2_bytes_per_s: float = 5 * 1.6 * 1024**4
    # --- overheads
    # Device-side cost per kernel launch: MSM's static per-op costs, 5 us per cube op and 2 us per
    # vector op. The attention meta-kernel is a mixed (cube-driven) kernel: the cube figure.
    cube_launch_s: float = 5e-6
    vector_launch_s: float = 2e-6
    # Scalar work per task: read its Task-Table row, compute GM offsets, issue the first copies.
    # [assumed] ~0.1 us; no figure published. XYS 7.2.1 bounds all reordering at <1% latency.
    task_dispatch_cycles: float = 200.0
    # First-byte latency of a GM read, paid once per core per kernel (the pipeline fill; later
    # tiles are prefetched by double buffering). [assumed] 0.4 us, the order of HBM load latency
    # on accelerators of this generation; no Ascend figure found.
    gm_latency_cycles: float = 720.0
    # AIC<->AIV handoff: there is no direct datapath (XYS 2.2); a CrossCoreSetFlag through a GM
    # workspace (catlass fai_kernel.cpp). [assumed] 0.2 us: about two L2 round trips.
    cross_core_sync_cycles: float = 360.0
    # Host and runtime overhead is the serving stack's, not the chip's: npu_sim.host.
    # --- interconnect: HCCS between the NPUs of one node (tensor parallelism, npu_sim.collectives)
    hccs_ranks: int = 8  # NPUs in one HCCS full mesh [MSM A2: intra-node 8-NPU full mesh]
    # [MSM] 196 GB/s unidirectional per device, spread over its 7 mesh links: 28 GB/s a link.
    hccs_link_bytes_per_s: float = 196e9 / 7
    # Achieved fraction of the link rate, fitted on CC1 + CC2: each measured plateau algbw (all-
    # reduce 18 / 30 / 72, all-gather 38 / 64 / 149 GB/s at 2 / 4 / 8 cards) implies an achieved
    # link rate (algbw x 2 / n for all-reduce, algbw / n for all-gather, in the mesh model); their
    # geometric mean is 17.4 GB/s = 0.62 x 28 (MSM assumes 0.7).
    hccs_efficiency: float = 0.62
    hccs_latency_s: float = 0.5e-6  # per ring step [MSM: 0.5 us intra-node latency]
    collective_launch_s: float = 10e-6  # per collective launch [MSM: 10 us per communication op]
    # --- interconnect between nodes: RoCE, one NIC per NPU (P/D disaggregation's KV transfers
    # across nodes, npu_sim.collectives.p2p_seconds)
    roce_bytes_per_s: float = 25e9  # per NPU [MSM A2: inter-node CLOS at 25 GB/s]
    roce_latency_s: float = 1.5e-6  # [MSM: 1.5 us inter-node latency]
    # Achieved fraction of the RoCE rate. [assumed] MSM's link efficiency, 0.7; the calibration
    # set has no inter-node measurement to fit it on.
    roce_efficiency: float = 0.7

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "name":
                if not isinstance(value, str) or not value:
                    raise ValueError("name: must be a non-empty string")
                continue
            want_int = f.type in ("int", int)
            if isinstance(value, bool) or not isinstance(value, int | float) or (
                    want_int and not isinstance(value, int)):
                raise ValueError(f"{f.name}: must be {'an integer' if want_int else 'a number'}"
                                 f", got {value!r}")
            if not math.isfinite(value) or value < 0 or (value == 0 and f.name not in _MAY_BE_0):
                raise ValueError(f"{f.name}: must be positive, got {value!r}")
        if self.num_vector_cores < self.num_cube_cores:
            raise ValueError(f"num_vector_cores: {self.name} needs at least as many vector cores "
                             f"({self.num_vector_cores}) as cube cores ({self.num_cube_cores})")
        # Hashed once: a chip keys the lowering's and tiling's caches on every launch, and the
        # generated hash would walk all its fields each time.
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    def cube_macs_per_cycle(self, dtype: str) -> int:
        """Cube MACs per cycle per AIC for operand dtype fp16 | bf16 | int8 | fp32."""
        try:
            return int(getattr(self, f"cube_macs_{dtype}"))
        except AttributeError:
            raise ValueError(f"unknown cube dtype {dtype!r} (fp16, bf16, int8, fp32)") from None

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Cube peak FLOP/s (2 per MAC) over all AICs."""
        return 2.0 * self.cube_macs_per_cycle(dtype) * self.num_cube_cores * self.clock_hz


# Overheads may be switched off (0) in an override file; sizes, counts and rates may not.
_MAY_BE_0 = frozenset({"cube_launch_s", "vector_launch_s", "task_dispatch_cycles",
                       "gm_latency_cycles", "cross_core_sync_cycles", "hccs_latency_s",
                       "collective_launch_s", "roce_latency_s"})


def _910b(name: str, num_cube_cores: int, clock_mhz: int, hbm_gib: int, l2_mib: int,
          hbm_tib_per_s: float) -> ChipSpec:
    # Everything not passed here is identical across B1-B4 in the INI files.
    return ChipSpec(
        name=name, num_cube_cores=num_cube_cores, num_vector_cores=2 * num_cube_cores,
        clock_hz=clock_mhz * 1e6, cube_m=16, cube_n=16, cube_k=16, vector_lanes=128,
        l1_bytes=512 * KIB, l0a_bytes=64 * KIB, l0b_bytes=64 * KIB, l0c_bytes=128 * KIB,
        ub_bytes=192 * KIB, l2_bytes=l2_mib * MIB, hbm_bytes=hbm_gib * GIB,
        # MSM writes 1.6 TiB/s (`1.6*1024**4`) for the 64 GiB parts, 0.8 for the 32 GiB B4 (whose
        # halved GM bandwidth pto-isa's FA model agrees with, gm_scale=2). Third-party figures
        # (0.4-1.2 TB/s) are unsourced; MSM is first-party.
        hbm_bytes_per_s=hbm_tib_per_s * 1024**4,
        l2_bytes_per_s=5 * hbm_tib_per_s * 1024**4,
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


def load_chip(source: str | Path) -> ChipSpec:
    """A preset by name, or a JSON / YAML chip file: `base` (a preset, default 910b2) plus
    ChipSpec fields to override. Errors name the offending field."""
    if isinstance(source, str) and source.lower() in PRESETS:
        return PRESETS[source.lower()]
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"unknown NPU {str(source)!r}: not a preset ({', '.join(PRESETS)}) "
                         f"nor a chip file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # PyYAML; comes with transformers

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a chip file is a mapping of ChipSpec fields")
    return override_chip(data, default_name=path.stem)


def override_chip(data: dict[str, Any], default_name: str = "custom") -> ChipSpec:
    """`data`'s fields over its `base` preset (see load_chip)."""
    data = dict(data)
    base = get_chip(str(data.pop("base", DEFAULT_CHIP)))
    names = {f.name for f in dataclasses.fields(ChipSpec)}
    for key in data:
        if key not in names:
            raise ValueError(f"{key}: not a ChipSpec field (known: {', '.join(sorted(names))})")
    data.setdefault("name", f"{base.name}+{default_name}")
    return dataclasses.replace(base, **data)
