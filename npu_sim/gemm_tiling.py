"""GEMM tiling per shape: which M cover, N tile and split-K a GEMM launch runs with.

Two policies, both returning a `GemmTiling`:

- `search_tiling` (SmoothGEMM, XY-Serve's own): the lowest modelled cost over a small candidate
  set, as XY-Serve picks its tiles by offline profiling (XYS 6.3). Candidates:
  - M covers from the fixed tm menu (npu_sim.tiling.m_covers): greedy (200 = 128 + 64 + 16) or
    full tiles plus one masked remainder tile (200 = 2 x 128, 72 rows valid of the second);
  - N tiles: the default 256 and 128, and for each split the multiples of 16 that deal the tasks
    onto the cores in whole waves (N = 4096 on 24 cores: 24 tiles of 176 columns, the last one
    masked to 48, instead of 16 tiles of 256 leaving 8 cores idle), as ATB's pp_matmul re-splits
    N when one M tile leaves cores idle (`PpTilingData::SetBaseOp`) and catlass re-tiles to
    fill the 20 AICs of a 910B3 (matmul_fast_tuning.md);
  - split-K when the output tiles alone do not fill the cores: 2 .. catlass's K-dependent cap
    (MultiCoreSplitkMatmul: at most 2, 4, 8, 16 slices for K over 1k, 2k, 4k, all cores from
    12k), partials reduced on the vector cores (cost included).
  Each candidate is timed by the device's own cost model (launch, per-core makespan, shared HBM /
  L2 bounds, reduce phase), so the choice is exactly the one the simulation rewards: the
  device's cycles bit for bit, a shape's candidates costed together (npu_sim.gemm_cycles).
  The winner's cube phase comes with it and is kept for the device (CostModel.keep_gemm).
- `atb_tiling` (the baselines' torch-npu linear): a port of ATB's pp_matmul tiling
  (hicann/ascend-transformer-boost `common_tiling.h` TilingFunc / CostFunc and
  `pp_matmul_tiling.cpp` SetBaseOp): m0, n0 powers of two from 16 up to 256 with m0 x n0 fp32 in
  L0C, minimising 1 / (aCoef n0) + 1 / (bCoef m0) (a coefficient is 5, the L2:HBM bandwidth ratio,
  when its operand's stripe exceeds L2); when a single M tile leaves a quarter of the cores idle
  it re-splits N into per-core tiles. No split-K, one tile shape per launch.

Both are cached per (m, n, k, chip).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from npu_sim.cost import CostModel
from npu_sim.gemm_cycles import CostedCandidates
from npu_sim.gemm_layout import CandidateLayout, Tiling, candidate_layout, cover_layout
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import GemmKernel, TileShape
from npu_sim.tiling import (
    ACCUM_BYTES,
    GEMM_TN,
    L1_K_ALIGN,
    OPERAND_BYTES,
    MCover,
    gemm_menu,
    gemm_reduce_tasks,
    gemm_tasks,
    gemm_tk,
    m_covers,
)

_ALT_TNS = (GEMM_TN, 128)  # N tiles always tried besides the whole-wave ones
_SPLITS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48)  # split-K factors tried, within catlass's cap
ATB_L2_HBM_RATIO = 5  # ATB HardwareInfo: l2BandWidth = 5, hbmBandWidth = 1


@dataclass(frozen=True)
class GemmTiling:
    """How one GEMM shape is tiled."""

    menu: tuple[TileShape, ...]  # tile shapes (one N tile), largest tm first
    cover: MCover  # ((m_start, m_rows, menu index), ...): the M cover
    split_k: int  # K slices; 1 = none

    def kernel(self, name: str, m: int, n: int, k: int, chip: ChipSpec,
               valid_m: int | None = None) -> GemmKernel:
        """The GemmKernel of `out[m, n] = x[m, k] @ w[n, k]^T` tiled this way."""
        return GemmKernel(
            name=name, m=m, n=n, k=k, menu=self.menu,
            tasks=gemm_tasks(m, n, k, self.menu, self.cover, self.split_k), valid_m=valid_m,
            split_k=self.split_k,
            reduce_tasks=gemm_reduce_tasks(m, n, chip) if self.split_k > 1 else None)

    @property
    def tn(self) -> int:
        return self.menu[0].tn


@functools.cache
def _cost_model(chip: ChipSpec) -> CostModel:
    """What times the candidates: the device's cost model for bf16 operands."""
    return CostModel(chip)


def _round16(x: float) -> int:
    return max(16, math.ceil(x / 16) * 16)


