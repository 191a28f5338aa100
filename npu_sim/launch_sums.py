"""A timing-only step's own attention launch, summed: numpy, and the same bits in C.

A timing-only step keeps what the kernels it shares with other steps add to its sums
(npu_sim.step_sums); its own attention launch is summed afresh, without a KernelTiming:
`mix_launch_sums` of the launch's TaskCosts, the numbers `Device.time` would give (its tasks
dealt to the AICs in the symmetric round robin, their busy cycles, the HBM and L2 bounds, the
row the launch adds to the step).

A launch priced from its lengths (cost_attention_launch.LaunchRows: every step of a simulation
but those with split KV spans or drafts) is `mix_launch_sums(launch_costs(rows))`: ~25 numpy
calls on arrays of a few hundred elements, ~15 us for 60 decodes, the largest single piece of
a simulated decode step's timing. `AttentionLaunchSums` does it in one call of a C library
(npu_sim/launch_sums.c, built and loaded by native_build), every float operation
numpy's in numpy's order: the same bits (tests/npu_sim/test_launch_sums.py holds the two to
equality). Where the library cannot be built (no C compiler, XYSERVE_NATIVE_KERNELS=0) it takes
numpy.

The timing-only runner goes further (`AttentionLaunchSums.unsplit`): from its sequences'
lengths alone, the one C call also lowers the launch (engine.lowering_unsplit's tiles, split
test and dealt order), picks its pipeline, prices its prefill tiles' rows and reads its decode
rows from the row memo's tables: no AttentionKernel, no numpy call but the longest context.
Where that declines (a tile to split, a chunk of no token, no library) the kernel is lowered
and priced as above.
"""

from __future__ import annotations

import ctypes
import math
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

import native_build
from npu_sim.cost import CostModel, TaskCosts
from npu_sim.cost_attention import ATTN_L2_ALPHA, SOFTMAX_OPS, UPDATE_OPS, UnsplitShape
from npu_sim.cost_attention_launch import DECODE_STAGES, LaunchRows, launch_costs
from npu_sim.cost_vector import uniform_terms
from npu_sim.dealing import deal, makespan
from npu_sim.step_sums import LaunchSums, StepTemplate
from npu_sim.tasks import Primitive, VectorKernel
from npu_sim.tiling import ACCUM_BYTES, ATTN_Q_TILE_ROWS, attention_kv_chunk, attention_q_tile
from npu_sim.trace import NUM_STEP_SUMS_SCALARS, step_sums_row

_ATTENTION = Primitive.ATTENTION.value  # (an enum's value is a Python-level property)
_P, _I = ctypes.c_void_p, ctypes.c_int64
# One small source of its own (well under a second to build), not part of the CPU kernels'
# library: a machine that only simulates needs neither their build nor torch.
_LIBRARY = native_build.Library(
    "launch_sums", (pathlib.Path(__file__).with_name("launch_sums.c"),), (),
    # (-ffp-contract=off: no fused multiply-add where numpy rounds a product, then a sum)
    ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"),
    {"xy_launch_sums": (ctypes.c_int, [_P, _I, _I, _P, _P, _P, _I, _P, _P, _I, _I, _P, _I, _I,
                                       _P]),
     "xy_unsplit_launch_sums": (ctypes.c_int, [_P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _P,
                                               _P]),
     "xy_vector_launch_sums": (ctypes.c_int, [_P, _I, _I, _I, _P])},
    "the simulator's C launch sums")


class _UnsplitArgs(ctypes.Structure):
    """launch_sums.c's unsplit_args: what xy_unsplit_launch_sums reads besides the batch."""

    _fields_ = [("lc", _P), ("table", _P * 3), ("stride", _I * 3), ("priced", _I), ("rc", _P),
                ("l2_bytes", ctypes.c_double), ("l2_cap", ctypes.c_double),
                ("alpha", ctypes.c_double), ("consts", _P), ("num_cube", _I),
                ("num_vector", _I)]


_TOO_SHORT = 3  # xy_unsplit_launch_sums: a context the decode tables are not priced for
_TEMPLATES_KEPT = 1 << 12  # step templates whose arguments are kept (then emptied): each holds
#   its template alive, the device's own cache may have let go of it


