"""Lowering: one engine step's batch -> the fixed-shape kernels of one transformer layer.

Every layer of a step has the same shapes, so a step is lowered once into a `StepPlan` whose
`layer` kernels are replayed for all layers. GEMM and vector task tables are cached by token
count (npu_sim.tiling); only the attention task table depends on the batch's sequences.

Pure functions of (chunks, model shape, chip, block size): no torch, no request objects.

Baselines are policies of the same lowering (`LoweringPolicy`), so every comparison runs the same
code. The default is XY-Serve's: virtual padding and the attention meta-kernel. The baselines:
- GemmPolicy.BUCKET: M padded to a static bucket (graph-mode style). Each GEMM's input is copied
  into a zero-padded (bucket x K) buffer by a vector kernel first (`LayerPlan.pads`), and the GEMM
  computes and writes every bucket row (`GemmKernel.valid_m` remembers the real ones), tiled as
  torch-npu's stack tiles it (ATB pp_matmul's heuristic: one tile shape, no split-K).
- AttentionPolicy.SPLIT: separate prefill and decode kernels split over the cores as torch-npu's
  PFA (contiguous runs of equal work) and IFA (contiguous runs of equal KV, or FlashDecoding KV
  spans plus a combine when the requests are few and long) split them, no cost sort across
  kernels; verify chunks run as prefill chunks with a full explicit mask
  (`lower_attention_split`).
Attention lowering (chunks, token trees, both policies) lives in engine.lowering_attention (its
tiles: engine.lowering_tiles; a batch of unsplit tiles: engine.lowering_unsplit) and is
re-exported here.
Baseline plans are for timing (a timing-only Device: the kernel sweeps, the timing-only runner);
the model's forward launches the default plan's kernels only. `step_launches` lists any plan's
launches.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.arch import ModelArch
from engine.lowering_attention import ChunkShape, lower_attention, tree_mask
from engine.lowering_split import lower_attention_split
from engine.lowering_tiles import MIN_KV_SPAN_TOKENS, ChunkLike
from engine.lowering_tp import all_gather, all_reduce, shard_arch
from npu_sim.gemm_tiling import atb_tiling, search_tiling, search_tilings
from npu_sim.hardware import ChipSpec
from npu_sim.step_sums import Launches, SharedLaunches
from npu_sim.tasks import (
    NPU_WEIGHT_FORMATS,
    AttentionKernel,
    CollectiveKernel,
    CopyOp,
    GemmKernel,
    Kernel,
    VectorKernel,
    VectorOp,
)
from npu_sim.tiling import vector_tasks

# Static M buckets of the bucket-padding baseline: powers of two from one cube fractal, the handful
# of shapes a graph-mode deployment compiles. (vLLM's CUDA-graph list is finer below 512: 1, 2, 4,
# then multiples of 8; LoweringPolicy takes any list.) M past the last bucket rounds up to a
# multiple of it.
GRAPH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class GemmPolicy(str, enum.Enum):
    VIRTUAL = "virtual"  # SmoothGEMM: menu tiles cover M, ragged rows masked on chip; tiles,
    #   N tile and split-K at the lowest modelled cost
    BUCKET = "bucket"  # baseline: M padded to a static bucket in memory, ATB pp_matmul tiling


class AttentionPolicy(str, enum.Enum):
    META = "meta"  # one meta-kernel for every row kind, tasks balanced by cost
    SPLIT = "split"  # baseline: prefill and decode kernels, split as torch-npu's PFA / IFA


@dataclass(frozen=True)
class LoweringPolicy:
    """How a step is lowered; the default is XY-Serve's."""

    gemm: GemmPolicy = GemmPolicy.VIRTUAL
    attention: AttentionPolicy = AttentionPolicy.META
    gemm_buckets: tuple[int, ...] = GRAPH_BUCKETS  # for GemmPolicy.BUCKET, ascending
    weights: str = "bf16"  # the decoder layers' GEMM weights in HBM (NPU_WEIGHT_FORMATS: bf16,
    #   or weight-only w8a16 / w4a16, widened on chip)
    lm_head_weights: str = "bf16"  # the LM head's

    def __post_init__(self) -> None:
        for name in ("weights", "lm_head_weights"):
            if getattr(self, name) not in NPU_WEIGHT_FORMATS:
                raise ValueError(f"{name} {getattr(self, name)!r}: not one of "
                                 f"{NPU_WEIGHT_FORMATS}")


