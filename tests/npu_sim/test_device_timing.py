"""Device timing: dispatch to cores, KernelTiming / StepTrace consistency, timing-only mode,
meta-kernel load balance against the split baseline, and the model's real launch sequence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.kernels.harness import fake_chunks, time_step
from engine.arch import ModelArch
from engine.arch_presets import get_arch
from engine.lowering import (
    BASELINE_POLICY,
    ChunkShape,
    lower_attention,
    lower_attention_split,
    lower_gemm,
    lower_step,
    step_launches,
)
from npu_sim.dealing import deal
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.host import get_stack
from npu_sim.kernels import run_gemm
from npu_sim.tasks import GemmKernel, Primitive, VectorKernel, VectorOp
from npu_sim.tiling import gemm_menu, gemm_tasks, vector_tasks

B2 = get_chip("910b2")
SMALL = ModelArch("LlamaForCausalLM", 3, 96, 6, 2, 16, 200, 1000, 1e-6, 4096, True, False,
                  (2,), 1)


# ------------------------------------------------------------------------------- dispatch

def test_symmetric_round_robin_deals_1_to_n_then_n_to_1() -> None:
    core, block = deal(10, 4, symmetric=True)
    assert block == 4
    assert core.tolist() == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1]
    core, block = deal(10, 4)
    assert core.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    core, block = deal(3, 24, symmetric=True)  # block_dim = min(tasks, cores)
    assert block == 3 and core.tolist() == [0, 1, 2]


def test_groups_stay_on_one_core_and_are_dealt_in_order() -> None:
    groups = np.array([7, 7, 7, 2, 2, 9, 4])
    core, block = deal(len(groups), 2, groups=groups)
    assert block == 2
    assert core.tolist() == [0, 0, 0, 1, 1, 0, 1]


def test_device_deals_meta_attention_symmetrically_and_split_groups_in_order() -> None:
    # 24 decodes of distinct lengths x 2 KV heads = 48 tasks, heaviest first
    chunks = fake_chunks([(20 + 10 * i, 1) for i in range(24)], 16)
    device = Device(B2, compute=False)
    meta = device.time(lower_attention(chunks, SMALL, B2, 16))
    assert meta.task_core.tolist() == list(range(24)) + list(range(23, -1, -1))
    (split,) = lower_attention_split(chunks, SMALL, B2, 16)
    timing = device.time(split)
    assert timing.task_core.tolist() == [g % 24 for g in range(48)]  # one task per group


def test_gemm_runs_on_cube_cores_and_vector_ops_on_vector_cores() -> None:
    device = Device(B2, compute=False)
    menu = gemm_menu(B2)
    g = device.time(GemmKernel("g", 64, 1024, 512, menu, gemm_tasks(64, 1024, 512, menu)))
    assert len(g.kernel.tasks) == 4  # 4 N tiles of 256
    assert g.block_dim == 4 and (g.cube_busy_cycles[:4] > 0).all()
    assert not g.cube_busy_cycles[4:].any() and not g.vector_busy_cycles.any()
    v = device.time(VectorKernel("n", VectorOp.RMSNORM, 3, 96, vector_tasks(3, 96, B2)))
    assert not v.cube_busy_cycles.any() and (v.vector_busy_cycles > 0).sum() == v.block_dim
    # a kernel takes its launch overhead plus its busiest core
    assert g.cycles == pytest.approx(g.launch_cycles + g.cube_busy_cycles.max())
    assert g.launch_cycles == pytest.approx(B2.cube_launch_s * B2.clock_hz)
    assert v.launch_cycles == pytest.approx(B2.vector_launch_s * B2.clock_hz)


def test_attention_tasks_occupy_a_cube_core_and_its_vector_cores() -> None:
    arch = get_arch("llama-2-7b")
    timing = Device(B2, compute=False).time(
        lower_attention(fake_chunks([(0, 300), (900, 1)], 128), arch, B2, 128))
    aic = timing.cube_busy_cycles
    np.testing.assert_allclose(timing.vector_busy_cycles[0::2], aic)
    np.testing.assert_allclose(timing.vector_busy_cycles[1::2], aic)


# ------------------------------------------------------------------------ load balance

def _balance(timings: list, num_cores: int) -> float:
    """Perfect balance (all cores' busy time spread evenly) over the actual makespan."""
    busy = sum(float(t.cube_busy_cycles.sum()) for t in timings)
    makespan = sum(float(t.cube_busy_cycles.max()) for t in timings)
    return busy / num_cores / makespan


@pytest.mark.parametrize("model", ["llama-2-7b", "qwen2.5-7b"])
def test_meta_kernel_balances_a_long_prefill_with_short_decodes(model: str) -> None:
    """One 8k-token prefill and 63 short decodes: the meta-kernel's makespan is within 15% of
    perfect balance. The split baseline balances each of its kernels too (PFA cuts its blocks
    into runs of equal work, IFA its requests into runs of equal KV), but pays two launches and
    its decode kernel's imbalance: one meta launch is faster."""
    arch = get_arch(model)
    rng = np.random.default_rng(0)
    specs = [(0, 8192)] + [(int(c), 1) for c in rng.integers(16, 600, 63)]
    chunks = fake_chunks(specs, 128)
    device = Device(B2, compute=False)
    meta = [device.time(lower_attention(chunks, arch, B2, 128))]
    split = [device.time(k) for k in lower_attention_split(chunks, arch, B2, 128)]
    assert len(split) == 2
    assert _balance(meta, B2.num_cube_cores) >= 1 / 1.15
    assert _balance(split[:1], B2.num_cube_cores) >= 1 / 1.15  # PFA, the 8k prefill
    assert sum(t.seconds for t in meta) < sum(t.seconds for t in split)


# --------------------------------------------------------------------- timing-only mode

def test_timing_only_returns_nothing_and_times_like_compute_mode() -> None:
    arch = SMALL
    chunks = fake_chunks([(0, 40), (30, 1), (100, 20)], 16)
    plan = lower_step(chunks, 2, arch, B2, 16)
    compute, timing_only = Device(B2), Device(B2, compute=False)
    t, d = plan.num_tokens, arch.head_dim
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, arch.hidden_size, generator=gen)
    w = torch.randn(plan.layer.qkv_proj.n, arch.hidden_size, generator=gen)
    q = torch.randn(t, arch.num_heads, d, generator=gen)
    nb = sum(len(c.block_ids) for c in chunks)
    cache = torch.randn(nb, 16, arch.num_kv_heads, d, generator=gen)
    launches = [
        (plan.layer.qkv_proj, {"x": x, "w": w}),
        (plan.layer.post_attn_norm, {"x": x, "residual": x.clone(),
                                     "weight": torch.ones(arch.hidden_size), "eps": 1e-6}),
        (plan.layer.attention, {"q": q, "k_cache": cache, "v_cache": cache}),
    ]
    for kernel, operands in launches:
        out = compute.launch(kernel, **operands)
        assert isinstance(out, torch.Tensor)
        assert timing_only.launch(kernel) is None
        a, b = compute.last_timing, timing_only.last_timing
        assert a is not None and b is not None
        assert (a.cycles, a.hbm_bytes, a.flops, a.bound) == (b.cycles, b.hbm_bytes, b.flops,
                                                              b.bound)
        np.testing.assert_array_equal(a.cube_busy_cycles, b.cube_busy_cycles)
        np.testing.assert_array_equal(a.vector_busy_cycles, b.vector_busy_cycles)
    # compute mode's numbers are the kernels' own
    torch.testing.assert_close(compute.launch(plan.layer.qkv_proj, x=x, w=w),
                               run_gemm(plan.layer.qkv_proj, False, x=x, w=w))
    assert compute.num_launches == timing_only.num_launches | {Primitive.GEMM: 2}
    assert compute.end_step().sim_s > timing_only.end_step().sim_s > 0