def mix_launch_sums(cm: CostModel, main: TaskCosts) -> LaunchSums:
    """`Device.time(kernel)`'s LaunchSums, bit for bit, for a meta-attention launch without
    combine tasks whose tasks cost `main` (`cm.attention(kernel)[0]`), without the rest of the
    KernelTiming: its one phase of mix tasks dealt in the symmetric round robin, and the sums
    time() takes, each the same IEEE operation on the same operands (time() also adds the
    empty combine phase's zeros and starts its busy arrays from zeros, which changes no bit of
    these non-negative sums)."""
    c = cm.chip
    core, block = deal(len(main.cycles), c.num_cube_cores, symmetric=True)
    busy = np.bincount(core, weights=main.cycles, minlength=c.num_cube_cores)
    busy[:block] += main.core_overhead_cycles
    hbm_bytes = main.hbm_read_bytes + main.hbm_write_bytes
    span, _, stretch = makespan(float(np.maximum.reduce(busy)), hbm_bytes, main.l2_bytes, c)
    if stretch != 1.0:
        busy = busy * stretch
    cycles = c.cube_launch_s * c.clock_hz + span
    # (an AIC's mix task keeps its AIVs busy as long)
    row = step_sums_row([cycles, main.cube_active_cycles, main.vector_active_cycles,
                         hbm_bytes, main.flops, main.cube_macs, main.useful_cube_macs],
                        busy, busy.repeat(cm.aivs)[:c.num_vector_cores])
    return LaunchSums(Primitive.ATTENTION, _ATTENTION, cycles / c.clock_hz, len(main.cycles),
                      row)


def vector_launch_sums(cm: CostModel, kernel: VectorKernel) -> LaunchSums | None:
    """The LaunchSums of `Device.time(kernel)` (Device._shared_sums'), bit for bit, for a vector
    launch of the lowering's table (cost_vector.uniform_terms: every task but the last alike),
    in one call of the C library: a new token count's norms, RoPE, SiLU and KV writes are each
    timed once, for its template (~20 us apiece in numpy, mostly the calls' own cost). None
    for any other table, or where the library is not loaded."""
    library = native_build.loaded(_LIBRARY)
    if library is None:
        return None
    terms = uniform_terms(cm, kernel)
    if terms is None:
        return None
    first, last = terms
    c = cm.chip
    # launch_sums.c's V_* terms of the first and last task, then its VC_* constants
    args = np.array([*first, *last, c.gm_latency_cycles + first[5],
                     c.vector_launch_s * c.clock_hz, c.hbm_bytes_per_s / c.clock_hz,
                     c.l2_bytes_per_s / c.clock_hz])
    row = np.empty(NUM_STEP_SUMS_SCALARS + c.num_cube_cores + c.num_vector_cores)
    if library.xy_vector_launch_sums(_address(args), len(kernel.tasks), c.num_cube_cores,
                                     c.num_vector_cores, _address(row)):
        raise MemoryError("xy_vector_launch_sums: no scratch")
    return LaunchSums(kernel.primitive, kernel.primitive.value, float(row[0]) / c.clock_hz,
                      len(kernel.tasks), row)


