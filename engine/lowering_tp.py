"""Tensor parallelism over the NPUs of one node: what one card of a TP group runs.

Megatron-style sharding, as vLLM (and vLLM-Ascend) shard the Llama family:
- attention: query heads and KV heads split evenly over the cards (q/k/v column-parallel, each
  card owning whole heads and their KV cache); o_proj row-parallel, then an all-reduce of the
  (T, H) output;
- MLP: gate/up column-parallel over the intermediate width, down_proj row-parallel, then an
  all-reduce of the (T, H) output;
- embedding vocab-parallel (each card looks up the rows it owns, zeros elsewhere), then an
  all-reduce of the (T, H) embeddings; LM head vocab-parallel (ceil(V / tp) rows a card), then an
  all-gather of the (sampled, V) logits;
- norms, residual adds and the sampled rows' bookkeeping are replicated: every card runs them on
  the whole (T, H) activations.
So a card's GEMM and attention FLOPs, weight and KV bytes are 1 / tp of the model's; its
activations are not (a column-parallel GEMM reads the whole input on every card). The KV pool
is per card: a card holds 1 / tp of each token's KV and 1 / tp of the weights (`kv_pool_blocks`).
Collectives are `CollectiveKernel` launches (npu_sim.collectives times them over HCCS).
"""

from __future__ import annotations

import dataclasses
import functools

from engine.arch import ModelArch
from npu_sim.hardware import ChipSpec
from npu_sim.tasks import WEIGHT_QUANT, CollectiveKernel, CollectiveOp

ACTIVATION_BYTES = 2  # bf16 / fp16 activations and logits on the wire


@functools.lru_cache(maxsize=64)
def shard_arch(arch: ModelArch, tp: int) -> ModelArch:
    """The per-card shape of `arch` over `tp` cards: heads, KV heads, MLP width and vocabulary
    (rounded up) divided. ValueError naming the dimension when heads, KV heads or the
    intermediate width do not divide by tp."""
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    if tp == 1:
        return arch
    for what, value in (("num_heads", arch.num_heads), ("num_kv_heads", arch.num_kv_heads),
                        ("intermediate_size", arch.intermediate_size)):
        if value % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {what}={value}: each "
                             f"card must own whole heads and an equal share of the MLP")
    return dataclasses.replace(
        arch, num_heads=arch.num_heads // tp, num_kv_heads=arch.num_kv_heads // tp,
        intermediate_size=arch.intermediate_size // tp, vocab_size=-(-arch.vocab_size // tp))


def all_reduce(name: str, rows: int, cols: int, tp: int) -> CollectiveKernel:
    """An all-reduce of a (rows, cols) activation over the tp cards."""
    return CollectiveKernel(name=name, op=CollectiveOp.ALL_REDUCE,
                            num_bytes=rows * cols * ACTIVATION_BYTES, world_size=tp)


def all_gather(name: str, rows: int, cols_per_card: int, tp: int) -> CollectiveKernel:
    """An all-gather of (rows, cols_per_card) shards into a (rows, tp x cols_per_card) output."""
    return CollectiveKernel(name=name, op=CollectiveOp.ALL_GATHER,
                            num_bytes=rows * cols_per_card * tp * ACTIVATION_BYTES, world_size=tp)


def weight_bytes(arch: ModelArch, weight_dtype_bytes: int = 2, layer_weights: str = "bf16",
                 lm_head_weights: str = "bf16") -> float:
    """Bytes of the model's weights (engine.arch.ModelArch.num_params) in that dtype, the
    decoder layers' and the LM head's GEMM weights in their NPU formats (npu_sim.tasks:
    bf16, or weight-only w8a16 / w4a16 with their group scales)."""
    layer_gemms = arch.num_layers * arch.num_layer_gemm_params
    head = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    rest = arch.num_params - layer_gemms - head  # embedding, norms, biases
    return (rest * weight_dtype_bytes + layer_gemms * _per_weight(layer_weights, weight_dtype_bytes)
            + head * _per_weight(lm_head_weights, weight_dtype_bytes))


def _per_weight(weights: str, dtype_bytes: int) -> float:
    quant = WEIGHT_QUANT.get(weights)
    return dtype_bytes if quant is None else quant.bytes_per_weight


def kv_pool_blocks(arch: ModelArch, chip: ChipSpec, block_size: int, tp: int = 1,
                   memory_fraction: float = 0.9, kv_dtype_bytes: int = 2,
                   layer_weights: str = "bf16") -> int:
    """KV blocks one card's pool holds: `memory_fraction` of its HBM, less its 1 / tp of the
    weights (the decoder layers' GEMM weights in `layer_weights`), over the bytes a block of
    `block_size` tokens takes on the card (its 1 / tp of the KV heads, every layer, K and V).
    The pools of a TP group hold the same tokens. ValueError when the weights leave no room
    for a block."""
    card = shard_arch(arch, tp)
    per_card = weight_bytes(arch, layer_weights=layer_weights) / tp
    free = chip.hbm_bytes * memory_fraction - per_card
    per_block = 2 * arch.num_layers * card.num_kv_heads * arch.head_dim * kv_dtype_bytes
    blocks = int(free // (per_block * block_size))
    if blocks < 1:
        raise ValueError(f"the weights ({per_card / 2**30:.1f} GiB per card over {tp} card"
                         f"{'s' if tp > 1 else ''}) leave no room for the KV cache in "
                         f"{memory_fraction:.0%} of {chip.name}'s {chip.hbm_bytes / 2**30:.0f} "
                         f"GiB HBM; use more cards (--tensor-parallel-size)")
    return blocks
