"""The timing-only engine is the serving engine: the same arrivals and lengths through the
compute engine (a tiny model, real tokens) and through the timing-only engine (the same shapes,
no weights) give identical steps: the same chunks, decode rows and preemptions, the same
simulated times. Chunked prefill, preemption and prefix-cache hits all happen here."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from cluster.driver import drive
from cluster.recorder import Recorder
from cluster.workload import RequestSpec, Workload, synthetic_prompt
from engine.arch_presets import resolve_arch
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.timing_runner import build_timing_engine

SHARED = tuple(synthetic_prompt(10_000, 48))  # 3 blocks of 16 that several prompts start with


def workload() -> Workload:
    requests = []
    for i in range(14):
        prompt_len = 20 + (37 * i) % 90
        ids = None
        if i % 3 == 0:  # shares the prefix (prefix-cache hits once the first has computed it)
            ids = (*SHARED, *synthetic_prompt(i, prompt_len))
            prompt_len = len(ids)
        requests.append(RequestSpec(arrival_s=0.0004 * i, prompt_len=prompt_len,
                                    output_len=5 + (11 * i) % 30, prompt_token_ids=ids))
    return Workload(tuple(requests), "equivalence")


def record_steps(core: EngineCore) -> list[tuple[Any, ...]]:
    """Wrap the core's runner: every step's chunks, preemptions and simulated time."""
    steps: list[tuple[Any, ...]] = []
    execute = core.runner.execute

    def recording(scheduler_output: Any) -> Any:
        output = execute(scheduler_output)
        if scheduler_output.chunks:
            steps.append((tuple((c.request_id, c.start_pos, c.num_tokens, c.sample)
                                for c in scheduler_output.chunks),
                          scheduler_output.preempted_ids, output.trace.sim_s))
        return output

    core.runner.execute = recording  # type: ignore[method-assign]
    return steps


def test_compute_and_timing_engines_take_identical_steps(tiny_llama_dir: pathlib.Path) -> None:
    config = EngineConfig.from_kwargs(
        model=str(tiny_llama_dir), dtype="float32", block_size=16, num_kv_blocks=14,
        max_num_batched_tokens=40, max_num_seqs=6, max_model_len=256)
    compute = EngineCore.load(config)
    timing = build_timing_engine(config, resolve_arch(str(tiny_llama_dir)), "tiny")
    runs = []
    for core in (compute, timing):
        steps = record_steps(core)
        recorder = Recorder()
        assert drive(core, workload(), recorder) == []
        runs.append((steps, recorder, core.make_stats()))
    (compute_steps, compute_rec, compute_stats), (timing_steps, timing_rec, timing_stats) = runs

    assert [s[:2] for s in compute_steps] == [s[:2] for s in timing_steps]
    assert [s[2] for s in compute_steps] == pytest.approx([s[2] for s in timing_steps],
                                                          rel=1e-12)
    # the run exercised what it claims to
    assert compute_stats.num_preemptions > 0
    assert compute_stats.prefix_cache_hits > 0
    assert any(not sample and n > 1 for chunks, _, _ in compute_steps
               for _, _, n, sample in chunks)  # a chunked prefill
    assert compute_stats == timing_stats
    # and the requests saw the same simulated latencies
    for a, b in zip(sorted(compute_rec.requests.values(), key=lambda r: r.index),
                    sorted(timing_rec.requests.values(), key=lambda r: r.index), strict=True):
        assert (a.ttft_s, a.e2e_s, a.num_output_tokens) == pytest.approx(
            (b.ttft_s, b.e2e_s, b.num_output_tokens), rel=1e-9)
