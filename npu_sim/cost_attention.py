"""The attention part of the cost model (npu_sim.cost): what each task row costs, and a memo of
those rows across launches; npu_sim.cost_attention_launch adds them up into a launch's costs.

A meta-attention task's cost is a function of a handful of its own numbers (keys in its span,
query tokens, tile rows, whether it writes a partial, whether its span reaches its causal
diagonal, the HBM fraction of its sequence's KV reads) plus the launch's pipeline variant
(2, 3 or 4 stages). Every launch-wide figure the cost model reports is a sum over rows of
per-row terms (`AttentionRows`). A simulation launches tens of thousands of attention kernels
whose rows repeat across steps (a decode row is a function of its context length), so
`RowMemo` keeps each distinct row's terms and prices only the rows it has not seen: the terms
are elementwise IEEE operations, the same on a subset as on the whole table, and the sums are
taken over the same arrays in the same order, so memoised launches cost bit for bit what
unmemoised ones do (tests/npu_sim/test_cost_memo.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from npu_sim.tiling import ACCUM_BYTES, attention_kv_chunk

if TYPE_CHECKING:
    from npu_sim.cost import CostModel
    from npu_sim.cost_mask import MaskCost

SOFTMAX_OPS = 6.0  # vector passes per score: scale/mask, max, subtract, exp, sum, cast
UPDATE_OPS = 3.0  # per output element of the online-softmax update: rescale, add, normalize
ATTN_L2_ALPHA = ACCUM_BYTES + 2  # bytes of L2 per score in flight: S in fp32 + P in fp16


class AttentionRows(NamedTuple):
    """Per task row (or task shape) of an attention launch, float64 arrays: its cycles and its
    terms of the launch's sums (npu_sim.cost_attention_launch.attention adds them up)."""

    cycles: np.ndarray  # cycles the task occupies its AIC and AIVs
    kv_hbm_bytes: np.ndarray  # K/V bytes it reads from HBM (its sequence's HBM fraction)
    cube_cycles: np.ndarray  # cube compute cycles, all KV chunks
    vector_cycles: np.ndarray  # vector compute cycles per AIV, all KV chunks
    s_bytes: np.ndarray  # S / P bytes through L2, all KV chunks (one way)
    partial_bytes: np.ndarray  # partial (o, lse) bytes written to L2 (0 for a final output)
    out_bytes: np.ndarray  # output bytes written to HBM (0 for a partial)
    q_bytes: np.ndarray  # Q bytes read
    visible_scores: np.ndarray  # scores its causal mask (and tree) keeps, at least 0
    issued_macs: np.ndarray  # cube MACs issued, padding included
    useful_macs: np.ndarray  # valid rows x keys (times head_dim and the QK/PV count: MACs)


NUM_TERMS = len(AttentionRows._fields)


class UnsplitShape(NamedTuple):
    """The model and lowering numbers a meta-attention launch is lowered and priced from its
    sequences' lengths with (npu_sim.launch_sums.AttentionLaunchSums.unsplit: the timing-only
    runner's steps, engine.lowering_unsplit's tiles in C)."""

    group_size: int  # query heads per KV head
    num_kv_heads: int  # KV heads: tasks per tile
    head_dim: int  # features per head
    block_size: int  # tokens per KV block
    span_blocks: int  # KV blocks of the shortest span a tile is split into
    #   (engine.lowering_tiles.kv_span_blocks)


class DecodeBatch(NamedTuple):
    """A meta-attention launch of decodes only (a token each, no drafts), none of whose tiles
    is split, as the cost model prices it (cost_attention_launch.decode_rows): what its kernel's
    `unsplit` and `task_shape` say of it, and the model shape, without the kernel (the
    timing-only runner's decode steps: engine.lowering_unsplit.lower_decodes)."""

    context_lens: np.ndarray  # int64 (num_seqs,): each sequence's start_pos + 1, its keys
    order: np.ndarray  # int64 (num_seqs,): the sequences (tiles) in dealt order, each dealt as
    #   num_kv_heads tasks in a row (the kernel's task_shape: the order repeated)
    tile_rows: int  # every tile's stacked rows (UnsplitTiles.decode_tile_rows)
    group_size: int  # query heads per KV head
    head_dim: int  # features per head
    num_kv_heads: int  # KV heads: tasks per sequence


