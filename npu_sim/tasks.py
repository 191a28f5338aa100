"""The primitive IR: kernels as fixed-shape task tables.

A `Kernel` is one launch on the device: a primitive kind plus a numpy structured array of tasks,
one row per task, each the unit one AI core executes. Three primitives cover a transformer layer
(a fourth joins the NPUs of a tensor-parallel group):

- `VectorKernel`: row tiles of an element-wise / row-wise op (norms, RoPE, SiLU*mul, KV write) on
  the vector cores (AIV).
- `GemmKernel`: (m-tile, n-tile, k-slice) tasks of `out[M, N] = x[M, K] @ w[N, K]^T` on the cube
  cores (AIC). Tiles come from a fixed menu; a ragged edge is a *masked* tile (`m_rows < tm`,
  `n_cols < tn`): the padded rows and columns exist only in on-chip buffers, never in memory.
  With split-K each task covers one slice of K and writes an fp32 partial to a workspace; reduce
  tasks on the vector cores (AIV) add the partials up (catlass MultiCoreSplitkMatmul).
- `AttentionKernel`: meta-kernel tasks, each a Q tile (up to `tile_rows` query tokens of one
  sequence, all query heads of one KV head stacked) against a span of KV-cache blocks, with online
  softmax; a sequence whose KV is split across spans is joined by combine tasks.
- `CollectiveKernel`: an all-reduce or all-gather of a tensor-parallel group (no AI-core tasks;
  timed as a ring over HCCS by npu_sim.collectives).

Task tables are numpy arrays so lowering and costing stay vectorized; `npu_sim` knows nothing of
requests, only sequences, rows and blocks.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np


class Primitive(str, enum.Enum):
    VECTOR = "vector"
    GEMM = "gemm"
    ATTENTION = "attention"
    COLLECTIVE = "collective"


class CollectiveOp(str, enum.Enum):
    """Collectives over the NPUs of a tensor-parallel group (HCCL over HCCS)."""

    ALL_REDUCE = "all_reduce"  # every rank ends with the sum of all ranks' tensors
    ALL_GATHER = "all_gather"  # every rank ends with the concatenation of all ranks' shards


class VectorOp(str, enum.Enum):
    """Vector-core operations. Operands are named in `npu_sim.kernels.vector`."""

    EMBED = "embed"  # out[r] = table[token_ids[r]]
    RMSNORM = "rmsnorm"  # out[r] = x[r] / rms(x[r]) * weight
    ADD_RMSNORM = "add_rmsnorm"  # residual[r] += x[r]; out[r] = rmsnorm(residual[r]) * weight
    ROPE = "rope"  # rotate q[r] and k[r] (in place) by their positions' cos / sin
    SILU_MUL = "silu_mul"  # out[r] = silu(gate_up[r, :I]) * gate_up[r, I:]
    KV_WRITE = "kv_write"  # k_cache / v_cache at slot_mapping[r] = k[r] / v[r]


class CopyOp(str, enum.Enum):
    """Vector-core copies only the baselines launch (the model's forward never does)."""

    PAD_COPY = "pad_copy"  # out[r] = x[r] for r < valid_rows, else 0 (bucket-padding baseline)


# One row tile of a vector op: rows [row_start, row_start + num_rows).
VECTOR_TASK = np.dtype([("row_start", np.int64), ("num_rows", np.int64)])

# One output tile of a GEMM: rows [m_start, m_start + m_rows) x cols [n_start, n_start + n_cols)
# of the output, computed in a (tm, tn) on-chip tile of menu entry `tile`; m_rows <= tm and
# n_cols <= tn, the rest of the tile is masked (virtual padding). The task reduces over
# x[:, k_start : k_start + k_len]; k_split = -1 writes the output itself (k_len = K), k_split = s
# >= 0 writes fp32 partial s of that tile into the split-K workspace, for the reduce tasks.
GEMM_TASK = np.dtype([("m_start", np.int64), ("m_rows", np.int64), ("n_start", np.int64),
                      ("n_cols", np.int64), ("tile", np.int64), ("k_start", np.int64),
                      ("k_len", np.int64), ("k_split", np.int64)])

# One split-K reduce task on a vector core: output elements [elem_start, elem_start + num_elems)
# of the row-major (M, N) output, the sum of that range of every partial (catlass splits C as one
# contiguous 1-D range per AIV, at least 64 fp32 elements each).
GEMM_REDUCE_TASK = np.dtype([("elem_start", np.int64), ("num_elems", np.int64)])

# One sequence (request chunk) of an attention launch: its query rows are
# q[q_start : q_start + q_len], at positions start_pos ... start_pos + q_len - 1; its keys are the
# first start_pos + q_len positions of its block table row.
ATTN_SEQ = np.dtype([("q_start", np.int64), ("q_len", np.int64), ("start_pos", np.int64)])

# One meta-kernel task: query tokens [q_offset, q_offset + q_rows) of sequence `seq` (a tile of
# `tile_rows` token rows, each carrying the num_heads // num_kv_heads query heads of `kv_head`)
# against the keys in KV blocks [kv_block_start, kv_block_end) of the sequence's block table.
# partial_slot = -1 writes the normalized output; >= 0 writes an unnormalized partial (o, lse)
# into that workspace slot for a combine task to join.
ATTN_TASK = np.dtype([("seq", np.int64), ("kv_head", np.int64), ("q_offset", np.int64),
                      ("q_rows", np.int64), ("tile_rows", np.int64),
                      ("kv_block_start", np.int64), ("kv_block_end", np.int64),
                      ("partial_slot", np.int64)])

# One combine task: join the partials in slots [slot_start, slot_start + num_slots) of the Q tile
# (seq, kv_head, q_offset, q_rows) by their log-sum-exp and write the normalized output.
COMBINE_TASK = np.dtype([("seq", np.int64), ("kv_head", np.int64), ("q_offset", np.int64),
                         ("q_rows", np.int64), ("slot_start", np.int64), ("num_slots", np.int64)])


class LazyArray:
    """A frozen dataclass's array field that may be given as a zero-argument function instead:
    the first read calls it and keeps the array. The meta-kernel's full task tables (thousands
    of rows a step) are built only where something reads them (the functional kernels,
    timelines, token trees); timing a launch needs only its compact shapes
    (`AttentionKernel.shapes`). The field stays a required constructor argument, unless a
    default is given (`LazyArray(default=None)`)."""

    _REQUIRED: ClassVar[Any] = object()  # no default

    def __init__(self, default: Any = _REQUIRED) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}_value"

    def __get__(self, obj: Any, objtype: type | None = None) -> np.ndarray:
        if obj is None:  # a class read: the default value, if any (dataclasses asks)
            if self.default is LazyArray._REQUIRED:
                raise AttributeError(self.attr)
            return self.default
        value = obj.__dict__[self.attr]
        if callable(value):
            value = value()
            obj.__dict__[self.attr] = value
        return value

    def __set__(self, obj: Any, value: np.ndarray | Callable[[], np.ndarray]) -> None:
        obj.__dict__[self.attr] = value


