"""Weight-only quantized GEMMs on the simulated NPU (W8A16, W4A16): fewer HBM bytes, so a decode
step bound by the weight stream gets faster; a compute-bound prefill pays the AIVs' widening
instead. The engine lowers the served model's weights as they ship, and simulate takes
--npu-weights."""

from __future__ import annotations

import json
import pathlib

import pytest

from engine.arch_presets import get_arch
from engine.lowering import LoweringPolicy, lower_gemm, lower_step, step_launch_counts
from engine.lowering_attention import ChunkShape
from engine.lowering_tp import kv_pool_blocks, weight_bytes
from npu_sim.cost import CostModel, Unit
from npu_sim.device import Device
from npu_sim.hardware import load_chip
from npu_sim.tasks import WEIGHT_QUANT
from server.cli import main

CHIP = load_chip("910b2")
ARCH = get_arch("llama-2-7b")


def _gemm(m: int, n: int, k: int, weights: str) -> tuple[float, float]:
    """(seconds, HBM bytes read) of one launch."""
    _, kernel = lower_gemm("down_proj", m, n, k, CHIP)
    if weights != "bf16":
        kernel = kernel.__class__(**{**kernel.__dict__, "weights": weights})
    timing = Device(CHIP, compute=False).time(kernel)
    return timing.seconds, timing.hbm_read_bytes


def test_quantized_weights_stream_fewer_bytes_and_decode_faster() -> None:
    n, k = 4096, 11008
    bf16_s, bf16_bytes = _gemm(1, n, k, "bf16")
    w8_s, w8_bytes = _gemm(1, n, k, "w8a16")
    w4_s, w4_bytes = _gemm(1, n, k, "w4a16")
    weights = n * k
    # the weight stream dominates a one-row GEMM's HBM reads: 2, 1.0625, 0.625 bytes a weight
    assert bf16_bytes == pytest.approx(2 * weights, rel=0.02)
    assert w8_bytes == pytest.approx(WEIGHT_QUANT["w8a16"].bytes_per_weight * weights, rel=0.02)
    assert w4_bytes == pytest.approx(0.625 * weights, rel=0.02)
    assert w4_s < w8_s < bf16_s
    assert bf16_s / w4_s > 1.4  # bound by HBM: close to the bytes saved, less the widening


def test_a_compute_bound_gemm_gains_nothing_and_pays_the_widening() -> None:
    bf16_s, _ = _gemm(2048, 4096, 11008, "bf16")
    w4_s, _ = _gemm(2048, 4096, 11008, "w4a16")
    assert 1.0 <= w4_s / bf16_s < 1.15


def test_a_quantized_gemm_is_a_mix_task_with_vector_work() -> None:
    _, kernel = lower_gemm("qkv_proj", 16, 4096, 4096, CHIP)
    quantized = kernel.__class__(**{**kernel.__dict__, "weights": "w4a16"})
    cm = CostModel(CHIP)
    plain, widened = cm.gemm(kernel), cm.gemm(quantized)
    assert plain.unit is Unit.AIC and plain.vector_active_cycles == 0.0
    assert widened.unit is Unit.MIX and widened.vector_active_cycles > 0.0
    assert widened.flops == plain.flops and widened.pipeline == "gemm-w4a16"


def test_lowering_quantizes_the_layers_and_the_lm_head_as_asked() -> None:
    chunks = [ChunkShape(100, 1, (0,))]
    policy = LoweringPolicy(weights="w4a16", lm_head_weights="w8a16")
    plan = lower_step(chunks, 1, ARCH, CHIP, 128, policy)
    assert {plan.layer.qkv_proj.weights, plan.layer.gate_up_proj.weights} == {"w4a16"}
    assert plan.lm_head.weights == "w8a16"
    assert lower_step(chunks, 1, ARCH, CHIP, 128).layer.down_proj.weights == "bf16"
    with pytest.raises(ValueError, match="weights 'int3'"):
        LoweringPolicy(weights="int3")


def test_a_decode_step_is_faster_and_the_pool_larger_with_w4a16() -> None:
    chunks = [ChunkShape(1023, 1, tuple(range(8)))]
    seconds = {}
    for weights in ("bf16", "w4a16"):
        plan = lower_step(chunks, 1, ARCH, CHIP, 128, LoweringPolicy(weights=weights))
        trace = Device(CHIP, compute=False).time_launches(*step_launch_counts(
            plan, ARCH.num_layers), num_requests=1)
        seconds[weights] = trace.device_s
    assert seconds["bf16"] / seconds["w4a16"] > 1.4
    # layers' GEMM weights at 0.625 bytes, the rest (embedding, LM head, norms) in bf16
    assert weight_bytes(ARCH, layer_weights="w4a16") == pytest.approx(
        weight_bytes(ARCH) * 0.34, rel=0.05)
    assert kv_pool_blocks(ARCH, CHIP, 128, layer_weights="w4a16") > kv_pool_blocks(
        ARCH, CHIP, 128)


def test_simulate_takes_npu_weights(tmp_path: pathlib.Path) -> None:
    tpot = {}
    for weights in ("bf16", "w4a16"):
        out = tmp_path / weights
        assert main(["simulate", "--synthetic", "--num-requests", "8", "--request-rate", "2",
                     "--input-len", "200", "--output-len", "32", "--npu-weights", weights,
                     "--out", str(out), "--no-plots", "--no-progress"]) == 0
        tpot[weights] = json.loads((out / "summary.json").read_text())["tpot_s"]["p50"]
    assert tpot["w4a16"] < 0.8 * tpot["bf16"]
