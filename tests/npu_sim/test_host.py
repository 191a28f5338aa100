"""The host / runtime overhead model (npu_sim.host): per-step, per-request and per-launch terms,
the device hidden behind the host's launches, graph capture, the presets and their fits."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.kernels.harness import fake_chunks, time_step
from engine.arch_presets import get_arch
from engine.lowering import lower_step, step_launches
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.host import (
    CE3_S_PER_TOKEN,
    DEFAULT_STACK,
    LOWERED_STEP_LAUNCHES,
    STACKS,
    TORCH_NPU_OP_DISPATCH_S,
    HostProfile,
    get_stack,
)

B2 = get_chip("910b2")
TOY = HostProfile("toy", per_step_s=1e-3, per_request_s=1e-4, per_launch_s=1e-5,
                  launch_factor=2.0, graph_launch_s=0.0, graph_captured=False, source="test")


def test_step_time_is_fixed_terms_plus_the_slower_of_device_and_launches() -> None:
    # host-bound: 100 launches x 2 x 10 us = 2 ms of dispatch behind a 0.5 ms device
    assert TOY.step_s(0.5e-3, 100, 3) == pytest.approx(1e-3 + 3e-4 + 2e-3)
    # device-bound: the dispatch hides behind 5 ms of kernels
    assert TOY.step_s(5e-3, 100, 3) == pytest.approx(1e-3 + 3e-4 + 5e-3)
    assert TOY.step_s(0.0, 0, 0) == 0.0  # an empty step costs nothing


def test_per_request_term_is_linear_in_the_batch() -> None:
    t = [TOY.step_s(5e-3, 100, n) for n in (0, 10, 20)]
    assert t[2] - t[1] == pytest.approx(t[1] - t[0]) == pytest.approx(10 * TOY.per_request_s)


def test_graph_captured_stacks_do_not_pay_per_launch() -> None:
    graph = dataclasses.replace(TOY, graph_captured=True, graph_launch_s=3e-3)
    assert graph.step_s(0.5e-3, 10, 0) == graph.step_s(0.5e-3, 10_000, 0)
    assert graph.step_s(0.5e-3, 10, 0) == pytest.approx(1e-3 + 3e-3)


def test_presets_are_named_and_documented() -> None:
    assert {"eager", "vllm-ascend", "mindie", "xyserve"} <= set(STACKS)
    assert DEFAULT_STACK == "xyserve" and Device(B2, compute=False).host is STACKS["xyserve"]
    assert get_stack("MindIE") is STACKS["mindie"] and get_stack(TOY) is TOY
    assert all(p.source for p in STACKS.values())
    assert STACKS["mindie"].graph_captured and not STACKS["eager"].graph_captured
    with pytest.raises(ValueError, match="known: eager"):
        get_stack("tgi")
    with pytest.raises(ValueError, match="per_step_s"):
        dataclasses.replace(TOY, per_step_s=-1.0)


def test_eager_reproduces_ce3_and_is_launch_bound() -> None:
    """CE3: HF eager Llama-2-7B, batch 1, 16.6 tok/s. The fit assumes this simulator lowers that
    step into LOWERED_STEP_LAUNCHES launches; the modelled token time is then 60.2 ms, of which
    the device is a small part."""
    arch = get_arch("llama-2-7b")
    plan = lower_step(fake_chunks([(20, 1)], 128), 1, arch, B2, 128)
    assert len(step_launches(plan, arch.num_layers)) == LOWERED_STEP_LAUNCHES
    tr = time_step(arch, [(20, 1)], device=Device(B2, compute=False, stack="eager"))
    assert tr.sim_s == pytest.approx(CE3_S_PER_TOKEN, rel=0.01)
    assert tr.device_s < 0.25 * tr.sim_s and tr.host_s == pytest.approx(tr.sim_s - tr.device_s)
    assert STACKS["eager"].per_launch_s > TORCH_NPU_OP_DISPATCH_S


def test_stacks_order_as_their_software() -> None:
    """Same decode step (Llama-2-7B, 8 sequences): the eager loop is slowest, then vLLM-Ascend,
    then MindIE; XY-Serve's own runtime is within its device time plus ~2 ms."""
    specs = [(1000, 1)] * 8
    t = {name: time_step("llama-2-7b", specs, device=Device(B2, compute=False, stack=name))
         for name in STACKS}
    assert t["eager"].sim_s > t["vllm-ascend"].sim_s > t["mindie"].sim_s > t["xyserve"].sim_s
    assert t["xyserve"].host_s < 2e-3
    assert len({round(tr.device_s, 9) for tr in t.values()}) == 1  # same kernels, same device


def test_every_stack_describes_its_terms_and_source() -> None:
    for stack in STACKS.values():
        line = stack.describe()
        assert line.startswith(f"{stack.name}: ") and stack.source in line and "\n" not in line
    assert "427 us per request" in STACKS["vllm-ascend"].describe()  # fitted on CE1
    assert "one graph replay" in STACKS["mindie"].describe()
