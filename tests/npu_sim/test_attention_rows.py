"""attention_rows shares its common products, groups the exact ones (whole numbers) and leaves
out terms that add nothing, for speed: its costs are the model as first written, bit for bit,
for every pipeline variant, head count, head_dim, operand width, mask and HBM fraction."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest

from npu_sim.cost import CostModel
from npu_sim.cost_attention import (
    SOFTMAX_OPS,
    UPDATE_OPS,
    AttentionRows,
    ScalarOps,
    attention_rows,
)
from npu_sim.cost_mask import MaskCost
from npu_sim.hardware import get_chip
from npu_sim.tiling import ACCUM_BYTES, attention_kv_chunk


def _as_written(cm: CostModel, stages: int, keys: np.ndarray, q_rows: np.ndarray,
                   heads: Any, tile_rows: np.ndarray, final: np.ndarray,
                   horizon_reached: np.ndarray, hbm_fraction: np.ndarray, head_dim: int,
                   mask: MaskCost | None = None) -> AttentionRows:
    """attention_rows as first written: every product as the model states it."""
    c, b, d = cm.chip, cm.bytes, head_dim
    r, big_r = q_rows * heads, tile_rows  # valid / tile rows
    dp = math.ceil(d / c.cube_k) * c.cube_k
    chunks = np.maximum(np.ceil(keys / attention_kv_chunk(c)), 1)
    kl = keys / chunks  # keys per chunk
    kl_pad = np.ceil(kl / c.cube_n) * c.cube_n
    m_load, m_sel = (0.0, 0.0) if mask is None else (mask.chunk_load, mask.chunk_select)
    kv_bytes = 2 * keys * d * b
    inv_kv = cm.mte2_inv_rate(hbm_fraction)
    l2r, sync, aivs = c.mte2_l2_bytes_per_cycle, c.cross_core_sync_cycles, cm.aivs
    if stages == 2:
        # AIVs: K chunk (split between them), QK as fp16 FMAs, softmax; P out to L2.
        vec_in = kl * d * b * cm.mte2_inv_rate(hbm_fraction, aiv=True) / aivs + m_load
        vec = (r * kl * d / c.vector_lanes + r * kl * SOFTMAX_OPS / cm.lanes32) / aivs + m_sel
        vec_out = r * kl * b / c.mte3_bytes_per_cycle / aivs
        cube_in = kl * d * b * inv_kv + r * kl * b / l2r  # V from HBM/L2, P from L2
        mte1 = big_r * kl_pad * b / c.mte1_l0a_bytes_per_cycle + (
            kl_pad * dp * b / c.mte1_l0b_bytes_per_cycle)
        cube = big_r * kl_pad * dp / cm.macs  # PV only
        fix = np.zeros_like(kl)  # O accumulates in L0C across chunks
        chain = vec_in + vec + vec_out + sync + cube_in + mte1 + cube
        cube_mult, s_bytes = 1.0, r * kl * b  # P through L2
    else:
        upd = stages == 4
        cube_in = 2 * kl * d * b * inv_kv + r * kl * b / l2r  # K and V, P from L2
        mte1 = (big_r * dp + big_r * kl_pad) * b / c.mte1_l0a_bytes_per_cycle + (
            2 * kl_pad * dp * b / c.mte1_l0b_bytes_per_cycle)
        cube = 2 * big_r * kl_pad * dp / cm.macs  # QK and PV
        o_bytes = r * dp * ACCUM_BYTES * upd  # O partial through L2 for the update
        fix = (r * kl * ACCUM_BYTES + o_bytes) / c.fixpipe_bytes_per_cycle
        vec_in = (r * kl * ACCUM_BYTES + o_bytes) / l2r / aivs + m_load
        vec = (r * kl * SOFTMAX_OPS + r * d * UPDATE_OPS * upd) / cm.lanes32 / aivs + m_sel
        vec_out = (r * kl * b + o_bytes) / c.mte3_bytes_per_cycle / aivs
        chain = cube_in + mte1 + cube + fix + 2 * sync + vec_in + vec + vec_out + sync * upd
        cube_mult, s_bytes = 2.0, r * kl * (ACCUM_BYTES + b)  # S and P through L2
    steady = np.maximum(np.maximum(np.maximum(cube_in, mte1), np.maximum(cube, fix)),
                        np.maximum(np.maximum(vec_in, vec), vec_out))
    q_load = r * d * b / c.mte2_hbm_bytes_per_cycle
    out_bytes = np.where(final, r * d * b, r * (d + 1) * ACCUM_BYTES)  # output or partial
    body = chain + (chunks - 1) * steady
    if mask is not None:
        body = body + mask.once_load + mask.once_select
    cycles = c.task_dispatch_cycles + q_load + np.where(keys > 0, body, 0) + (
        out_bytes / c.fixpipe_bytes_per_cycle)
    visible = r * keys - np.where(horizon_reached, heads * q_rows * (q_rows - 1) / 2, 0)
    if mask is not None:
        visible = visible - mask.hidden_scores
    q_bytes = r * d * b
    return AttentionRows(
        cycles=cycles, kv_hbm_bytes=kv_bytes * hbm_fraction, cube_cycles=cube * chunks,
        vector_cycles=vec * chunks, s_bytes=s_bytes * chunks, partial_bytes=out_bytes * ~final,
        out_bytes=q_bytes * final, q_bytes=q_bytes, visible_scores=np.maximum(visible, 0),
        issued_macs=cube_mult * big_r * kl_pad * dp * chunks, useful_macs=r * keys)


def _rows(rng: random.Random, n: int) -> tuple[np.ndarray, ...]:
    keys = np.array([float(rng.choice((0, 1, rng.randrange(1, 600), rng.randrange(1, 70000))))
                     for _ in range(n)])
    q_rows = np.array([float(rng.choice((1, rng.randrange(1, 129)))) for _ in range(n)])
    tile_rows = np.array([float(rng.choice((16, 32, 64, 128))) for _ in range(n)])
    final = np.array([rng.random() < 0.7 for _ in range(n)])
    reached = np.array([rng.random() < 0.7 for _ in range(n)])
    fraction = np.array([rng.choice((1.0, 0.0, rng.random())) for _ in range(n)])
    return keys, q_rows, tile_rows, final, reached, fraction


def _mask(rng: random.Random, n: int) -> MaskCost:
    def some() -> np.ndarray:
        return np.array([rng.choice((0.0, rng.random() * 500)) for _ in range(n)])

    return MaskCost(once_load=some(), once_select=some(), chunk_load=some(),
                    chunk_select=some(), hbm_bytes=0.0, l2_bytes=0.0, hidden_scores=some())


@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_attention_rows_are_the_model_as_written(chip_name: str, dtype: str,
                                                 stages: int) -> None:
    cm = CostModel(get_chip(chip_name), dtype)
    rng = random.Random(stages * 7 + len(dtype) + len(chip_name))
    for head_dim in (64, 80, 96, 128, 256):
        for heads in (1, 5, 8, "per row"):
            for masked in (False, True):
                n = rng.choice((1, 3, 40))
                keys, q_rows, tile_rows, final, reached, fraction = _rows(rng, n)
                h: Any = (np.array([float(rng.choice((1, 2, 8))) for _ in range(n)])
                          if heads == "per row" else heads)
                mask = _mask(rng, n) if masked else None
                args = (cm, stages, keys, q_rows, h, tile_rows, final, reached, fraction,
                        head_dim, mask)
                for name, a, b in zip(AttentionRows._fields, attention_rows(*args),
                                      _as_written(*args), strict=True):
                    a, b = np.broadcast_to(a, (n,)), np.broadcast_to(b, (n,))
                    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("chip_name", ["910b2", "910b3"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_one_row_in_python_floats_costs_the_same_bits(chip_name: str, dtype: str,
                                                      stages: int) -> None:
    """ScalarOps (what RowMemo prices a few new rows with) gives each row the bits numpy gives
    it among others: zero keys, one chunk, partial and final outputs, fractions 0, 1 and between.
    """
    cm = CostModel(get_chip(chip_name), dtype)
    rng = random.Random(stages * 11 + len(dtype) + len(chip_name))
    for head_dim in (64, 128):
        for heads in (1, 5, 8):
            rows = _rows(rng, 60)
            arrays = attention_rows(cm, stages, *rows[:2], heads, *rows[2:], head_dim)
            for i in range(60):
                keys, q_rows, tile_rows, final, reached, fraction = (a.item(i) for a in rows)
                one = attention_rows(cm, stages, keys, q_rows, heads, tile_rows, final, reached,
                                     fraction, head_dim, ops=ScalarOps)
                for name, a, b in zip(AttentionRows._fields, arrays, one, strict=True):
                    expected = np.broadcast_to(a, (60,))[i]
                    assert np.float64(b).tobytes() == expected.tobytes(), (name, i)