def test_model_forward_launches_what_step_launches_lists(tiny_llama_dir) -> None:
    """The real forward (compute mode) and the timing-only replay of step_launches make the same
    launches in the same order, so they give the same StepTrace."""
    from engine.models.llama import LlamaModel, StepInputs
    from engine.models.loader import load_model

    loaded = load_model(str(tiny_llama_dir))
    compute = Device(B2)
    model = LlamaModel(loaded, torch.float32, compute)
    arch = loaded.arch
    specs = [(0, 9), (4, 1), (20, 3)]
    chunks = fake_chunks(specs, 16)
    plan = lower_step(chunks, 2, arch, B2, 16)
    nb = sum(len(c.block_ids) for c in chunks)
    caches = torch.zeros(arch.num_layers, nb, 16, arch.num_kv_heads, arch.head_dim)
    positions = np.concatenate([np.arange(p, p + n) for p, n in specs])
    slots = np.concatenate([np.asarray(c.block_ids)[np.arange(c.start_pos, c.start_pos +
                            c.num_tokens) // 16] * 16 + np.arange(c.start_pos, c.start_pos +
                            c.num_tokens) % 16 for c in chunks])
    cos, sin = model.rope_tables(torch.from_numpy(positions))
    inputs = StepInputs(token_ids=torch.arange(plan.num_tokens) % 100, cos=cos, sin=sin,
                        slot_mapping=torch.from_numpy(slots),
                        sample_rows=torch.tensor([8, 12]))
    compute.begin_step()
    logits = model.forward(compute, plan, inputs, caches, caches.clone())
    assert logits is not None
    real = compute.end_step()
    replay = Device(B2, compute=False)
    replay.begin_step()
    for kernel in step_launches(plan, arch.num_layers):
        replay.launch(kernel)
    timed = replay.end_step()
    assert [k.name for k in real.kernels] == [k.name for k in timed.kernels]
    assert real.sim_s == pytest.approx(timed.sim_s)
    assert real.num_launches == 2 + arch.num_layers * 10 - 1 + 2


