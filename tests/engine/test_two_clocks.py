"""The engine's two clocks: wall time and the simulated NPU clock, per step and per request."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.core import EngineCore


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, tmp_path_factory) -> LLM:
    trace_dir = tmp_path_factory.mktemp("npu-trace")
    # No prefix caching: the tests count computed prompt tokens of prompts sharing prefixes.
    return LLM(model=str(tiny_llama_dir), dtype="float32", block_size=16, num_kv_blocks=64,
               max_num_batched_tokens=32, npu_trace_dir=str(trace_dir),
               enable_prefix_caching=False)


def test_steps_advance_the_simulated_clock_by_their_traces(llm: LLM) -> None:
    engine: EngineCore = llm.engine
    engine.add_request("a", list(range(3, 60)), SamplingParams(max_tokens=4, ignore_eos=True))
    sim_sum = 0.0
    start = engine.sim_now_s
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.last_stats
        assert stats is not None and stats.trace is not None
        assert stats.step_sim_s == pytest.approx(stats.trace.sim_s) and stats.step_sim_s > 0
        assert stats.step_s > 0
        sim_sum += stats.step_sim_s
    assert engine.sim_now_s == pytest.approx(start + sim_sum)


def test_request_metrics_on_both_clocks(llm: LLM) -> None:
    prompts = [list(range(5, 5 + n)) for n in (3, 50, 90)]  # 90 > budget: three prefill steps
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    for out in outs:
        m = out.outputs[0].metrics
        assert m is not None and m.num_output_tokens == 6
        assert 0 <= m.queue_s <= m.ttft_s <= m.e2e_s
        assert 0 < m.ttft_sim_s < m.e2e_sim_s
        assert m.tpot_sim_s > 0
    # the longest prompt needs more prefill steps: its simulated TTFT is the longest
    ttfts = [o.outputs[0].metrics.ttft_sim_s for o in outs]
    assert ttfts[2] == max(ttfts)


def test_idle_engine_jumps_simulated_clock_to_the_next_arrival(llm: LLM) -> None:
    engine: EngineCore = llm.engine
    assert not engine.has_unfinished_requests()
    time.sleep(0.05)
    wall_offset = time.monotonic() - engine._wall_origin_s
    engine.add_request("late", [1, 2, 3], SamplingParams(max_tokens=1))
    assert engine.sim_now_s >= wall_offset  # the NPU idled until this arrival
    while engine.has_unfinished_requests():
        engine.step()


def test_iteration_stats_count_tokens(llm: LLM) -> None:
    engine: EngineCore = llm.engine
    engine.add_request("p", list(range(3, 23)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # the whole 20-token prompt, first token sampled
    stats = engine.last_stats
    assert stats.num_prompt_tokens == 20 and stats.num_generation_tokens == 1
    assert len(stats.ttfts_s) == 1 and not stats.inter_token_latencies_s
    engine.step()  # one decode, finishes
    stats = engine.last_stats
    assert stats.num_prompt_tokens == 0 and stats.num_generation_tokens == 1
    assert len(stats.inter_token_latencies_sim_s) == 1
    assert [f.finish_reason for f in stats.finished] == ["length"]


def test_npu_trace_dir_gets_perfetto_timelines(llm: LLM) -> None:
    trace_dir = llm.engine.config.npu_trace_dir
    files = sorted(Path(trace_dir).glob("step-*.json"))
    assert files, "no timeline written"
    events = json.loads(files[0].read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    assert any(e.get("ph") == "X" for e in events)


def test_npu_trace_writes_one_timeline_across_steps(tiny_llama_dir, tmp_path: Path) -> None:
    trace_dir = tmp_path / "trace"
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=16, num_kv_blocks=64,
              max_num_batched_tokens=32, npu_trace_dir=str(trace_dir), npu_trace_steps=3)
    llm.generate(["a b c d e f g h"] * 2, SamplingParams(max_tokens=6, ignore_eos=True))
    assert sorted(p.name for p in trace_dir.glob("step-*.json")) == [
        "step-0001.json", "step-0002.json", "step-0003.json"]  # the first 3 steps only
    events = json.loads((trace_dir / "timeline.json").read_text())  # closed: plain JSON
    steps = [e for e in events if e.get("cat") == "step"]
    assert [e["name"] for e in steps] == ["step 1", "step 2", "step 3"]
    # Back to back on the simulated clock: each step starts where the previous one ended.
    for before, after in itertools.pairwise(steps):
        assert after["ts"] == pytest.approx(before["ts"] + before["dur"], abs=1e-3)
    tasks = [e for e in events if e.get("ph") == "X" and e.get("cat") != "step"]
    for step in steps:  # every step has its tasks, inside its slice
        inside = [e for e in tasks if step["ts"] <= e["ts"] < step["ts"] + step["dur"]]
        assert inside, step
        assert max(e["ts"] + e["dur"] for e in inside) <= step["ts"] + step["dur"] + 1e-3
    names = [(e["name"], e["pid"], e.get("tid")) for e in events if e.get("ph") == "M"]
    assert len(names) == len(set(names))  # each track named once
