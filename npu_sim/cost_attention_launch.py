"""Attention-launch pricing of the cost model (npu_sim.cost): a launch's pipeline variant (2, 3
or 4 stages), its attention tasks' TaskCosts from their rows' terms (npu_sim.cost_attention),
the HBM fraction of each sequence's K/V reads, the launches priced from their lengths (the
meta-kernel's unsplit and decode-only launches, through the row memo), and the combine phase
that joins split tiles' partial outputs.

npu_sim.cost_attention prices rows (a task's terms, the memo that keeps them); this module adds
them up into a launch's costs. Functions of the CostModel (its chip, operand bytes, L2 share,
row memos); CostModel binds `attention` as its method. A launch priced from its lengths is
stated as its rows (`LaunchRows`), which `launch_costs` adds up here and npu_sim.launch_sums in
C (pricing a prefill chunk's tiles there too: `PrefillRows`). The assumptions behind them are
in npu_sim.cost's docstring; masks beyond causality in npu_sim.cost_mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from npu_sim.cost_attention import ATTN_L2_ALPHA, AttentionRows, DecodeBatch, attention_rows
from npu_sim.cost_mask import MaskCost, mask_cost
from npu_sim.task_costs import TaskCosts, Unit, empty_costs
from npu_sim.tasks import AttentionKernel
from npu_sim.tiling import ACCUM_BYTES, attention_kv_chunk

if TYPE_CHECKING:
    from npu_sim.cost import CostModel

COMBINE_OPS = 3.0  # per partial output element: weight by exp(lse - max), accumulate
DECODE_STAGES = 2  # a launch of decodes only, QK on the vector cores: the 2-stage pipeline

_NO_COMBINE = empty_costs(Unit.AIV, "combine")  # an attention launch without split tiles


def attention_stages(cm: CostModel, k: AttentionKernel) -> int:
    """2, 3 or 4: the pipeline variant of this launch (see npu_sim.cost's docstring)."""
    u = k.unsplit
    if k.vector_qk and (u.prefill is None if u is not None else len(k.seqs) and bool(
            (k.seqs["q_len"] == 1).all())):
        return DECODE_STAGES
    if k.task_group is not None:  # the split baseline: FlashAttention-style online softmax
        return 4
    n = cm.chip.num_cube_cores
    if u is not None and u.tile_work is not None and k.task_shape is not None:
        # the first tasks' tile rows x blocks
        keys_x_rows = int(u.tile_work.take(k.task_shape[:n]).sum()) * k.block_size
    else:
        first = k.leading_tasks(n)
        keys = (first["kv_block_end"] - first["kv_block_start"]) * k.block_size
        keys_x_rows = (keys * first["tile_rows"]).sum()
    in_flight = float(keys_x_rows) * ATTN_L2_ALPHA  # (whole numbers: the same either way)
    return 3 if cm.chip.l2_bytes > in_flight else 4


def attention(cm: CostModel, k: AttentionKernel) -> tuple[TaskCosts, TaskCosts]:
    """(attention tasks on AIC + AIVs, combine tasks on AIVs)."""
    if prices_from_lengths(cm, k):
        return launch_costs(cm, unsplit_rows(cm, k)), _combine(cm, k)
    stages = attention_stages(cm, k)
    pipeline = f"attention-{stages}stage"
    if not k.num_tasks:
        return empty_costs(Unit.MIX, pipeline), _combine(cm, k)
    c, b, g, d = cm.chip, cm.bytes, k.group_size, k.head_dim
    # Price each distinct task shape once where the lowering lists them (the same work on
    # every KV head): the arrays below are per row of `t`, each row standing for `weight`
    # tasks. Trees' masks are priced per task.
    by_shape = k.task_shape is not None and k.shapes is not None and not k.tree_masks
    t, weight = (k.shapes, k.num_kv_heads) if by_shape else (k.tasks, 1)
    # a shape per sequence (each sequence one tile over all its KV, in sequence order): its
    # KV is read once, all of it from HBM (what attention_hbm_fraction gives: exactly 1.0)
    per_seq = by_shape and len(t) == len(k.seqs)
    seqs = k.seqs if per_seq else k.seqs[t["seq"]]
    horizon = seqs["start_pos"] + t["q_offset"] + t["q_rows"]  # keys the last row sees
    k_end = np.minimum(t["kv_block_end"] * k.block_size, horizon)
    keys = np.maximum(k_end - t["kv_block_start"] * k.block_size, 0).astype(np.float64)
    q_rows = t["q_rows"].astype(np.float64)
    heads = g if k.task_heads is None else k.task_heads[:, 1].astype(np.float64)
    tile_rows = t["tile_rows"].astype(np.float64)
    horizon_reached = k_end >= horizon  # the span reaches the causal diagonal of its tile
    final = t["partial_slot"] < 0
    # Every row's K and V bytes, 2 keys d b, is a whole number, and so is their sum (far
    # below 2^53): summing the keys and scaling is the same sum, exactly.
    total_kv = weight * (2 * float(keys.sum()) * d * b)
    if per_seq:
        hbm_fraction = None  # all of it from HBM
    else:
        context = (k.seqs["start_pos"] + k.seqs["q_len"]).astype(np.float64)
        hbm_fraction = attention_hbm_fraction(
            cm, k, t["seq"], 2 * keys * d * b * weight, context)[t["seq"]]
    mask = None
    if k.tree_masks:
        kl = keys / np.maximum(np.ceil(keys / attention_kv_chunk(c)), 1)  # keys per chunk
        mask = mask_cost(k, c, cm.lanes32, q_rows, heads, keys, kl, horizon_reached)
    if cm.memo_rows and mask is None and k.task_heads is None:  # rows seen before: memo
        terms = cm.row_memo(stages, g, d).rows(cm, keys, q_rows, tile_rows, final,
                                               horizon_reached, hbm_fraction)
    else:
        terms = np.stack(attention_rows(
            cm, stages, keys, q_rows, heads, tile_rows, final, horizon_reached,
            np.ones(len(keys)) if hbm_fraction is None else hbm_fraction, d, mask))
    cycles = terms[0].take(k.task_shape) if by_shape else terms[0]  # per task, to deal
    main = _attention_costs(cm, d, cycles, stages, terms, weight, total_kv, mask)
    return main, _combine(cm, k)


class PrefillRows(NamedTuple):
    """The rows of a launch's prefill tiles (`unsplit_rows`), left to be priced: each its own
    row of attention_rows (a tile over all the keys its last row sees, a final output), where
    the launch's other rows are decode rows read from a memo table."""

    position: np.ndarray  # int64: each tile's row in the launch (its keys are the launch's)
    q_rows: tuple[int, ...]  # its query tokens
    tile_rows: tuple[int, ...]  # its stacked rows
    hbm_fraction: tuple[float, ...]  # its sequence's HBM fraction (attention_hbm_fraction's)
    group_size: int  # query heads per KV head (a task's heads)


class LaunchRows(NamedTuple):
    """The rows of a meta-attention launch none of whose tiles is split, priced from its
    lengths (`unsplit_rows`, `decode_rows`): what `launch_costs` adds up, and
    npu_sim.launch_sums in C."""

    stages: int  # the launch's pipeline (attention_stages)
    table: np.ndarray  # C-contiguous (NUM_TERMS, columns): the row memo's decode table, column
    #   k a decode-like row of k keys, priced for every row's keys
    keys: np.ndarray  # int64: each row's keys (its column of `table`)
    order: np.ndarray  # int64: the rows in dealt order, each dealt as `repeat` tasks in a row
    repeat: int
    weight: int  # tasks a row stands for (the KV heads)
    head_dim: int
    prefill: PrefillRows | None = None  # rows whose terms are not `table`'s but priced afresh


def prices_from_lengths(cm: CostModel, k: AttentionKernel) -> bool:
    """Whether `attention(k)` prices k from its lengths (`unsplit_rows`): a meta-kernel launch
    that says them (AttentionKernel.unsplit), with the row memo on."""
    return (k.unsplit is not None and k.task_shape is not None and cm.memo_rows
            and k.task_heads is None and not k.tree_masks and len(k.task_shape) > 0)


def unsplit_rows(cm: CostModel, k: AttentionKernel) -> LaunchRows:
    """The rows `attention(k)[0]` prices a launch none of whose tiles is split at, from its
    lengths (AttentionKernel.unsplit; `prices_from_lengths`): each tile, a shape, is over all
    the keys its last row sees, a final output; a decode's is one token over its context, all
    of its KV from HBM (the HBM fraction `attention_hbm_fraction` gives a sequence of one tile:
    exactly 1.0), the rows RowMemo keeps in its decode tables; a prefill chunk's tiles share
    its sequence's fraction, and are left to be priced (`PrefillRows`: `launch_terms` prices
    them through the memo, npu_sim.launch_sums in C). Each row's terms are what `attention`
    prices it at (elementwise), in the same (tile) order: the same sums."""
    u = k.unsplit
    assert u is not None and k.task_shape is not None
    g, d, weight = k.group_size, k.head_dim, k.num_kv_heads
    stages = attention_stages(cm, k)
    p = u.prefill
    if p is None:  # a tile per sequence, over its context
        # (its tiles' tasks dealt a tile's KV heads in a row: task_shape repeats the order)
        return decode_rows(cm, DecodeBatch(u.context_lens, k.task_shape[::weight],
                                           u.decode_tile_rows, g, d, weight), stages)
    keys = u.context_lens.repeat(u.num_tiles)
    position = np.array(p.position, dtype=np.int64)
    keys[position] = p.keys
    # every row a column of the decode table of its keys, the prefill tiles' replaced (a table
    # of every key up to the longest costs fewer calls than leaving them out)
    table = cm.row_memo(stages, g, d).decode_table(cm, float(u.decode_tile_rows), keys)
    seq_keys: dict[int, list[int]] = {}  # each prefill sequence's tiles' keys
    for s, n in zip(p.seq, p.keys, strict=True):
        seq_keys.setdefault(s, []).append(n)
    # `attention_hbm_fraction`'s: exactly 1.0 for a sequence of one tile; else from its
    # tiles' K/V bytes and its whole KV's, whole numbers (exact in any order)
    fraction = {s: 1.0 if len(n) == 1 else _hbm_fraction(
        cm, float(2 * sum(n) * d * cm.bytes * weight),
        float(u.context_lens.item(s) * weight * d * cm.bytes * 2), min, max)
        for s, n in seq_keys.items()}
    return LaunchRows(stages, table, keys, k.task_shape, 1, weight, d, PrefillRows(
        position, p.q_rows, p.tile_rows, tuple([fraction[s] for s in p.seq]), g))


def decode_rows(cm: CostModel, batch: DecodeBatch, stages: int = DECODE_STAGES) -> LaunchRows:
    """The rows of a meta-kernel launch of decodes only, none of whose tiles is split, said by
    `batch` (its kernel's lengths and dealt order), as `unsplit_rows` prices such a kernel (it
    calls this): each decode's row, a column of the RowMemo's decode table of its context
    length. stages: the launch's pipeline (`attention_stages`: 2 for the meta-kernel's
    decodes)."""
    keys = batch.context_lens
    table = cm.row_memo(stages, batch.group_size, batch.head_dim).decode_table(
        cm, float(batch.tile_rows), keys)
    # (a tile's tasks, one per KV head, dealt in a row: the order's rows repeated)
    return LaunchRows(stages, table, keys, batch.order, batch.num_kv_heads, batch.num_kv_heads,
                      batch.head_dim)


def launch_terms(cm: CostModel, rows: LaunchRows) -> np.ndarray:
    """The C-contiguous (NUM_TERMS, rows) terms of a launch's rows, its prefill rows priced
    through the row memo (each new one once)."""
    terms = rows.table.take(rows.keys, axis=1)  # (a copy: prefill rows are written into it)
    p = rows.prefill
    if p is not None:
        memo = cm.row_memo(rows.stages, p.group_size, rows.head_dim)
        keys = rows.keys[p.position].tolist()
        columns = memo.columns(cm, [
            (n, q, r, True, True, f)
            for n, q, r, f in zip(keys, p.q_rows, p.tile_rows, p.hbm_fraction, strict=True)])
        terms[:, p.position] = memo.terms_at(columns)
    return terms


def launch_costs(cm: CostModel, rows: LaunchRows) -> TaskCosts:
    """`_attention_costs` of an unsplit launch's rows: each a shape of `rows.weight` tasks."""
    terms = launch_terms(cm, rows)
    cycles = terms[0].take(rows.order)  # every task's, in dealt order
    if rows.repeat != 1:
        cycles = cycles.repeat(rows.repeat)
    # the keys' sum, a whole number below 2^53: the float64 sum `attention` takes, exactly
    total_kv = rows.weight * (2 * float(np.add.reduce(rows.keys)) * rows.head_dim * cm.bytes)
    return _attention_costs(cm, rows.head_dim, cycles, rows.stages, terms, rows.weight,
                            total_kv, None)


def _attention_costs(cm: CostModel, head_dim: int, cycles: np.ndarray, stages: int,
                     terms: np.ndarray, weight: int, total_kv: float,
                     mask: MaskCost | None) -> TaskCosts:
    """The attention tasks' TaskCosts from `terms` (NUM_TERMS, rows), the rows' terms
    (npu_sim.cost_attention), each row standing for `weight` tasks (a task shape's, or a
    task); cycles: every task's, in the dealt order; total_kv: the K/V bytes all tasks
    read; mask: the rows' mask costs, if any."""
    c, d = cm.chip, head_dim
    # every term's sum over the rows in one reduction (each row of `terms` contiguous: the
    # same pairwise sum as summing it alone)
    sums = AttentionRows(*np.add.reduce(terms, axis=1).tolist())
    hbm_kv = weight * sums.kv_hbm_bytes
    vec_active = weight * sums.vector_cycles * cm.aivs
    mask_hbm = mask_l2 = 0.0
    if mask is not None:
        vec_active += float(mask.once_select.sum()) * cm.aivs
        mask_hbm, mask_l2 = mask.hbm_bytes, mask.l2_bytes
    q_bytes = weight * sums.q_bytes
    cube_mult = 1.0 if stages == 2 else 2.0  # PV, or QK and PV, on the cube
    return TaskCosts(
        unit=Unit.MIX, cycles=cycles, core_overhead_cycles=c.gm_latency_cycles,
        cube_active_cycles=weight * sums.cube_cycles,
        vector_active_cycles=vec_active, hbm_read_bytes=hbm_kv + q_bytes + mask_hbm,
        hbm_write_bytes=weight * sums.out_bytes,
        l2_bytes=(total_kv - hbm_kv) + weight * (sums.s_bytes * 2 + sums.partial_bytes)
        + mask_l2,
        flops=weight * 4.0 * sums.visible_scores * d,
        cube_macs=weight * sums.issued_macs,
        useful_cube_macs=weight * cube_mult * sums.useful_macs * d,
        pipeline=f"attention-{stages}stage")


def attention_hbm_fraction(cm: CostModel, k: AttentionKernel, seq: np.ndarray,
                           kv_bytes: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Per sequence, the fraction of its tasks' K/V reads that come from HBM: its KV (all
    heads) once, and the re-reads by its other Q tiles in proportion to how much of that KV
    fits the L2 share. seq, kv_bytes: per task (or task shape, with its tasks' bytes), of
    some of the sequences or all; context: float64 per sequence, its start_pos + q_len."""
    total = np.bincount(seq, weights=kv_bytes, minlength=len(context))
    unique = context * k.num_kv_heads * k.head_dim * cm.bytes * 2
    return np.where(total > 0, _hbm_fraction(cm, total, unique), 1.0)


def _hbm_fraction(cm: CostModel, total: Any, unique: Any, minimum: Any = np.minimum,
                  maximum: Any = np.maximum) -> Any:
    """`attention_hbm_fraction` of sequences whose tasks read `total` K/V bytes (more than
    none) of their `unique` bytes of KV: float64 arrays with numpy's minimum and maximum, or
    floats with Python's min and max (the same values)."""
    unique = minimum(total, unique)
    hit = minimum(1.0, cm.l2_cap / maximum(unique, 1.0))
    return (unique + (total - unique) * (1.0 - hit)) / maximum(total, 1.0)


def _combine(cm: CostModel, k: AttentionKernel) -> TaskCosts:
    if not k.num_combine_tasks:
        return _NO_COMBINE
    c, t = cm.chip, k.combine_tasks
    rows = t["q_rows"].astype(np.float64) * k.group_size
    slots = t["num_slots"].astype(np.float64)
    in_bytes = slots * rows * (k.head_dim + 1) * ACCUM_BYTES
    ops = slots * rows * k.head_dim * COMBINE_OPS
    out_bytes = rows * k.head_dim * cm.bytes
    comp = ops / cm.lanes32
    cycles = c.task_dispatch_cycles + in_bytes / c.mte2_l2_bytes_per_cycle + comp + (
        out_bytes / c.mte3_bytes_per_cycle)
    return TaskCosts(
        unit=Unit.AIV, cycles=cycles, core_overhead_cycles=c.cross_core_sync_cycles,
        cube_active_cycles=0.0, vector_active_cycles=float(comp.sum()), hbm_read_bytes=0.0,
        hbm_write_bytes=float(out_bytes.sum()), l2_bytes=float(in_bytes.sum()),
        flops=float(ops.sum()), cube_macs=0.0, useful_cube_macs=0.0, pipeline="combine")