DEFAULT_POLICY = LoweringPolicy()
BASELINE_POLICY = LoweringPolicy(GemmPolicy.BUCKET, AttentionPolicy.SPLIT)


def bucket_rows(m: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding m rows (past the last: a multiple of it)."""
    for b in buckets:
        if b >= m:
            return b
    return -(-m // buckets[-1]) * buckets[-1]


@dataclass(frozen=True)
class LayerPlan:
    """The kernels of one decoder layer, in launch order (replayed for every layer)."""

    qkv_proj: GemmKernel  # x (T, H) -> qkv (T, (Hq + 2 Hkv) D)
    rope: VectorKernel  # q, k rotated in place
    kv_write: VectorKernel  # k, v -> this layer's paged cache
    attention: AttentionKernel  # q + cache -> (T, Hq, D)
    o_proj: GemmKernel  # (T, Hq D) -> (T, H)
    post_attn_norm: VectorKernel  # residual += o; x = rmsnorm(residual)
    gate_up_proj: GemmKernel  # (T, H) -> (T, 2 I)
    silu_mul: VectorKernel  # (T, 2 I) -> (T, I)
    down_proj: GemmKernel  # (T, I) -> (T, H)
    next_input_norm: VectorKernel  # residual += down; x = rmsnorm(residual), next layer's input
    # bucket baseline: (GEMM field name, its pad copy), each launched right before its GEMM
    pads: tuple[tuple[str, VectorKernel], ...] = ()
    # split baseline: the decode kernel, launched right after `attention` (then the prefill
    # kernel; `attention` is the decode kernel itself when the batch has no prefill rows)
    decode_attention: AttentionKernel | None = None
    # tensor parallelism (engine.lowering_tp): the all-reduces of the row-parallel o_proj and
    # down_proj outputs, each launched right after its GEMM; None on one card
    o_proj_all_reduce: CollectiveKernel | None = None
    down_proj_all_reduce: CollectiveKernel | None = None


@dataclass(frozen=True)
class StepPlan:
    """All kernels of one step: embed, first norm, the layer (x num_layers), final norm, LM head."""

    embed: VectorKernel  # token ids (T,) -> (T, H)
    first_norm: VectorKernel  # layer 0's input norm (no residual yet)
    layer: LayerPlan
    final_norm: VectorKernel  # on the sampled rows only: residual += down; rmsnorm
    lm_head: GemmKernel | None  # (num_sampled, H) -> (num_sampled, V); None if nothing sampled
    num_tokens: int  # T, tokens in the batch
    num_sampled: int  # rows the LM head runs on
    lm_head_pad: VectorKernel | None = None  # bucket baseline: the LM head input's pad copy
    tp: int = 1  # tensor-parallel cards; the kernels are one card's (engine.lowering_tp)
    embed_all_reduce: CollectiveKernel | None = None  # TP: joins the vocab-parallel lookups
    lm_head_all_gather: CollectiveKernel | None = None  # TP: joins the vocab-parallel logits


def lower_step(chunks: Sequence[ChunkLike], num_sampled: int, arch: ModelArch, chip: ChipSpec,
               block_size: int, policy: LoweringPolicy = DEFAULT_POLICY, tp: int = 1) -> StepPlan:
    """Lower a batch (chunks in batch order) into the step's kernels: on one card of a `tp`-card
    tensor-parallel group, the card's shards plus the group's collectives (engine.lowering_tp;
    ValueError when heads, KV heads or the MLP width do not divide by tp).

    Only attention depends on the chunks themselves; every other kernel is a function of the
    token count and the sampled rows, built once per such pair (`_dense_kernels`) and shared
    by every step that has them (so the device's timing caches hit on the very same kernels).
    """
    card = shard_arch(arch, tp)
    attention, t = _lower_attention(chunks, card, chip, block_size, policy)
    return _step_plan(attention, t, num_sampled, card, chip, policy, tp)


def lower_step_counts(chunks: Sequence[ChunkLike], num_sampled: int, arch: ModelArch,
                      chip: ChipSpec, block_size: int, num_layers: int,
                      policy: LoweringPolicy = DEFAULT_POLICY, tp: int = 1,
                      ) -> tuple[SharedLaunches, tuple[AttentionKernel, ...]]:
    """`step_launch_counts(lower_step(chunks, num_sampled, arch, chip, block_size, policy, tp),
    num_layers)`, what a timing-only step needs (Device.time_launches), without building the
    step's plan where the launches it shares with other steps are known already."""
    card = shard_arch(arch, tp)
    attention, t = _lower_attention(chunks, card, chip, block_size, policy)
    return _shared_launches(attention, t, num_sampled, card, chip, num_layers, policy,
                            tp), attention


def shared_launch_counts(num_tokens: int, num_sampled: int, arch: ModelArch, chip: ChipSpec,
                         block_size: int, num_layers: int,
                         policy: LoweringPolicy = DEFAULT_POLICY, tp: int = 1) -> SharedLaunches:
    """`lower_step_counts(chunks, num_sampled, ...)[0]` for any chunks of `num_tokens` tokens
    in all, under meta attention (one attention kernel a layer), without lowering theirs: what
    a step shares with others depends on its token and sampled-row counts alone (its attention
    kernel's place is None there, whichever kernel it is)."""
    if policy.attention is not AttentionPolicy.META:
        raise ValueError("shared_launch_counts: meta attention only (the split baseline's "
                         "kernels depend on the chunks)")
    card = shard_arch(arch, tp)
    stand_in = (_one_decode_attention(card, chip, block_size),)  # (marks the place only)
    return _shared_launches(stand_in, num_tokens, num_sampled, card, chip, num_layers, policy,
                            tp)


@functools.lru_cache(maxsize=64)
def _one_decode_attention(card: ModelArch, chip: ChipSpec, block_size: int) -> AttentionKernel:
    """The attention kernel of one decode at position 0 (shared_launch_counts' stand-in)."""
    return lower_attention([ChunkShape(start_pos=0, num_tokens=1, block_ids=(0,))], card, chip,
                           block_size)


def _shared_launches(attention: tuple[AttentionKernel, ...], t: int, num_sampled: int,
                     card: ModelArch, chip: ChipSpec, num_layers: int, policy: LoweringPolicy,
                     tp: int) -> SharedLaunches:
    """The launches a step of t tokens, num_sampled sampled, with these attention kernels
    (their number: their places) shares with others (step_launch_counts'), kept per kernel
    set: its plan built only the first time."""
    embed = _token_kernels(t, card, chip, policy, tp)[1]["embed"]
    final_norm = _sampled_kernels(num_sampled, card, chip, policy, tp)["final_norm"]
    shared = _known_shared_launches(embed, final_norm, num_layers, len(attention))
    if shared is None:
        plan = _step_plan(attention, t, num_sampled, card, chip, policy, tp)
        shared = step_launch_counts(plan, num_layers)[0]
    return shared


def _lower_attention(chunks: Sequence[ChunkLike], card: ModelArch, chip: ChipSpec,
                     block_size: int, policy: LoweringPolicy,
                     ) -> tuple[tuple[AttentionKernel, ...], int]:
    """(the step's attention kernels, in launch order; the batch's tokens) on one card."""
    if policy.attention is AttentionPolicy.META:
        kernel = lower_attention(chunks, card, chip, block_size)
        return (kernel,), kernel.num_tokens  # the batch's tokens, counted once already
    return (lower_attention_split(chunks, card, chip, block_size),
            sum(c.num_tokens for c in chunks))


def _step_plan(attention: tuple[AttentionKernel, ...], t: int, num_sampled: int,
               card: ModelArch, chip: ChipSpec, policy: LoweringPolicy, tp: int) -> StepPlan:
    """The StepPlan of a step of t tokens with these attention kernels (the split baseline's
    prefill kernel, if any, first)."""
    layer_kernels, step_kernels = _dense_kernels(t, num_sampled, card, chip, policy, tp)
    return StepPlan(layer=LayerPlan(attention=attention[0],
                                    decode_attention=attention[1] if len(attention) > 1 else None,
                                    **layer_kernels),
                    num_tokens=t, num_sampled=num_sampled, tp=tp, **step_kernels)


def _dense_kernels(t: int, num_sampled: int, arch: ModelArch, chip: ChipSpec,
                   policy: LoweringPolicy, tp: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LayerPlan fields, StepPlan fields) of everything but attention, for t tokens of which
    num_sampled are sampled, on one card (`arch` is its shard): the kernels of the token count
    (`_token_kernels`) and of the sampled rows (`_sampled_kernels`), each shared by every step
    that has it. Read, never change, the kernels."""
    layer, step = _token_kernels(t, arch, chip, policy, tp)
    return layer, {**step, **_sampled_kernels(num_sampled, arch, chip, policy, tp)}


@functools.lru_cache(maxsize=1 << 14)
def _token_kernels(t: int, arch: ModelArch, chip: ChipSpec, policy: LoweringPolicy, tp: int,
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LayerPlan fields but attention, StepPlan fields embed .. first_norm) for t tokens on
    one card. Cached: one set of kernel objects per token count, whatever the sampled rows."""
    h, d = arch.hidden_size, arch.head_dim
    pads: dict[str, VectorKernel] = {}
    # (n, k) of each layer GEMM; SmoothGEMM searches their tilings in one batch
    shapes = {"qkv_proj": ((arch.num_heads + 2 * arch.num_kv_heads) * d, h),
              "o_proj": (h, arch.num_heads * d),
              "gate_up_proj": (2 * arch.intermediate_size, h),
              "down_proj": (h, arch.intermediate_size)}
    if policy.gemm is GemmPolicy.VIRTUAL:
        search_tilings(t, tuple(shapes.values()), chip)

    def gemm(name: str) -> GemmKernel:
        pad, kernel = _policy_gemm(name, t, *shapes[name], chip, policy)
        if pad is not None:
            pads[name] = pad
        return kernel

    layer = {
        "qkv_proj": gemm("qkv_proj"),
        "rope": _vector("rope", VectorOp.ROPE, t, (arch.num_heads + arch.num_kv_heads) * d, chip),
        "kv_write": _vector("kv_write", VectorOp.KV_WRITE, t, 2 * arch.num_kv_heads * d, chip),
        "o_proj": gemm("o_proj"),
        "post_attn_norm": _vector("post_attention_norm", VectorOp.ADD_RMSNORM, t, h, chip),
        "gate_up_proj": gemm("gate_up_proj"),
        "silu_mul": _vector("silu_mul", VectorOp.SILU_MUL, t, 2 * arch.intermediate_size, chip),
        "down_proj": gemm("down_proj"),
        "next_input_norm": _vector("input_norm", VectorOp.ADD_RMSNORM, t, h, chip),
        "o_proj_all_reduce": all_reduce("o_proj_all_reduce", t, h, tp) if tp > 1 else None,
        "down_proj_all_reduce": all_reduce("down_proj_all_reduce", t, h, tp) if tp > 1 else None,
    }
    layer["pads"] = tuple(pads.items())  # the bucket baseline's, in launch order
    step: dict[str, Any] = {
        "embed": _vector("embed", VectorOp.EMBED, t, h, chip),
        "first_norm": _vector("input_norm", VectorOp.RMSNORM, t, h, chip),
    }
    if tp > 1:
        step["embed_all_reduce"] = all_reduce("embed_all_reduce", t, h, tp)
    return layer, step


@functools.lru_cache(maxsize=1 << 12)
def _sampled_kernels(num_sampled: int, arch: ModelArch, chip: ChipSpec, policy: LoweringPolicy,
                     tp: int) -> dict[str, Any]:
    """StepPlan fields final_norm .. lm_head_all_gather for num_sampled sampled rows on one
    card. Cached: one set of kernel objects per sampled row count, whatever the token count."""
    h = arch.hidden_size
    pad, lm_head = _policy_gemm("lm_head", num_sampled, arch.vocab_size, h, chip, policy) if (
        num_sampled) else (None, None)
    step: dict[str, Any] = {
        "final_norm": _vector("final_norm", VectorOp.ADD_RMSNORM, num_sampled, h, chip),
        "lm_head": lm_head,
        "lm_head_pad": pad,
    }
    if tp > 1 and num_sampled:
        step["lm_head_all_gather"] = all_gather("lm_head_all_gather", num_sampled,
                                                arch.vocab_size, tp)
    return step


def _policy_gemm(name: str, m: int, n: int, k: int, chip: ChipSpec, policy: LoweringPolicy,
                 ) -> tuple[VectorKernel | None, GemmKernel]:
    """lower_gemm, the GEMM streaming its weights in the policy's format (the LM head's, or the
    decoder layers'): the tiling is the 16-bit GEMM's, the format changes what it streams."""
    pad, kernel = lower_gemm(name, m, n, k, chip, policy)
    weights = policy.lm_head_weights if name == "lm_head" else policy.weights
    return pad, kernel if weights == "bf16" else dataclasses.replace(kernel, weights=weights)


def _vector(name: str, op: VectorOp, rows: int, row_len: int, chip: ChipSpec) -> VectorKernel:
    return VectorKernel(name=name, op=op, num_rows=rows, row_len=row_len,
                        tasks=vector_tasks(rows, row_len, chip))


def lower_gemm(name: str, m: int, n: int, k: int, chip: ChipSpec,
               policy: LoweringPolicy = DEFAULT_POLICY) -> tuple[VectorKernel | None, GemmKernel]:
    """(pad copy or None, GEMM) for `out[m, n] = x[m, k] @ w[n, k]^T` under `policy`: SmoothGEMM
    tiles the real m by the lowest modelled cost (npu_sim.gemm_tiling.search_tiling); the bucket
    baseline pads m to its bucket and tiles it as torch-npu's stack does (ATB pp_matmul's tiling,
    npu_sim.gemm_tiling.atb_tiling)."""
    if policy.gemm is GemmPolicy.VIRTUAL:
        return None, search_tiling(m, n, k, chip).kernel(name, m, n, k, chip)
    padded = bucket_rows(m, policy.gemm_buckets)
    pad = VectorKernel(name=f"{name}_pad", op=CopyOp.PAD_COPY, num_rows=padded, row_len=k,
                       tasks=vector_tasks(padded, k, chip), valid_rows=m)
    return pad, atb_tiling(padded, n, k, chip).kernel(name, padded, n, k, chip, valid_m=m)


_LAYER_ORDER = ("qkv_proj", "rope", "kv_write", "attention", "o_proj", "post_attn_norm",
                "gate_up_proj", "silu_mul", "down_proj")


def layer_launches(layer: LayerPlan, last: bool = False) -> list[Kernel]:
    """One layer's launches in order, baseline extras and TP collectives included; the last
    layer has no next_input_norm (the final norm follows, on the sampled rows only)."""
    pads = dict(layer.pads)
    out: list[Kernel] = []
    for name in _LAYER_ORDER:
        if name in pads:
            out.append(pads[name])
        out.append(getattr(layer, name))
        if name == "attention" and layer.decode_attention is not None:
            out.append(layer.decode_attention)
        collective = getattr(layer, f"{name}_all_reduce", None)
        if collective is not None:
            out.append(collective)
    if not last:
        out.append(layer.next_input_norm)
    return out


def step_launches(plan: StepPlan, num_layers: int) -> list[Kernel]:
    """Every launch of a step in the order the model's forward makes them
    (engine.models.llama.LlamaModel.forward), baseline extras included."""
    out: list[Kernel] = [plan.embed]
    if plan.embed_all_reduce is not None:
        out.append(plan.embed_all_reduce)
    out.append(plan.first_norm)
    body, last = layer_launches(plan.layer), layer_launches(plan.layer, last=True)
    for i in range(num_layers):
        out += last if i + 1 == num_layers else body
    if plan.lm_head is not None:
        out.append(plan.final_norm)
        if plan.lm_head_pad is not None:
            out.append(plan.lm_head_pad)
        out.append(plan.lm_head)
        if plan.lm_head_all_gather is not None:
            out.append(plan.lm_head_all_gather)
    return out


# Shared launches (step_launch_counts) kept per kernel set, each entry (kernels, launches)
# holding the kernels whose ids key it (so an id names its set while the entry lives): heads per
# token count's kernels, by the embed kernel's id; whole ones per token count's and sampled
# rows' kernels, by the embed and final norm kernels' ids.
_HEADS: dict[tuple[int, int, int], tuple[tuple[VectorKernel], Launches]] = {}
_SHARED_LAUNCHES: dict[tuple[int, int, int, int],
                       tuple[tuple[VectorKernel, VectorKernel], SharedLaunches]] = {}
_SHARED_LAUNCHES_LIMIT = 1 << 14  # kernel sets per dict, as _token_kernels keeps


def step_launch_counts(plan: StepPlan, num_layers: int,
                       ) -> tuple[SharedLaunches, tuple[AttentionKernel, ...]]:
    """`step_launches(plan, num_layers)` as (kernel, times launched), each kernel once, in the
    order of its first launch, without walking the layers, split as a timing-only device takes
    them (Device.time_launches): the launches every step of the plan's token count and sampled
    rows shares, None where its attention kernels go (one object per such set of kernels,
    built on its first step: the device keys its sums by it; its head, the launches up to the
    last layer's, one tuple per token count's kernels), and the step's attention kernels."""
    layer = plan.layer
    attention = (layer.attention,) if layer.decode_attention is None else (
        layer.attention, layer.decode_attention)
    shared = _known_shared_launches(plan.embed, plan.final_norm, num_layers, len(attention))
    if shared is None:
        head_key = (id(plan.embed), num_layers, len(attention))
        head = _kept(_HEADS, head_key, (plan.embed,))
        if head is None:
            head = tuple((None if isinstance(kernel, AttentionKernel) else kernel, n)
                         for kernel, n in _launch_counts(_head_launches(plan, num_layers)))
            _keep(_HEADS, head_key, ((plan.embed,), head))
        shared = SharedLaunches(head, _launch_counts(_tail_launches(plan)))
        _keep(_SHARED_LAUNCHES, (id(plan.embed), id(plan.final_norm), num_layers,
                                 len(attention)), ((plan.embed, plan.final_norm), shared))
    return shared, attention


def _known_shared_launches(embed: VectorKernel, final_norm: VectorKernel, num_layers: int,
                           num_attention: int) -> SharedLaunches | None:
    """The shared launches kept for the kernel sets of `embed` (the token count's: _token_kernels
    builds them together) and `final_norm` (the sampled rows': _sampled_kernels), or None."""
    return _kept(_SHARED_LAUNCHES, (id(embed), id(final_norm), num_layers, num_attention),
                 (embed, final_norm))


def _kept(cache: dict[Any, Any], key: Any, kernels: tuple[Kernel, ...]) -> Any:
    """The launches kept under `key` if its entry holds these very `kernels` (their ids are in
    the key), else None."""
    entry = cache.get(key)
    if entry is not None and all(map(operator.is_, entry[0], kernels)):
        return entry[1]
    return None


def _keep(cache: dict[Any, Any], key: Any, entry: Any) -> None:
    """cache[key] = entry ((kernels, launches)), the cache emptied first when full."""
    if len(cache) >= _SHARED_LAUNCHES_LIMIT:
        cache.clear()
    cache[key] = entry


def _head_launches(plan: StepPlan, num_layers: int,
                   ) -> list[tuple[Sequence[Kernel | None], int]]:
    """step_launches(plan, num_layers) up to the last layer's, as (kernels, times each)."""
    return [((plan.embed, plan.embed_all_reduce, plan.first_norm), 1),
            (layer_launches(plan.layer), num_layers - 1),
            (layer_launches(plan.layer, last=True), 1)]


def _tail_launches(plan: StepPlan) -> list[tuple[Sequence[Kernel | None], int]]:
    """step_launches(plan, num_layers) after the last layer's, as (kernels, times each)."""
    if plan.lm_head is None:
        return []
    return [((plan.final_norm, plan.lm_head_pad, plan.lm_head, plan.lm_head_all_gather), 1)]


def _launch_counts(launches: Sequence[tuple[Sequence[Kernel | None], int]],
                   ) -> tuple[tuple[Kernel, int], ...]:
    """Every kernel of `launches` ((kernels, times each), None kernels skipped) once, with its
    launches, in the order of its first launch."""
    counts: dict[int, list] = {}
    for kernels, times in launches:
        for kernel in kernels:
            if kernel is not None and times:
                counts.setdefault(id(kernel), [kernel, 0])[1] += times
    return tuple((kernel, n) for kernel, n in counts.values())


__all__ = [
    "BASELINE_POLICY", "DEFAULT_POLICY", "GRAPH_BUCKETS", "MIN_KV_SPAN_TOKENS", "AttentionPolicy",
    "ChunkLike", "ChunkShape", "GemmPolicy", "LayerPlan", "LoweringPolicy", "StepPlan",
    "bucket_rows", "layer_launches", "lower_attention", "lower_attention_split", "lower_gemm",
    "lower_step", "lower_step_counts", "shared_launch_counts", "step_launch_counts",
    "step_launches", "tree_mask",
]