def _split_cap(k: int, num_cores: int) -> int:
    """catlass PaddingMultiCoreSplitkMatmulB16Handler's maxSplitkFactor for depth k."""
    if k >= 12288:
        return num_cores
    return 16 if k > 4096 else 8 if k > 2048 else 4 if k > 1024 else 2


def _wave_tns(n: int, tasks_per_n_tile: int, num_cores: int, widest: int) -> set[int]:
    """N tiles up to `widest` that make (tasks_per_n_tile x N tiles) fill whole waves of the
    cores: for the wave count of `widest` tiles, one fewer and one more (and one wave), the
    widest tile fitting that many waves."""
    waves = math.ceil(tasks_per_n_tile * math.ceil(n / widest) / num_cores)
    out = set()
    for w in {1, waves - 1, waves, waves + 1}:
        n_tiles = w * num_cores // tasks_per_n_tile
        if w >= 1 and n_tiles >= 1 and _round16(n / n_tiles) <= widest:
            out.add(_round16(n / n_tiles))
    return out


@functools.cache
def _widest_tn(tm: int, chip: ChipSpec) -> int:
    """The widest N tile (a multiple of 16, at most 512) whose menu still holds tm."""
    for tn in range(512, 0, -16):
        if any(t.tm == tm for t in gemm_menu(chip, tn)):
            return tn
    return 0


# the covers of a token count serve all its GEMMs; keyed by tn (tile shapes are slow to hash)
@functools.lru_cache(maxsize=1 << 14)
def _recover(cover: MCover, tn: int, chip: ChipSpec) -> MCover | None:
    """`cover` (indices into the chip's base menu) re-indexed into the menu of N tile `tn` by
    tm; None if a tm is missing."""
    src = gemm_menu(chip, chip.cube_n)
    index = {t.tm: i for i, t in enumerate(gemm_menu(chip, tn))}
    out = []
    for start, rows, tile in cover:
        i = index.get(src[tile].tm)
        if i is None:
            return None
        out.append((start, rows, i))
    return tuple(out)


def candidates(m: int, n: int, k: int, chip: ChipSpec) -> list[GemmTiling]:
    """The tilings `search_tiling` costs (see the module docstring), simplest first."""
    return [GemmTiling(*tiling) for _, tiling in _candidates(m, n, k, chip)]


def _candidates(m: int, n: int, k: int, chip: ChipSpec) -> list[tuple[int, Tiling]]:
    """`candidates(m, n, k, chip)` as (index of the cover in `_covers(m, chip)` it re-indexes,
    (menu, cover, split_k)): what the search costs, the winner alone made a GemmTiling. Each
    is new: the covers differ, and so do a cover's (split, N tile) pairs."""
    out: list[tuple[int, Tiling]] = []
    for i, (cover, widest) in enumerate(_covers(m, chip)):
        moved: dict[int, MCover | None] = {}  # the cover in each N tile's menu
        for s, tns in _splits_and_tns(max(len(cover), 1), widest, n, k, chip):
            for tn in tns:
                if tn not in moved:
                    moved[tn] = _recover(cover, tn, chip)
                if moved[tn] is not None:
                    out.append((i, (gemm_menu(chip, tn), moved[tn], s)))
    return out


@functools.lru_cache(maxsize=1 << 10)  # the token counts of a stretch of steps
def _covers(m: int, chip: ChipSpec) -> tuple[tuple[MCover, int], ...]:
    """(M cover, the widest N tile whose menu holds all its tiles) of each candidate cover of m
    rows by the chip's base menu, as `candidates` tries them: the same for every GEMM of a token
    count."""
    base = gemm_menu(chip, chip.cube_n)  # every tm the chip's buffers allow at some N tile
    widest = [_widest_tn(tile.tm, chip) for tile in base]  # of each base tile
    return tuple((cover, min(widest[t] for t in {t for _, _, t in cover})
                  if cover else GEMM_TN) for cover in m_covers(m, base))