@dataclass(frozen=True)
class TileShape:
    """A cube tile: the on-chip shape one GEMM task computes, whatever its valid part."""

    tm: int  # rows of x (tokens) per tile
    tn: int  # output columns per tile
    tk: int  # reduction depth per L0 step


@dataclass(frozen=True, eq=False)
class VectorKernel:
    """A row-tiled vector op over `num_rows` rows of `row_len` elements."""

    primitive: ClassVar[Primitive] = Primitive.VECTOR
    name: str  # what it computes in the model, e.g. "input_norm"
    op: VectorOp | CopyOp  # which operation
    num_rows: int  # rows (tokens) covered
    row_len: int  # elements per row of the main operand (for costing)
    tasks: np.ndarray  # VECTOR_TASK, (num_tasks,)
    valid_rows: int | None = None  # PAD_COPY: rows read from the source (the rest are zero
    #   filled); None = num_rows


@dataclass(frozen=True)
class WeightQuant:
    """A weight-only quantized GEMM weight format (W8A16, W4A16): integers with an fp16 scale
    (and offset) per group of weights along K, widened to the activations' dtype on chip."""

    bits: int  # bits per weight
    group_len: int  # weights along K sharing a scale
    scale_bytes: int  # per group: fp16 scale (2), plus an fp16 offset (4 in all) if asymmetric

    @property
    def bytes_per_weight(self) -> float:
        return self.bits / 8 + self.scale_bytes / self.group_len


# GemmKernel.weights other than the operand dtype: the GGUF blocks the default model ships,
# Q8_0 (int8, one scale per 32) and Q4_1 (uint4, scale and offset per 32), kept on the NPU as
# W8A16 / W4A16 (npu_sim.cost prices their HBM bytes and the AIVs' dequantization).
WEIGHT_QUANT = {"w8a16": WeightQuant(bits=8, group_len=32, scale_bytes=2),
                "w4a16": WeightQuant(bits=4, group_len=32, scale_bytes=4)}
NPU_WEIGHT_FORMATS = ("bf16", *WEIGHT_QUANT)