class AttentionLaunchSums:
    """`mix_launch_sums(cm, launch_costs(cm, rows))` of an unsplit meta-attention launch's
    rows, on one cost model: in C where the library loads (`native`), else in numpy."""

    def __init__(self, cm: CostModel) -> None:
        c = cm.chip
        self._cm = cm
        self._num_cube, self._num_vector = c.num_cube_cores, c.num_vector_cores
        self._size = NUM_STEP_SUMS_SCALARS + c.num_cube_cores + c.num_vector_cores
        # launch_sums.c's constants per (stages, weight, head_dim), in its C_* order, with
        # their address (_kept_address)
        self._consts: dict[tuple[int, int, int], tuple[np.ndarray, int]] = {}
        # launch_sums.c's row constants per (stages, group_size, head_dim), with their address
        self._row_consts: dict[tuple[int, int, int], tuple[np.ndarray, int]] = {}
        # xy_unsplit_launch_sums' unsplit_args per (UnsplitShape, decodes only): its address,
        # it, the arrays it points into (_prepare_unsplit)
        self._unsplit_calls: dict[tuple[UnsplitShape, bool],
                                  tuple[int, _UnsplitArgs, list[np.ndarray]]] = {}
        # xy_unsplit_launch_sums' step arguments per step template (by id, the template held)
        self._templates: dict[int, tuple[StepTemplate, tuple[Any, ...]]] = {}
        self._num_tasks = np.zeros(1, dtype=np.int64)  # xy_unsplit_launch_sums' count out
        self._num_tasks_at = self._num_tasks.ctypes.data
        # unsplit_step's launch row, then its step sums (one array, one address)
        self._scratch = np.empty(2 * self._size)
        self._scratch_at = _address(self._scratch)
        self._clock_hz = cm.chip.clock_hz

    def __call__(self, rows: LaunchRows) -> LaunchSums:
        sums = self.native(rows)
        return sums if sums is not None else mix_launch_sums(self._cm,
                                                             launch_costs(self._cm, rows))

    def native(self, rows: LaunchRows) -> LaunchSums | None:
        """The LaunchSums in C; None where the library is not loaded."""
        library = native_build.loaded(_LIBRARY)
        if library is None:
            return None
        # (operands as the C reads them: contiguous int64; a decode's order is a view of the
        # kernel's task order every `weight` tasks)
        order = np.ascontiguousarray(rows.order, dtype=np.int64)
        p = rows.prefill
        num_prefill = 0 if p is None else len(p.q_rows)
        if num_prefill:
            assert p is not None
            prefill = np.array(list(zip(p.q_rows, p.tile_rows, p.hbm_fraction, strict=True)),
                               dtype=np.float64)  # (tiles, 3), a tile's numbers side by side
            prefill_at, prefill_rows_at = _address(p.position), _address(prefill)
            row_consts_at = self._row_constants(rows.stages, p.group_size, rows.head_dim)
        else:
            prefill_at = prefill_rows_at = row_consts_at = None
        row = np.empty(self._size)
        if library.xy_launch_sums(_address(rows.table), rows.table.shape[1], len(rows.keys),
                                  _address(rows.keys), prefill_at, prefill_rows_at, num_prefill,
                                  row_consts_at, _address(order), len(order), rows.repeat,
                                  self._constants(rows.stages, rows.weight, rows.head_dim),
                                  self._num_cube, self._num_vector, _address(row)):
            raise MemoryError("xy_launch_sums: no memory for its scratch")
        return self._launch_sums(row, len(order) * rows.repeat)

    def _launch_sums(self, row: np.ndarray, num_tasks: int) -> LaunchSums:
        """The LaunchSums of a launch of num_tasks tasks whose step_sums row is `row`."""
        return LaunchSums(Primitive.ATTENTION, _ATTENTION, row.item(0) / self._clock_hz,
                          num_tasks, row)

    def _constants(self, stages: int, weight: int, head_dim: int) -> int:
        """The address of launch_sums.c's constants (its C_* order) for rows of this pipeline,
        weight and head_dim, kept."""
        cm, c = self._cm, self._cm.chip
        return _kept_address(self._consts, (stages, weight, head_dim), lambda: [
            c.gm_latency_cycles,  # (the attention tasks' core overhead: _attention_costs)
            c.cube_launch_s * c.clock_hz,
            c.hbm_bytes_per_s / c.clock_hz,  # (dealing.makespan's rates)
            c.l2_bytes_per_s / c.clock_hz,
            weight, head_dim, cm.bytes, cm.aivs,
            1.0 if stages == DECODE_STAGES else 2.0,  # _attention_costs' cube_mult
        ])

    def _row_constants(self, stages: int, group_size: int, head_dim: int) -> int:
        """The address of launch_sums.c's row constants (its R_* order) for prefill rows of
        this pipeline, group size and head_dim, kept: what attention_rows reads of the chip
        and the cost model."""
        # (attention_stages: a launch with prefill tiles is on the 3- or 4-stage pipeline, the
        # only ones prefill_row prices)
        assert stages != DECODE_STAGES, "prefill rows in a decode launch"
        cm, c = self._cm, self._cm.chip
        return _kept_address(self._row_consts, (stages, group_size, head_dim), lambda: [
            stages, group_size, head_dim, math.ceil(head_dim / c.cube_k) * c.cube_k,
            cm.bytes, attention_kv_chunk(c), c.cube_n, c.mte2_hbm_bytes_per_cycle,
            c.mte2_l2_bytes_per_cycle, c.mte1_l0a_bytes_per_cycle,
            c.mte1_l0b_bytes_per_cycle, c.mte3_bytes_per_cycle, c.fixpipe_bytes_per_cycle,
            cm.macs, cm.lanes32, cm.aivs, c.cross_core_sync_cycles, c.task_dispatch_cycles,
            ACCUM_BYTES, SOFTMAX_OPS, UPDATE_OPS,
        ])

    def unsplit(self, start_pos: np.ndarray, num_tokens: np.ndarray | None,
                shape: UnsplitShape) -> LaunchSums | None:
        """The LaunchSums of the meta-attention launch engine.lowering_unsplit.lower_unsplit
        makes of sequences of num_tokens query tokens from start_pos (int64, one each; None: a
        token each, decodes; no verify), priced from its lengths
        (cost_attention_launch.unsplit_rows, or decode_rows for decodes), without the kernel:
        in C, lowering and all (launch_sums.c: xy_unsplit_launch_sums). None where the library
        is not loaded, a tile is to be split into KV spans or a chunk has no token: the caller
        lowers the launch (the same sums, tested). A step reads it with its sums
        (`unsplit_step`)."""
        row = np.empty(self._size)
        if not self._run_unsplit(start_pos, num_tokens, shape, _address(row),
                                 (None, 0, 0, 0, None, None)):
            return None
        return self._launch_sums(row, self._num_tasks.item(0))

    def unsplit_step(self, start_pos: np.ndarray, num_tokens: np.ndarray | None,
                     shape: UnsplitShape, template: StepTemplate, launches: int,
                     ) -> tuple[float, int, np.ndarray] | None:
        """`unsplit(start_pos, num_tokens, shape)` as a timing-only step reads it
        (Device.time_unsplit), once per simulated step: the launch's seconds and tasks, and
        the sums of a step of `template` whose one own kernel it is, launched `launches` times
        (npu_sim.step_sums.step_sums', bit for bit), in an array this object reuses (valid
        until its next call), without a LaunchSums or new arrays. None where `unsplit` is."""
        if not self._run_unsplit(start_pos, num_tokens, shape, self._scratch_at,
                                 (*self._step_args(template, launches),
                                  self._scratch_at + 8 * self._size)):
            return None
        return (self._scratch.item(0) / self._clock_hz, self._num_tasks.item(0),
                self._scratch[self._size:])

    def _run_unsplit(self, start_pos: np.ndarray, num_tokens: np.ndarray | None,
                     shape: UnsplitShape, row_at: int, step_args: tuple[Any, ...]) -> bool:
        """xy_unsplit_launch_sums on the batch, the launch's row to `row_at` and the step's
        sums as step_args say; False where the library is not loaded or the call declines."""
        library = native_build.loaded(_LIBRARY)
        if library is None:
            return False
        decodes = num_tokens is None
        batch = (_address(start_pos), None if decodes else _address(num_tokens), len(start_pos))
        prepared = self._unsplit_calls.get((shape, decodes))
        top = 0  # (the longest context the prepared tables reach at least)
        for _ in range(2):  # (a second call where a context is longer than so far)
            if prepared is None:
                prepared = self._prepare_unsplit(shape, decodes, top)
            status = library.xy_unsplit_launch_sums(*batch, prepared[0], row_at,
                                                    self._num_tasks_at, *step_args)
            if status != _TOO_SHORT:
                break
            top = int(np.maximum.reduce(start_pos if decodes else start_pos + num_tokens))
            top, prepared = top + decodes, None  # (a decode's context: its start_pos + 1)
        if status < 0:
            raise MemoryError("xy_unsplit_launch_sums: no memory for its scratch")
        return not status

    def _step_args(self, template: StepTemplate, launches: int) -> tuple[Any, ...]:
        """xy_unsplit_launch_sums' arguments of a step of `template` (rest, rest_rows, own_row,
        launches, prefix), its arrays' addresses kept per template."""
        kept = self._templates.get(id(template))
        if kept is None or kept[0] is not template:
            if len(self._templates) >= _TEMPLATES_KEPT:
                self._templates.clear()
            (own_row,) = template.varying_rows
            prefix = None if template.prefix is None else _address(template.prefix)
            kept = self._templates[id(template)] = template, (
                _address(template.rest), len(template.rest), own_row, prefix)
        rest, rest_rows, own_row, prefix = kept[1]
        return rest, rest_rows, own_row, launches, prefix

    def _prepare_unsplit(self, shape: UnsplitShape, decodes: bool,
                         top: int) -> tuple[int, _UnsplitArgs, list[np.ndarray]]:
        """xy_unsplit_launch_sums' unsplit_args for launches of `shape` (of decodes only, or
        not) whose contexts are below its `priced` (the memo's decode tables they read priced
        up to `top` at least), kept, with its address and the arrays it holds addresses of:
        the decode tables of the pipelines such a launch can be on (decodes: the 2-stage one;
        with prefill chunks the C picks 3 or 4 stages), the constants."""
        cm = self._cm
        g, d = shape.group_size, shape.head_dim
        tile_rows = float(attention_q_tile(1, g)[0])  # a decode's tile
        args = _UnsplitArgs()
        arrays: list[np.ndarray] = []  # what `args` holds addresses of, kept with it
        priced = -1  # (the keys below which every table read is priced)
        for i, stages in enumerate((2, 3, 4)):
            if (stages == DECODE_STAGES) == decodes:
                table, below = cm.row_memo(stages, g, d).decode_table_to(cm, tile_rows, top)
                arrays.append(table)  # (the memo may outgrow it: its columns below `below` stay)
                args.table[i], args.stride[i] = table.ctypes.data, table.shape[1]
                priced = below if priced < 0 else min(priced, below)
        lowering = np.array([g, shape.num_kv_heads, d, shape.block_size, shape.span_blocks,
                             cm.chip.num_cube_cores, cm.bytes, len(ATTN_Q_TILE_ROWS),
                             *ATTN_Q_TILE_ROWS], dtype=np.int64)
        arrays.append(lowering)
        args.lc, args.priced, args.rc = lowering.ctypes.data, priced, self._row_constants(3, g, d)
        args.l2_bytes, args.l2_cap = float(cm.chip.l2_bytes), float(cm.l2_cap)
        args.alpha = float(ATTN_L2_ALPHA)
        # launch_row's constants: the 2-stage pipeline's for decodes, else 3 and 4's (the same)
        args.consts = self._constants(DECODE_STAGES if decodes else 3, shape.num_kv_heads, d)
        args.num_cube, args.num_vector = self._num_cube, self._num_vector
        prepared = self._unsplit_calls[shape, decodes] = ctypes.addressof(args), args, arrays
        return prepared


def _address(array: np.ndarray) -> int:
    """The address of a C-contiguous array's data: through ctypes' buffer view where the array
    is writable (a third of what `.ctypes.data` costs), else `.ctypes.data`."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(array))
    except (TypeError, ValueError, BufferError):  # read-only, empty or strided
        return int(array.ctypes.data)


def _kept_address(cache: dict[Any, tuple[np.ndarray, int]], key: Any,
                  values: Callable[[], list[float]]) -> int:
    """The address of the float64 array of `values()` kept in `cache` under `key` (built on its
    first call; the cache holds the array, so the address stays good)."""
    kept = cache.get(key)
    if kept is None:
        array = np.array(values(), dtype=np.float64)
        kept = cache[key] = array, _address(array)
    return kept[1]

