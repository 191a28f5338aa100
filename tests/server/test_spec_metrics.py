"""The speculative-decoding counters: exact values from hand-made per-step stats, vLLM's names.

The stat logger is fed synthetic IterationStats carrying SpecDecodingStats (no engine, no
server), so every counter and every `position` label can be checked exactly; one in-process app
with a real tiny engine drafting n-grams checks the wiring and the counters' invariants.
"""

from __future__ import annotations

import pathlib

import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, SpeculativeConfig
from engine.core import EngineCore
from engine.stats import IterationStats, SchedulerStats, SpecDecodingStats
from server.app import build_app
from server.config import ServerConfig
from server.metrics import ServerMetrics
from tests.server.test_metrics import Scrape

SPEC_FAMILIES = {
    "xyserve:spec_decode_num_drafts_total": "counter",
    "xyserve:spec_decode_num_draft_tokens_total": "counter",
    "xyserve:spec_decode_num_accepted_tokens_total": "counter",
    "xyserve:spec_decode_num_accepted_tokens_per_pos_total": "counter",
}
IDLE = SchedulerStats(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0,
                      num_preemptions=0, num_free_blocks=64)


def _step(spec: SpecDecodingStats | None) -> IterationStats:
    return IterationStats(num_prompt_tokens=0, num_generation_tokens=4, num_preempted_reqs=0,
                          step_s=0.05, step_sim_s=0.002, ttfts_s=(), ttfts_sim_s=(),
                          inter_token_latencies_s=(), inter_token_latencies_sim_s=(),
                          finished=(), spec=spec)


def _metrics(config: SpeculativeConfig | None) -> ServerMetrics:
    return ServerMetrics("m", lambda: IDLE, config)


def _per_pos(scrape: Scrape) -> dict[str, float]:
    return {labels["position"]: value for name, labels, value in scrape.samples
            if name == "xyserve:spec_decode_num_accepted_tokens_per_pos_total"}


def test_spec_counters_count_exactly_and_by_position() -> None:
    metrics = _metrics(SpeculativeConfig(speculative="ngram", num_speculative_tokens=3))
    before = Scrape(metrics.render().decode())
    # Every position is exported at 0 before the first verify, so rate() sees the first one.
    assert {n: t for n, t in before.types.items() if "spec_decode" in n} == SPEC_FAMILIES
    assert before("spec_decode_num_drafts_total") == 0
    assert _per_pos(before) == {"0": 0, "1": 0, "2": 0}

    # Step 1: two requests verified 3 drafts each; one kept 2 of them, the other 1.
    metrics.record(IDLE, _step(SpecDecodingStats(num_drafts=2, num_draft_tokens=6,
                                                 num_accepted_tokens=3,
                                                 num_accepted_tokens_per_pos=(2, 1, 0))))
    metrics.record(IDLE, _step(None))  # a step without verify chunks changes nothing
    # Step 3: one request kept all 3 of its drafts.
    metrics.record(IDLE, _step(SpecDecodingStats(num_drafts=1, num_draft_tokens=3,
                                                 num_accepted_tokens=3,
                                                 num_accepted_tokens_per_pos=(1, 1, 1))))
    after = Scrape(metrics.render().decode())
    assert after("spec_decode_num_drafts_total") == 3
    assert after("spec_decode_num_draft_tokens_total") == 9
    assert after("spec_decode_num_accepted_tokens_total") == 6
    assert _per_pos(after) == {"0": 3, "1": 2, "2": 1}
    assert all(labels["model_name"] == "m" for name, labels, _ in after.samples
               if "spec_decode" in name)
    # What the dashboard derives from them.
    accepted, drafted = after("spec_decode_num_accepted_tokens_total"), \
        after("spec_decode_num_draft_tokens_total")
    assert accepted / drafted == pytest.approx(2 / 3)  # draft acceptance rate
    assert 1 + accepted / after("spec_decode_num_drafts_total") == 3  # mean accepted length
    # The per-position counts add up to the accepted tokens (each accepted token has a depth).
    assert sum(_per_pos(after).values()) == accepted


def test_tree_drafts_count_nodes_and_depths() -> None:
    """A tree verifies more nodes than it can accept; positions are depths on the accepted path."""
    metrics = _metrics(SpeculativeConfig(speculative="tree", num_speculative_tokens=4))
    metrics.record(IDLE, _step(SpecDecodingStats(num_drafts=1, num_draft_tokens=4,
                                                 num_accepted_tokens=2,
                                                 num_accepted_tokens_per_pos=(1, 1, 0, 0))))
    scrape = Scrape(metrics.render().decode())
    assert scrape("spec_decode_num_draft_tokens_total") == 4
    assert scrape("spec_decode_num_accepted_tokens_total") == 2
    assert _per_pos(scrape) == {"0": 1, "1": 1, "2": 0, "3": 0}


@pytest.mark.parametrize("config", [None, SpeculativeConfig()])
def test_no_spec_families_without_a_drafter(config: SpeculativeConfig | None) -> None:
    metrics = _metrics(config)
    metrics.record(IDLE, _step(SpecDecodingStats(num_drafts=1, num_draft_tokens=1,
                                                 num_accepted_tokens=1,
                                                 num_accepted_tokens_per_pos=(1,))))
    scrape = Scrape(metrics.render().decode())
    assert not [name for name in scrape.types if "spec_decode" in name]
    assert scrape("generation_tokens_total") == 4  # the rest of the step is still recorded


def test_a_drafting_engine_feeds_the_counters(tiny_llama_dir: pathlib.Path) -> None:
    k = 3
    core = EngineCore.load(EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_kv_blocks=64,
                                                    block_size=16, speculative="ngram",
                                                    num_speculative_tokens=k))
    with TestClient(build_app(AsyncEngine(core), ServerConfig(served_model_name="m"))) as http:
        assert Scrape(http.get("/metrics").text)("spec_decode_num_drafts_total") == 0
        # The output repeats one forced token, so the n-gram drafter proposes it and the
        # target accepts it.
        response = http.post("/v1/completions", json={
            "model": "m", "prompt": "Again and again", "max_tokens": 24, "ignore_eos": True,
            "temperature": 0, "logit_bias": {"4321": 100}})
        assert response.status_code == 200, response.text
        scrape = Scrape(http.get("/metrics").text)
    drafts, draft_tokens = scrape("spec_decode_num_drafts_total"), \
        scrape("spec_decode_num_draft_tokens_total")
    accepted, per_pos = scrape("spec_decode_num_accepted_tokens_total"), _per_pos(scrape)
    assert drafts > 0 and accepted > 0
    assert accepted <= draft_tokens <= k * drafts
    assert set(per_pos) == {str(i) for i in range(k)}
    assert sum(per_pos.values()) == accepted
    assert per_pos["0"] <= drafts and all(  # a deeper position is reached by fewer drafts
        per_pos[str(i + 1)] <= per_pos[str(i)] for i in range(k - 1))
    # Drafting changes how many steps a request takes, not how many tokens it is counted for.
    assert scrape("generation_tokens_total") == 24