class ScalarOps:
    """The numpy functions `attention_rows` calls, on Python floats: one row priced without
    numpy's per-call overhead (~3 us a row, where a call on a few rows costs ~35 us, ~1 us an
    operation whatever the rows). The same IEEE operations on the same operands, so the same
    bits: +, -, *, / and ceil are exact or correctly rounded alike, max picks the same
    operand."""

    maximum = staticmethod(max)

    @staticmethod
    def ceil(x: float) -> float:
        return float(math.ceil(x))

    @staticmethod
    def where(condition: bool, x: float, y: float) -> float:
        return x if condition else y

    @staticmethod
    def zeros_like(x: float) -> float:
        return 0.0


def attention_rows(cm: CostModel, stages: int, keys: np.ndarray, q_rows: np.ndarray,
                   heads: Any, tile_rows: np.ndarray, final: np.ndarray,
                   horizon_reached: np.ndarray, hbm_fraction: np.ndarray, head_dim: int,
                   mask: MaskCost | None = None, ops: Any = np) -> AttentionRows:
    """The rows' costs (the module docstring; npu_sim.cost's for the model itself). keys,
    q_rows, tile_rows, hbm_fraction: float64 per row; final (writes the output, not a partial),
    horizon_reached: bool per row; heads: query heads per task (scalar or per row); mask: the
    rows' tree / full-mask costs, if any.

    A launch prices a few rows at a time, so the cost is numpy's per-call overhead: each
    product is computed once and shared, and products of whole numbers (rows, keys, padded
    keys, head_dim, bytes: every factor but kl, the keys per chunk, and the rates), exact below
    2^53 in any grouping, are grouped to fold their constants; a term that adds nothing (a
    stage's unused update, an absent mask) is left out (x + 0.0 is x: no term is -0.0). The
    arithmetic on the rest is as written (tests/npu_sim/test_attention_rows.py). ops: numpy, or
    ScalarOps for one row given as Python floats and bools (no mask)."""
    c, b, d = cm.chip, cm.bytes, head_dim
    r, big_r = q_rows * heads, tile_rows  # valid / tile rows
    dp = math.ceil(d / c.cube_k) * c.cube_k
    chunks = ops.maximum(ops.ceil(keys / attention_kv_chunk(c)), 1)
    kl = keys / chunks  # keys per chunk
    kl_pad = ops.ceil(kl / c.cube_n) * c.cube_n
    r_kl = r * kl  # scores per chunk
    r_kl_b = r_kl * b  # their bytes (P)
    big_r_kl_pad = big_r * kl_pad  # padded scores per chunk (whole)
    r_d = r * d  # (whole)
    q_bytes = r_d * b  # Q read, or the output written (whole)
    inv_kv = cm.mte2_inv_rate(hbm_fraction)
    l2r, sync, aivs = c.mte2_l2_bytes_per_cycle, c.cross_core_sync_cycles, cm.aivs
    if stages == 2:
        # AIVs: K chunk (split between them), QK as fp16 FMAs, softmax; P out to L2.
        kl_d_b = kl * d * b  # K (or V) bytes per chunk
        vec_in = kl_d_b * cm.mte2_inv_rate(hbm_fraction, aiv=True) / aivs
        vec = (r_kl * d / c.vector_lanes + r_kl * SOFTMAX_OPS / cm.lanes32) / aivs
        if mask is not None:
            vec_in, vec = vec_in + mask.chunk_load, vec + mask.chunk_select
        vec_out = r_kl_b / c.mte3_bytes_per_cycle / aivs
        cube_in = kl_d_b * inv_kv + r_kl_b / l2r  # V from HBM/L2, P from L2
        mte1 = big_r_kl_pad * b / c.mte1_l0a_bytes_per_cycle + (
            kl_pad * (dp * b) / c.mte1_l0b_bytes_per_cycle)
        cube = big_r_kl_pad * dp / cm.macs  # PV only
        fix = ops.zeros_like(kl)  # O accumulates in L0C across chunks
        chain = vec_in + vec + vec_out + sync + cube_in + mte1 + cube
        cube_mult, s_bytes = 1.0, r_kl_b  # P through L2
    else:
        upd = stages == 4  # the online-softmax update on the AIVs, O through L2
        cube_in = 2 * kl * d * b * inv_kv + r_kl_b / l2r  # K and V, P from L2
        mte1 = (big_r * dp + big_r_kl_pad) * b / c.mte1_l0a_bytes_per_cycle + (
            kl_pad * (2 * dp * b) / c.mte1_l0b_bytes_per_cycle)
        cube = big_r_kl_pad * (2 * dp) / cm.macs  # QK and PV
        s_in, vec_ops, p_out = r_kl * ACCUM_BYTES, r_kl * SOFTMAX_OPS, r_kl_b  # S in, P out
        if upd:
            o_bytes = r * (dp * ACCUM_BYTES)  # O partial through L2 for the update
            s_in, vec_ops, p_out = s_in + o_bytes, vec_ops + r_d * UPDATE_OPS, p_out + o_bytes
        fix = s_in / c.fixpipe_bytes_per_cycle
        vec_in = s_in / l2r / aivs
        vec = vec_ops / cm.lanes32 / aivs
        if mask is not None:
            vec_in, vec = vec_in + mask.chunk_load, vec + mask.chunk_select
        vec_out = p_out / c.mte3_bytes_per_cycle / aivs
        chain = cube_in + mte1 + cube + fix + 2 * sync + vec_in + vec + vec_out
        if upd:
            chain = chain + sync
        cube_mult, s_bytes = 2.0, r_kl * (ACCUM_BYTES + b)  # S and P through L2
    steady = ops.maximum(ops.maximum(ops.maximum(cube_in, mte1), ops.maximum(cube, fix)),
                        ops.maximum(ops.maximum(vec_in, vec), vec_out))
    q_load = q_bytes / c.mte2_hbm_bytes_per_cycle
    out_bytes = ops.where(final, q_bytes, r * ((d + 1) * ACCUM_BYTES))  # output or partial
    body = chain + (chunks - 1) * steady
    if mask is not None:
        body = body + mask.once_load + mask.once_select
    cycles = c.task_dispatch_cycles + q_load + ops.where(keys > 0, body, 0) + (
        out_bytes / c.fixpipe_bytes_per_cycle)
    # (heads * q_rows is r: IEEE products commute)
    r_keys = r * keys
    visible = r_keys - ops.where(horizon_reached, r * (q_rows - 1) / 2, 0)
    if mask is not None:
        visible = visible - mask.hidden_scores
    return AttentionRows(
        cycles=cycles, kv_hbm_bytes=keys * (2 * d * b) * hbm_fraction,
        cube_cycles=cube * chunks, vector_cycles=vec * chunks, s_bytes=s_bytes * chunks,
        partial_bytes=ops.where(final, 0.0, out_bytes), out_bytes=q_bytes * final,
        q_bytes=q_bytes,
        visible_scores=ops.maximum(visible, 0),
        issued_macs=big_r_kl_pad * (cube_mult * dp) * chunks, useful_macs=r_keys)


