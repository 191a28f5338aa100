"""The compute runner driven from hand-built scheduler outputs, with no scheduler: the boundary a
runner lives behind is the SchedulerOutput alone (new requests' data once, then chunks)."""

from __future__ import annotations

import os
import pathlib
from collections import Counter
from typing import Any

import pytest
import torch
import transformers

from engine.config import EngineConfig
from engine.llm import LLM
from engine.outputs import NewRequestData, ScheduledChunk, SchedulerOutput
from engine.request import SamplingParams
from engine.runner import build_model_runner
from npu_sim.device import Device
from npu_sim.trace import StepTrace
from tests.npu_sim.test_step_sums import assert_same_step_trace

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def hf_next_tokens(model_dir: pathlib.Path, prompt: list[int], num_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_prefill_then_decodes_from_hand_built_outputs(tiny_llama_dir: pathlib.Path) -> None:
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), dtype="float32",
                                      num_kv_blocks=8, block_size=BLOCK)
    runner, info = build_model_runner(config)
    prompt = [5, 17, 300, 42, 9, 1000, 77]
    expected = hf_next_tokens(tiny_llama_dir, prompt, 3)
    blocks = (3, 1)  # any free blocks: the runner writes where the table says

    # Step 1: the request's prompt in two chunks over two steps, the second one sampling.
    first = SchedulerOutput(
        chunks=(ScheduledChunk("a", 0, tuple(prompt[:4]), blocks, sample=False),),
        new_requests=(NewRequestData("a", prompt, GREEDY),))
    assert runner.execute(first).sampled_token_ids == {}
    second = SchedulerOutput(chunks=(ScheduledChunk("a", 4, tuple(prompt[4:]), blocks, True),))
    out = runner.execute(second)
    assert out.sampled_token_ids == {"a": (expected[0],)}
    assert out.trace is not None and out.trace.sim_s > 0  # timed on the simulated NPU
    assert runner.requests["a"].output_token_ids == [expected[0]]

    # Decodes feed back the sampled token; the runner keeps its own record of the sequence.
    for i in (1, 2):
        decode = ScheduledChunk("a", len(prompt) + i - 1, (expected[i - 1],), blocks, True)
        out = runner.execute(SchedulerOutput(chunks=(decode,)))
        assert out.sampled_token_ids == {"a": (expected[i],)}
    assert runner.requests["a"].output_token_ids == expected

    # A finished id frees the runner's state; an unknown one is ignored.
    runner.execute(SchedulerOutput(chunks=(), finished_ids=("a", "never-seen")))
    assert runner.requests == {}
    assert info.num_kv_blocks == 8 and info.tokenizer is not None


def test_threads_set_the_kernels_thread_count(tiny_llama_dir: pathlib.Path) -> None:
    before = torch.get_num_threads()
    try:
        config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), dtype="float32",
                                          num_kv_blocks=8, block_size=BLOCK, threads=1)
        build_model_runner(config)
        assert torch.get_num_threads() == 1  # torch's and the native kernels' OpenMP team
        build_model_runner(EngineConfig.from_kwargs(model=str(tiny_llama_dir), dtype="float32",
                                                    num_kv_blocks=8, block_size=BLOCK))
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))  # the default
    finally:
        torch.set_num_threads(before)


def test_steps_are_timed_from_their_plan_as_end_step_times_them(
        tiny_llama_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compute runner ends each step with Device.end_planned_step: the StepTrace end_step
    gives from the launches the model recorded, summed from the plan (chunked prefills, mixed
    steps and decodes of a few requests; the device counts each launch once either way)."""
    planned, summed = Device.end_planned_step, Device._summed_step
    pairs: list[tuple[StepTrace, StepTrace]] = []
    num_summed = 0

    def count_summed(self: Device, *args: Any) -> StepTrace:
        nonlocal num_summed
        num_summed += 1
        return summed(self, *args)

    def both(self: Device, shared: Any, varying: Any, num_requests: int = 0) -> StepTrace:
        launches, counts = list(self._launches), Counter(self.num_launches)
        trace = planned(self, shared, varying, num_requests)
        assert self.num_launches == counts  # counted as launched, not again
        self._launches = launches  # the same step, ended by walking its launches
        pairs.append((trace, self.end_step(num_requests)))
        return trace

    monkeypatch.setattr(Device, "_summed_step", count_summed)
    monkeypatch.setattr(Device, "end_planned_step", both)
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=16, num_kv_blocks=64,
              max_num_batched_tokens=24)
    prompts = [[5 + i, 17, 300, 42, 9, 1000, 77] * (1 + 3 * i) for i in range(3)]
    llm.generate(prompts,
                 SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(pairs) > 8 and num_summed == len(pairs)  # every step took the planned sums
    for a, b in pairs:
        assert_same_step_trace(a, b)