@functools.lru_cache(maxsize=1 << 12)
def _splits_and_tns(num_m_tiles: int, widest: int, n: int, k: int, chip: ChipSpec,
                    ) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """((split_k, N tiles widest first), ...) that `candidates` tries for a cover of
    `num_m_tiles` tiles whose widest N tile is `widest`: a function of the cover's length, so
    shared by the token counts of one tile count."""
    c = chip.num_cube_cores
    splits = [1]
    if num_m_tiles * math.ceil(n / widest) < c:  # the output tiles alone leave cores idle
        cap = min(_split_cap(k, c), -(-k // L1_K_ALIGN))
        splits += [s for s in _SPLITS if s <= cap and num_m_tiles * s <= 2 * c]
    out = []
    for s in splits:
        tns = {tn for tn in (*_ALT_TNS, widest) if tn <= widest}
        out.append((s, tuple(tn for tn in sorted(tns | _wave_tns(n, num_m_tiles * s, c, widest),
                                                 reverse=True)
                             if (tn <= _round16(n) or tn == GEMM_TN) and gemm_menu(chip, tn))))
    return tuple(out)


# Searched tilings by (m, n, k, chip), emptied when full: sized for every token count of a long
# simulation (thousands) times a model's five GEMMs.
_SEARCHED: dict[tuple[int, int, int, ChipSpec], GemmTiling] = {}
_SEARCHED_LIMIT = 1 << 15


@dataclass(frozen=True, eq=False)
class _Plan:
    """A search of GEMM shapes over covers of some tiles and patterns, whatever their valid
    rows (npu_sim.gemm_layout): its candidates' layout; each candidate's (index of the cover
    in `_covers`, N tile, split-K), to rebuild the winner's tiling; candidates per shape."""

    layout: CandidateLayout
    picks: list[tuple[int, int, int]]
    counts: list[int]


# Plans by (the token count's covers' distinct entries' tiles and patterns, the shapes, the
# chip): the Azure conversation trace (1,870 token counts, Llama-2-7B) meets 208, ~30 MB of
# layouts (their task tables' rows and bins: ~150 KB a plan). Emptied when full.
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_PLANS_LIMIT = 1 << 9


def search_tiling(m: int, n: int, k: int, chip: ChipSpec) -> GemmTiling:
    """SmoothGEMM's tiling of (m, n, k): the candidate with the lowest modelled time."""
    return search_tilings(m, ((n, k),), chip)[0]


def search_tilings(m: int, shapes: Sequence[tuple[int, int]], chip: ChipSpec,
                   ) -> list[GemmTiling]:
    """search_tiling(m, n, k, chip) of each (n, k) of `shapes`; those not searched before
    are costed together (the GEMMs of a token count: one batch of numpy calls, each
    candidate's cycles the same as alone), on the plan kept for covers of the same tiles and
    patterns: a candidate's costs depend on the token count only through its entries' valid
    rows and its launch's HBM traffic (npu_sim.gemm_layout). Cached."""
    if len(_SEARCHED) + len(shapes) > _SEARCHED_LIMIT:  # full: start over (before looking up)
        _SEARCHED.clear()
    todo = tuple((n, k) for n, k in dict.fromkeys(shapes) if (m, n, k, chip) not in _SEARCHED)
    if todo:
        covers = _covers(m, chip)
        layouts = [cover_layout(cover) for cover, _ in covers]
        entry_rows: list[int] = []  # the covers' distinct entries' valid rows, cover by cover
        entry_base = []
        for rows, _, _, _ in layouts:
            entry_base.append(len(entry_rows))
            entry_rows += rows
        key = (tuple((tiles, pattern) for _, tiles, _, pattern in layouts), todo, chip)
        plan = _PLANS.get(key)
        if plan is None:
            plan = _plan(m, todo, chip, entry_base)
            if len(_PLANS) >= _PLANS_LIMIT:
                _PLANS.clear()
            _PLANS[key] = plan
        # Device.time(tiling.kernel(...)).cycles of each, without building the kernels
        cm = _cost_model(chip)
        costed = CostedCandidates.of_layout(cm, m, plan.layout, entry_rows)
        first = 0
        for (n, k), count in zip(todo, plan.counts, strict=True):
            best = first + _cheapest(costed.cycles[first:first + count])
            cover, tn, split_k = plan.picks[best]
            tiling = _SEARCHED[m, n, k, chip] = GemmTiling(
                gemm_menu(chip, tn), _recover(covers[cover][0], tn, chip), split_k)
            # the winner's kernel priced already: its cube phase, kept for the device
            cm.keep_gemm(tiling.kernel("", m, n, k, chip), costed.cube_costs(best))
            first += count
    return [_SEARCHED[m, n, k, chip] for n, k in shapes]


def _plan(m: int, shapes: Sequence[tuple[int, int]], chip: ChipSpec,
          entry_base: Sequence[int]) -> _Plan:
    """The plan of a search of `shapes` over m rows, the distinct entries of cover i of
    `_covers(m, chip)` at entry_base[i] on in the valid rows it is priced with."""
    found = [(n, k, _candidates(m, n, k, chip)) for n, k in shapes]
    batch = [(n, k, tiling) for n, k, tilings in found for _, tiling in tilings]
    return _Plan(
        layout=candidate_layout(batch, [entry_base[i] for _, _, tilings in found
                                        for i, _ in tilings],
                                chip, _cost_model(chip).bytes),
        picks=[(i, menu[0].tn, split_k) for _, _, tilings in found
               for i, (menu, _, split_k) in tilings],
        counts=[len(tilings) for _, _, tilings in found])


def _cheapest(cycles: list[float]) -> int:
    """The index of the fewest cycles; ties (within 1e-9) keep the simpler (earlier) one."""
    best, best_cycles = -1, math.inf
    for i, tiling_cycles in enumerate(cycles):
        if tiling_cycles < best_cycles * (1 - 1e-9):
            best, best_cycles = i, tiling_cycles
    assert best >= 0
    return best


@functools.lru_cache(maxsize=1 << 15)
def atb_tiling(m: int, n: int, k: int, chip: ChipSpec,
               operand_bytes: int = OPERAND_BYTES) -> GemmTiling:
    """ATB pp_matmul's tiling of (m, n, k) (see the module docstring) for `operand_bytes`-byte
    operands (2: fp16 / bf16, 4: fp32), weight transposed (transB: w is [N, K], as a linear
    layer's)."""
    b = operand_bytes
    m0, n0 = _atb_base(m, n, k, chip, b)
    m_loop, n_loop = -(-m // m0), -(-n // n0)
    c = chip.num_cube_cores
    if m_loop == 1 and (m_loop * n_loop) % c < c // 4 * 3:  # SetBaseOp: re-split N over cores
        m_base = _round16(m)
        max_n0 = chip.l0c_bytes // (m_base * ACCUM_BYTES)
        x = -(-n // c)
        y = -(-x // max_n0)
        n_base = _round16(-(-x // y))
        if (m_base * n_base * ACCUM_BYTES < chip.l0c_bytes
                and (m_base + n_base) * L1_K_ALIGN * b < chip.l1_bytes // 2):
            m0, n0 = m_base, n_base
    tile = TileShape(tm=m0, tn=n0, tk=gemm_tk(chip, n0, b))
    cover = tuple((s, min(m0, m - s), 0) for s in range(0, m, m0))
    return GemmTiling((tile,), cover, 1)


def _atb_base(m: int, n: int, k: int, chip: ChipSpec, operand_bytes: int) -> tuple[int, int]:
    """ATB TilingFunc: (m0, n0) of least CostFunc; the primary axis is the longer of m, n."""
    pri_is_m = m >= n
    short = n if pri_is_m else m
    # roundBase = 2^ceil(ln(ceil(short / 16))) * 16 -- ATB's code takes the natural log here
    round_base = int(2 ** math.ceil(math.log(max(-(-short // 16), 1)))) * 16
    pri_axes = _round16(m if pri_is_m else n)
    axes = -(-short // round_base) * round_base
    axes0_max = 512 // operand_bytes
    best, best_cost = (16, 16), 1.0
    pri0 = 16
    while pri0 <= pri_axes and pri0 <= axes0_max:
        a0 = 16
        while a0 <= axes and a0 <= axes0_max:
            if pri0 * a0 * ACCUM_BYTES <= chip.l0c_bytes:
                m0, n0 = (pri0, a0) if pri_is_m else (a0, pri0)
                cost = _atb_cost(m, n, k, m0, n0, chip)
                if cost < best_cost:
                    best, best_cost = (m0, n0), cost
            a0 *= 2
        pri0 *= 2
    return best


def _atb_cost(m: int, n: int, k: int, m0: int, n0: int, chip: ChipSpec) -> float:
    """ATB CostFunc: operand traffic per output element, an operand whose per-wave stripe
    overflows L2 weighing the L2:HBM ratio more."""
    c = chip.num_cube_cores
    m_loop, n_loop = -(-m // m0), -(-n // n0)
    block_dim = min(m_loop * n_loop, c)
    m_once = m0 if block_dim < n_loop else block_dim // n_loop * m0
    n_once = c * n0 if block_dim < n_loop else n
    # as written in ATB (FP16_SIZE whatever the dtype); the coefficient lowers the cost term
    a_coef = ATB_L2_HBM_RATIO if m_once * k * OPERAND_BYTES > chip.l2_bytes else 1
    b_coef = ATB_L2_HBM_RATIO if n_once * k * OPERAND_BYTES > chip.l2_bytes else 1
    return 1 / (a_coef * n0) + 1 / (b_coef * m0)