@dataclass(frozen=True, eq=False)
class GemmKernel:
    """`out[M, N] = x[M, K] @ w[N, K]^T (+ bias)` tiled by fixed menu shapes."""

    primitive: ClassVar[Primitive] = Primitive.GEMM
    name: str  # which projection, e.g. "qkv_proj"
    m: int  # rows of x: tokens in the batch (the dynamic dimension)
    n: int  # output features (static, from the weights)
    k: int  # input features (static)
    menu: tuple[TileShape, ...]  # tile shapes the tasks index into
    tasks: np.ndarray  # GEMM_TASK, (num_tasks,)
    valid_m: int | None = None  # bucket-padding baseline: the real token rows when `m` is a
    #   physically padded bucket (rows valid_m..m are zeros in memory); None = all m rows real
    split_k: int = 1  # K slices (workspace partials); 1 = no split-K
    reduce_tasks: np.ndarray | None = None  # GEMM_REDUCE_TASK (num,), when split_k > 1
    weights: str = "bf16"  # how w lies in HBM: the operand dtype, or a weight-only quantized
    #   format of WEIGHT_QUANT (dequantized on chip: npu_sim.cost)

    def valid_rows(self) -> np.ndarray:
        """Real token rows of each task (its m_rows minus physically padded rows)."""
        if self.valid_m is None:
            return self.tasks["m_rows"]
        return np.clip(self.valid_m - self.tasks["m_start"], 0, self.tasks["m_rows"])

    @property
    def padding_waste(self) -> float:
        """Fraction of computed tile elements that are not real outputs: masked rows and columns
        (virtual padding) plus physically padded rows (bucket baseline)."""
        tm = np.array([self.menu[t].tm for t in self.tasks["tile"]])
        tn = np.array([self.menu[t].tn for t in self.tasks["tile"]])
        k_len = self.tasks["k_len"]  # split-K tasks weigh by their slice
        computed = float((tm * tn * k_len).sum())
        return 1.0 - float((self.valid_rows() * self.tasks["n_cols"] * k_len).sum()) / computed


class PrefillTiles(NamedTuple):
    """The Q tiles of an unsplit launch's multi-token sequences (UnsplitTiles), in tile order,
    each over all the KV its last query row sees: a few a step, Python ints."""

    position: tuple[int, ...]  # its index among the launch's tiles
    keys: tuple[int, ...]  # keys its last query row sees: start_pos + q_offset + q_rows
    q_rows: tuple[int, ...]  # its query tokens
    tile_rows: tuple[int, ...]  # the on-chip tile's stacked rows
    seq: tuple[int, ...]  # its sequence


class UnsplitTiles(NamedTuple):
    """A meta-kernel launch none of whose Q tiles is split into KV spans and none a verify
    chunk's, said by its lengths (AttentionKernel.unsplit): a tile per shape, each over all the
    KV its causal horizon reaches, shapes in tile order (sequence by sequence). A single-token
    sequence (a decode) is one tile of `decode_tile_rows` rows over its whole context; the
    tiles of the others are listed (`prefill`)."""

    context_lens: np.ndarray  # int64 (num_seqs,): each sequence's start_pos + q_len
    num_tokens: int  # query tokens, all sequences'
    decode_tile_rows: int  # a single-token sequence's tile rows
    # int64 (num_seqs,) each sequence's tiles, and int64 (num_tiles,) each tile's tile_rows x
    # KV blocks (the weight the tiles are dealt by, heaviest first); None: a tile per
    # sequence, every one a decode
    num_tiles: np.ndarray | None = None
    tile_work: np.ndarray | None = None
    prefill: PrefillTiles | None = None  # None: none but decodes