# --------------------------------------------------------------------------- StepTrace

@pytest.mark.parametrize("policy", ["default", "baseline"])
def test_step_trace_fields_are_consistent(policy: str) -> None:
    specs = [(0, 700), (300, 1), (2000, 1), (50, 17)]
    kwargs = {"policy": BASELINE_POLICY} if policy == "baseline" else {}
    tr = time_step("llama-2-7b", specs, "910b2", **kwargs)
    arch = get_arch("llama-2-7b")
    assert tr.num_launches == len(tr.kernels) == len(tr.kernel_start_s)
    assert tr.sim_s == pytest.approx(tr.device_s + tr.host_s)
    host = get_stack("xyserve")  # the default stack; time_step passes one request per chunk
    assert tr.sim_s == pytest.approx(host.step_s(tr.device_s, tr.num_launches, len(specs)))
    assert tr.device_s == pytest.approx(sum(k.seconds for k in tr.kernels))
    assert sum(tr.kernel_s_by_primitive.values()) == pytest.approx(tr.device_s)
    assert set(tr.kernel_s_by_primitive) == {"gemm", "vector", "attention"}
    assert 0 < tr.cube_utilization <= 1 and 0 < tr.vector_utilization <= 1
    assert 0 < tr.mfu <= tr.cube_utilization
    assert 0 <= tr.padding_waste_ratio < 1
    assert (tr.cube_busy_s <= tr.device_s).all() and (tr.vector_busy_s <= tr.device_s).all()
    assert tr.cube_busy_s.shape == (B2.num_cube_cores,)
    assert tr.vector_busy_s.shape == (B2.num_vector_cores,)
    assert tr.hbm_bytes == pytest.approx(sum(k.hbm_bytes for k in tr.kernels))
    assert tr.flops == pytest.approx(sum(k.flops for k in tr.kernels))
    starts = np.array(tr.kernel_start_s)
    assert starts[0] == 0 and (np.diff(starts) > 0).all()
    assert starts[-1] + tr.kernels[-1].seconds == pytest.approx(tr.device_s)
    # every layer's weights stream from HBM at least once
    weights = arch.num_layers * 2 * arch.hidden_size * (
        (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim + arch.num_heads * arch.head_dim
        + 3 * arch.intermediate_size)
    assert tr.hbm_bytes > weights
    if policy == "baseline":  # pad copies, two attention kernels per layer, padded rows
        assert tr.padding_waste_ratio > 0.05
        assert sum(k.name == "decode_attention" for k in tr.kernels) == arch.num_layers


def test_a_layer_is_costed_once_and_steps_reuse_gemm_timings() -> None:
    device = Device(B2, compute=False)
    a = time_step(SMALL, [(5, 1), (40, 1)], device=device, block_size=16)
    qkv = [k for k in a.kernels if k.name == "qkv_proj"]
    assert len(qkv) == SMALL.num_layers and all(k is qkv[0] for k in qkv)
    b = time_step(SMALL, [(9, 1), (77, 1)], device=device, block_size=16)  # same T
    assert next(k for k in b.kernels if k.name == "qkv_proj") is qkv[0]
    assert device.total_sim_s == pytest.approx(a.sim_s + b.sim_s)


def test_time_does_not_record_and_end_step_resets() -> None:
    device = Device(B2, compute=False)
    device.time(lower_gemm("g", 8, 512, 512, B2)[1])
    empty = device.end_step()
    assert empty.num_launches == 0 and empty.sim_s == 0 and empty.cube_utilization == 0
    device.launch(lower_gemm("g", 8, 512, 512, B2)[1])
    assert device.end_step().num_launches == 1
    assert device.end_step().num_launches == 0


def test_bound_stretches_busy_time_to_the_makespan() -> None:
    slow = dataclasses.replace(B2, name="slow-hbm", hbm_bytes_per_s=B2.hbm_bytes_per_s / 8)
    t = Device(slow, compute=False).time(lower_gemm("g", 1, 12288, 4096, slow)[1])
    assert t.bound == "hbm"
    assert t.cube_busy_cycles.max() == pytest.approx(t.cycles - t.launch_cycles)
    ends = t.task_start_cycles + t.task_cycles
    assert ends.max() == pytest.approx(t.cycles - t.launch_cycles, rel=1e-9)


def test_split_baseline_kernels_add_up_to_the_meta_kernel() -> None:
    """The baseline is a policy of the same lowering: its two kernels compute the same attention
    (each on its own rows), on both the reference and the fast path."""
    chunks = fake_chunks([(0, 70), (30, 1), (100, 20), (5, 1), (0, 3)], 16)
    gen = torch.Generator().manual_seed(1)
    t = 70 + 1 + 20 + 1 + 3
    nb = sum(len(c.block_ids) for c in chunks)
    q = torch.randn(t, SMALL.num_heads, SMALL.head_dim, generator=gen)
    kc = torch.randn(nb, 16, SMALL.num_kv_heads, SMALL.head_dim, generator=gen)
    vc = torch.randn(nb, 16, SMALL.num_kv_heads, SMALL.head_dim, generator=gen)
    device = Device(B2, strict=True)
    meta = device.launch(lower_attention(chunks, SMALL, B2, 16), q=q, k_cache=kc, v_cache=vc)
    split = lower_attention_split(chunks, SMALL, B2, 16)
    assert [k.name for k in split] == ["prefill_attention", "decode_attention"]
    for strict in (True, False):
        dev = Device(B2, strict=strict)
        total = sum(dev.launch(k, q=q, k_cache=kc, v_cache=vc) for k in split)
        torch.testing.assert_close(total, meta, atol=1e-5, rtol=1e-5)


def test_bucket_baseline_pads_each_gemm_with_a_copy() -> None:
    chunks = [ChunkShape(0, 200, tuple(range(13)))]
    plan = lower_step(chunks, 1, SMALL, B2, 16, BASELINE_POLICY)
    pads = dict(plan.layer.pads)
    assert set(pads) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert plan.layer.qkv_proj.m == 256 and plan.layer.qkv_proj.valid_m == 200
    assert pads["qkv_proj"].num_rows == 256 and pads["qkv_proj"].valid_rows == 200
    assert plan.lm_head is not None and plan.lm_head.m == 16 and plan.lm_head_pad is not None
    launches = step_launches(plan, SMALL.num_layers)
    i = launches.index(plan.layer.qkv_proj)
    assert launches[i - 1] is pads["qkv_proj"]
    # the pad copy is functional: zero rows past the valid ones
    x = torch.randn(200, SMALL.hidden_size)
    out = Device(B2, strict=True).launch(pads["qkv_proj"], x=x)
    assert out.shape == (256, SMALL.hidden_size)
    assert torch.equal(out[:200], x) and not out[200:].any()
    assert plan.layer.qkv_proj.padding_waste > lower_step(
        chunks, 1, SMALL, B2, 16).layer.qkv_proj.padding_waste
