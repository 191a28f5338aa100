"""Tensor-parallel lowering (engine.lowering_tp): Megatron sharding of one card's step, the
collectives it launches, the per-card share of FLOPs and bytes, and the per-card KV pool."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.kernels.harness import fake_chunks
from engine.arch_presets import get_arch
from engine.lowering import lower_step, step_launches
from engine.lowering_tp import kv_pool_blocks, shard_arch, weight_bytes
from npu_sim.collectives import bytes_moved
from npu_sim.cost import CostModel
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.tasks import CollectiveKernel, CollectiveOp, GemmKernel, Primitive

B2 = get_chip("910b2")
LLAMA = get_arch("llama-2-7b")


@pytest.mark.parametrize("arch,tp,what", [
    (LLAMA, 3, "num_heads=32"),
    (get_arch("qwen2.5-7b"), 7, "num_kv_heads=4"),  # 28 heads divide by 7, 4 KV heads not
    (dataclasses.replace(LLAMA, intermediate_size=11000), 16, "intermediate_size=11000"),
])
def test_shapes_that_do_not_divide_are_a_clear_error(arch, tp: int, what: str) -> None:
    with pytest.raises(ValueError, match=f"does not divide {what}"):
        lower_step(fake_chunks([(0, 8)], 128), 1, arch, B2, 128, tp=tp)


def test_a_layer_all_reduces_after_o_proj_and_down_proj() -> None:
    plan = lower_step(fake_chunks([(0, 40), (300, 1)], 128), 2, LLAMA, B2, 128, tp=4)
    launches = step_launches(plan, LLAMA.num_layers)
    names = [k.name for k in launches]
    for gemm in ("o_proj", "down_proj"):
        i = names.index(gemm)
        assert names[i + 1] == f"{gemm}_all_reduce"
        ar = launches[i + 1]
        assert isinstance(ar, CollectiveKernel) and ar.op is CollectiveOp.ALL_REDUCE
        assert ar.num_bytes == 41 * LLAMA.hidden_size * 2 and ar.world_size == 4
    collectives = [k for k in launches if k.primitive is Primitive.COLLECTIVE]
    assert len(collectives) == 2 * LLAMA.num_layers + 2  # + embedding, + LM head
    assert names[1] == "embed_all_reduce" and names[-1] == "lm_head_all_gather"
    gather = launches[-1]
    assert gather.op is CollectiveOp.ALL_GATHER and gather.num_bytes == 2 * 32000 * 2
    assert plan.layer.qkv_proj.n == (32 + 2 * 32) // 4 * 128  # a quarter of the heads
    assert plan.layer.gate_up_proj.n == 2 * 11008 // 4 and plan.lm_head.n == 32000 // 4
    assert plan.layer.attention.num_heads == 8 and plan.layer.attention.num_kv_heads == 8
    one = lower_step(fake_chunks([(0, 40), (300, 1)], 128), 2, LLAMA, B2, 128)
    assert not any(k.primitive is Primitive.COLLECTIVE for k in step_launches(one, 2))


def _totals(tp: int, specs: list[tuple[int, int]]) -> dict[str, float]:
    """One card's GEMM + attention FLOPs (the attention tasks' scores; a card with fewer heads
    may split long KV into more spans, whose combine work comes on top), weight bytes, attention
    HBM bytes and collective bytes over one layer plus the LM head."""
    plan = lower_step(fake_chunks(specs, 128), len(specs), LLAMA, B2, 128, tp=tp)
    device = Device(B2, compute=False)
    lp = plan.layer
    gemms = [lp.qkv_proj, lp.o_proj, lp.gate_up_proj, lp.down_proj, plan.lm_head]
    attention = device.time(lp.attention)
    collectives = [k for k in step_launches(plan, 1) if isinstance(k, CollectiveKernel)]
    return {
        "flops": sum(device.time(g).flops for g in gemms)
        + CostModel(B2).attention(lp.attention)[0].flops,
        "weight_bytes": sum(g.n * g.k * 2 for g in gemms if isinstance(g, GemmKernel)),
        # KV from HBM: the attention's reads less each task's Q tile (span tasks reload theirs)
        "kv_bytes": attention.hbm_read_bytes - float(
            (lp.attention.tasks["q_rows"] * lp.attention.group_size).sum()) * LLAMA.head_dim * 2,
        "collective_bytes": sum(bytes_moved(k.op, k.num_bytes, k.world_size)
                                for k in collectives),
    }


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_cards_share_the_model_exactly_plus_the_collectives(tp: int) -> None:
    """Decode batch: tp cards' GEMM and attention FLOPs, weight bytes and KV bytes add up to the
    unsharded model's; on top, each card moves its ring share of every collective."""
    specs = [(c, 1) for c in (100, 700, 1500, 3000)]
    one, card = _totals(1, specs), _totals(tp, specs)
    for key in ("flops", "weight_bytes", "kv_bytes"):
        assert tp * card[key] == pytest.approx(one[key], rel=1e-9), key
    h, t = LLAMA.hidden_size, len(specs)
    all_reduces = 3 * 2 * (tp - 1) / tp * t * h * 2  # o_proj, down_proj, embedding
    gather = (tp - 1) / tp * t * LLAMA.vocab_size * 2
    assert one["collective_bytes"] == 0
    assert card["collective_bytes"] == pytest.approx(all_reduces + gather)


def test_kv_pool_is_per_card() -> None:
    arch = get_arch("llama-2-70b")
    with pytest.raises(ValueError, match="leave no room"):  # 138 GB of weights on one 64 GiB card
        kv_pool_blocks(arch, B2, 128, tp=1)
    four, eight = (kv_pool_blocks(arch, B2, 128, tp=tp) for tp in (4, 8))
    assert eight > 2 * four  # half the KV heads and half the weights a card
    per_block = 2 * 80 * (8 // 8) * 128 * 2 * 128
    assert eight == int((B2.hbm_bytes * 0.9 - weight_bytes(arch) / 8) // per_block)
    assert shard_arch(arch, 8).num_kv_heads == 1