@dataclass(frozen=True, eq=False)
class AttentionKernel:
    """Meta-attention over a paged KV cache for every sequence of a mixed batch.

    One pattern (matmul-softmax-matmul with online softmax) serves prefill, chunked prefill,
    decode and verify rows alike; causality comes from each sequence's start_pos, and a token tree
    adds only its small (N, N) mask (`tree_masks`), applied row by row before softmax.
    """

    primitive: ClassVar[Primitive] = Primitive.ATTENTION
    name: str  # "attention"
    num_heads: int  # query heads
    num_kv_heads: int  # KV heads; query head h uses KV head h // (num_heads // num_kv_heads)
    head_dim: int  # features per head
    block_size: int  # tokens per KV block
    scale: float  # softmax scale, 1 / sqrt(head_dim)
    # The sequences and the three tables may be given as functions that build them (LazyArray):
    # the meta-kernel's tables are built on first read, timing reads only `shapes` and
    # `task_shape` (an unsplit launch: `unsplit` and `task_shape`).
    seqs: np.ndarray = LazyArray()  # ATTN_SEQ, (num_seqs,)
    block_tables: np.ndarray = LazyArray()  # int64 (num_seqs, max_num_blocks), -1 past a
    #   sequence's blocks
    tasks: np.ndarray = LazyArray()  # ATTN_TASK, (num_tasks,)
    combine_tasks: np.ndarray = LazyArray()  # COMBINE_TASK, (num_combine_tasks,); none when
    #   num_partial_slots is 0 (a combine task joins partials)
    num_partial_slots: int  # workspace slots the partial tasks write
    max_tile_rows: int  # largest tile_rows of any task (workspace row count)
    # Split-kernel baseline: int64 (num_tasks,) group of each task; a group (one core's run of
    # the PFA / IFA split) runs back to back on one core and groups are dealt round-robin in
    # order of first appearance. None = the
    # meta-kernel: every task is dealt on its own, symmetric round-robin over the heaviest-first
    # task list.
    task_group: np.ndarray | None = None
    # Split baseline: int64 (num_tasks, 2) [first query head within the KV head's group, number
    # of query heads] a task computes (one query head per task, as PFA / IFA split heads). None =
    # every task stacks all group_size query heads of its KV head.
    task_heads: np.ndarray | None = None
    # Decode-only launches may move QK onto the vector cores (the paper's 2-stage pipeline);
    # False keeps QK on the cube whatever the batch (the split baseline's decode kernel).
    vector_qk: bool = True
    # Token trees of verify chunks, ((seq, mask), ...) with seq an index into `seqs` (each at most
    # once) and mask a bool (N, N) array over the sequence's last N query rows and its last N keys,
    # the draft nodes in node order: mask[a, b] = node b is node a or an ancestor of it (built on
    # the host from the parents; a true diagonal, nothing above it). A draft row sees every key
    # before the first draft node and the draft keys its mask row allows; every other row stays
    # causal. A chain may be left out: its mask is the causal one.
    tree_masks: tuple[tuple[int, np.ndarray], ...] = ()
    # Split baseline (PFA-style verify): the sequences in tree_masks run with a full explicit
    # (q_len, context_len) mask read from GM and applied to every score of theirs, instead of the
    # in-kernel N x N block. Costing only: the numbers are the same either way.
    full_mask: bool = False
    # Meta-kernel: the distinct task shapes, when every shape is the same work on each of the
    # num_kv_heads KV heads (a tile and KV span of one sequence): ATTN_TASK (num_shapes,), the
    # KV head 0 task of each, and int64 (num_tasks,) the shape of every task. Costing only (a
    # task's cost does not depend on its KV head): the cost model prices each shape once. None
    # = price every task.
    # (`shapes` may be given as a function building it, LazyArray.)
    shapes: np.ndarray | None = LazyArray(default=None)
    task_shape: np.ndarray | None = None
    # Meta-kernel, a launch none of whose tiles is split into KV spans and none a verify
    # chunk's: its tiles said by their lengths (UnsplitTiles), from which the cost model prices
    # it without reading `seqs` or `shapes`. None = not such a launch, or not said.
    unsplit: UnsplitTiles | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_seqs(self) -> int:
        """Sequences (batch rows), without building the sequence table."""
        if self.unsplit is not None:
            return len(self.unsplit.context_lens)
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        """Query tokens, without building the sequence table."""
        if self.unsplit is not None:
            return self.unsplit.num_tokens
        return int(self.seqs["q_len"].sum())

    @property
    def num_tasks(self) -> int:
        """Attention tasks (not counting combine tasks), without building the task table."""
        return len(self.task_shape) if self.task_shape is not None else len(self.tasks)

    @property
    def num_combine_tasks(self) -> int:
        return len(self.combine_tasks) if self.num_partial_slots else 0

    def leading_tasks(self, n: int) -> np.ndarray:
        """ATTN_TASK rows of the first n tasks (in table order, the order they are dealt); from
        the shapes where listed, so the kv_head and partial_slot values are the shapes' (KV
        head 0's)."""
        if self.task_shape is not None and self.shapes is not None:
            return self.shapes[self.task_shape[:n]]
        return self.tasks[:n]


@dataclass(frozen=True, eq=False)
class CollectiveKernel:
    """One collective launch of a tensor-parallel group, seen from one of its ranks: no tasks on
    the AI cores (HCCL moves the data over HCCS); the launch occupies the stream for the
    collective's time (npu_sim.collectives)."""

    primitive: ClassVar[Primitive] = Primitive.COLLECTIVE
    name: str  # where in the model, e.g. "o_proj_all_reduce"
    op: CollectiveOp  # which collective
    num_bytes: int  # the message: the whole tensor (all-reduce) or the whole output (all-gather)
    world_size: int  # ranks (NPUs) in the group
    tasks: np.ndarray = dataclasses.field(  # no AI-core tasks (uniform with other kernels)
        default_factory=lambda: np.zeros(0, dtype=VECTOR_TASK))


Kernel = VectorKernel | GemmKernel | AttentionKernel | CollectiveKernel