# Distinct rows a memo keeps by key (each NUM_TERMS floats plus its key): prefill tiles and KV
# spans, a few new ones per step. Decode rows live in tables indexed by their keys instead.
_MEMO_ROWS = 1 << 16
_DECODE_BLOCK = 512  # decode-row keys priced together
_SCALAR_ROWS = 8  # new keyed rows priced one by one in Python floats, at most (ScalarOps)
_NO_TABLE = np.empty((NUM_TERMS, 0))  # a decode table before its first keys


class RowMemo:
    """AttentionRows of the rows seen so far, for unmasked tasks stacking every query head of
    their KV head (the meta-kernel's), one memo per (pipeline stages, group size, head_dim).

    Decode-like rows (one query token, a final output, the span reaching the diagonal, all KV
    reads from HBM) are a function of their keys and tile rows: per tile rows, a table of
    terms indexed by keys, every key up to the largest seen priced, looked up for all such rows
    at once. Any other row is keyed by (keys, q_rows, tile_rows, final, horizon_reached,
    hbm_fraction) in a dictionary."""

    def __init__(self, stages: int, group_size: int, head_dim: int) -> None:
        self.stages, self.group_size, self.head_dim = stages, group_size, head_dim
        # decode-like rows: tile rows -> (terms (NUM_TERMS, capacity) by keys, every key below
        # the second item priced)
        self._tables: dict[float, tuple[np.ndarray, int]] = {}
        self._index: dict[tuple[Any, ...], int] = {}  # other rows: key -> column of _terms
        self._terms = np.empty((NUM_TERMS, 256))  # their terms, a column per row

    def rows(self, cm: CostModel, keys: np.ndarray, q_rows: np.ndarray, tile_rows: np.ndarray,
             final: np.ndarray, horizon_reached: np.ndarray,
             hbm_fraction: np.ndarray | None) -> np.ndarray:
        """attention_rows(cm, stages, ...) of these rows, pricing only those not seen before
        (arguments as attention_rows takes them; hbm_fraction None: 1.0 for every row),
        stacked: C-contiguous (NUM_TERMS, rows), the terms in AttentionRows order."""
        decode = (q_rows == 1.0) & final & horizon_reached
        if hbm_fraction is not None:
            decode &= hbm_fraction == 1.0
        first = int(decode.argmax())
        if decode[first]:  # one table: the tile rows of the first decode-like row
            decode &= tile_rows == tile_rows[first]
        if bool(decode.all()):
            terms = self.decode_terms(cm, float(tile_rows[first]), keys.astype(np.int64))
        else:
            # (terms, rows), each term's row contiguous (the sums run over such rows)
            terms = np.empty((NUM_TERMS, len(keys)))
            if decode[first]:
                terms[:, decode] = self.decode_terms(cm, float(tile_rows[first]),
                                                     keys[decode].astype(np.int64))
            other = ~decode
            if hbm_fraction is None:
                hbm_fraction = np.ones(len(keys))
            terms[:, other] = self.keyed_terms(
                cm, *(a[other] for a in (keys, q_rows, tile_rows, final, horizon_reached,
                                          hbm_fraction)))
        return terms

    def decode_terms(self, cm: CostModel, tile_rows: float, at: np.ndarray) -> np.ndarray:
        """C-contiguous (NUM_TERMS, rows) terms of decode-like rows of `tile_rows` with these
        keys (int64, non-negative)."""
        # (a take along axis 1 is C-contiguous, as sums want)
        return self.decode_table(cm, tile_rows, at).take(at, axis=1)

    def decode_table(self, cm: CostModel, tile_rows: float, at: np.ndarray) -> np.ndarray:
        """The C-contiguous (NUM_TERMS, capacity) table of decode-like rows of `tile_rows`,
        column k a row of k keys, priced for every key of `at` (int64, non-negative) and up."""
        # (np.maximum.reduce: not the array method's Python-level wrapper)
        return self.decode_table_to(cm, tile_rows, int(np.maximum.reduce(at)))[0]

    def decode_table_to(self, cm: CostModel, tile_rows: float,
                        top: int) -> tuple[np.ndarray, int]:
        """(`decode_table`'s table priced for every key up to `top` at least, the keys below
        which it is priced): a caller keeping the table needs no call until its keys reach
        the second."""
        table, priced = self._tables.get(tile_rows, (_NO_TABLE, 0))
        if top >= priced:
            table = self._price_keys(cm, tile_rows, table, priced, top)
            priced = self._tables[tile_rows][1]
        return table, priced

    def _price_keys(self, cm: CostModel, tile_rows: float, table: np.ndarray, priced: int,
                    top: int) -> np.ndarray:
        """The decode table of `tile_rows`, priced for every key up to `top` (keys below
        `priced` are already): whole blocks of keys at once, from `priced` on (decode rows walk
        through consecutive keys; pricing a block costs what pricing one row does: numpy's
        per-call overhead), the table's capacity at least doubled when outgrown."""
        end = -(-(top + 1) // _DECODE_BLOCK) * _DECODE_BLOCK
        if end > table.shape[1]:
            grown = np.empty((NUM_TERMS, max(end, 2 * table.shape[1])))
            grown[:, :priced] = table[:, :priced]
            table = grown
        keys = np.arange(priced, end, dtype=np.float64)
        ones = np.ones(len(keys))
        table[:, priced:end] = np.stack(attention_rows(
            cm, self.stages, keys, ones, self.group_size, ones * tile_rows, ones > 0, ones > 0,
            ones, self.head_dim))
        self._tables[tile_rows] = table, end
        return table

    def keyed_terms(self, cm: CostModel, *columns: np.ndarray) -> np.ndarray:
        """(NUM_TERMS, rows) terms of any rows (columns as attention_rows takes them)."""
        return self.terms_at(self.columns(cm, list(zip(*(a.tolist() for a in columns),
                                                         strict=True))))

    def columns(self, cm: CostModel, rows: list[tuple[Any, ...]]) -> list[int]:
        """The memo's column of each row, a tuple (keys, q_rows, tile_rows, final,
        horizon_reached, hbm_fraction) of the values attention_rows takes (equal numbers are
        one key, whole numbers given as int or float alike), pricing those not seen before (a
        row may repeat)."""
        get = self._index.get
        found = [get(key, -1) for key in rows]
        if -1 not in found:
            return found
        if len(self._index) + len(rows) > _MEMO_ROWS:  # a bounded memo: start over
            self._index.clear()
            found = [-1] * len(rows)
        # the new rows, each once (a row may repeat within a launch), priced together into
        # the next free columns
        base = len(self._index)
        new: dict[tuple[Any, ...], int] = {}
        for i, column in enumerate(found):
            if column < 0:
                found[i] = base + new.setdefault(rows[i], len(new))
        end = base + len(new)
        if end > self._terms.shape[1]:
            grown = np.empty((NUM_TERMS, max(end, 2 * self._terms.shape[1])))
            grown[:, :base] = self._terms[:, :base]
            self._terms = grown
        if len(new) <= _SCALAR_ROWS:  # a few rows: each in Python floats (the same bits)
            for j, (keys, q_rows, tile_rows, final, reached, fraction) in enumerate(new):
                self._terms[:, base + j] = attention_rows(
                    cm, self.stages, float(keys), float(q_rows), self.group_size,
                    float(tile_rows), bool(final), bool(reached), float(fraction),
                    self.head_dim, ops=ScalarOps)
        else:
            keys, q_rows, tile_rows, final, reached, fraction = np.array(
                list(new), dtype=np.float64).T
            self._terms[:, base:end] = attention_rows(
                cm, self.stages, keys, q_rows, self.group_size, tile_rows, final != 0,
                reached != 0, fraction, self.head_dim)
        self._index.update((key, base + j) for key, j in new.items())
        return found

    def terms_at(self, columns: list[int]) -> np.ndarray:
        """(NUM_TERMS, len(columns)) terms of the memo's `columns`."""
        return self._terms[:, columns]
