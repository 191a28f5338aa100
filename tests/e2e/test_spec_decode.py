"""Speculative decoding end to end on the default model: greedy output with every drafter is
token-identical to greedy output without speculation (one by one, and batched with chunked
prefill and preemption), and stops, penalties, max_tokens and logprobs behave as without it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from engine import LLM, SamplingParams
from engine.stats import SpecDecodingStats

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
ECHO = [  # answers that repeat their input: drafts get accepted
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(",
    "Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat",
    "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
]


@pytest.fixture(scope="module")
def baseline(prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(dtype="float32")
    return [llm.generate(p, GREEDY)[0].token_ids for p in prompts]


@pytest.fixture(scope="module", params=["ngram", "tree", "draft-model"])
def spec_options(request: pytest.FixtureRequest, tiny_llama_dir) -> dict[str, Any]:
    options: dict[str, Any] = {"speculative": request.param, "num_speculative_tokens": 4}
    if request.param == "draft-model":
        options["draft_model"] = str(tiny_llama_dir)  # random weights: mostly rejected
    return options


def _accepted(stats: Sequence[SpecDecodingStats]) -> int:
    return sum(s.num_accepted_tokens for s in stats)


def test_one_by_one_identical_to_no_speculation(prompts, baseline, spec_options,
                                                record_spec_stats) -> None:
    llm = LLM(dtype="float32", **spec_options)
    stats = record_spec_stats(llm)
    for ids, expected in zip(prompts, baseline, strict=True):
        assert llm.generate(ids, GREEDY)[0].token_ids == expected
    assert sum(s.num_drafts for s in stats) > 0
    if spec_options["speculative"] != "draft-model":
        assert _accepted(stats) > 0


def test_batched_chunked_preempted_identical(prompts, baseline, spec_options,
                                             record_spec_stats) -> None:
    # 32 blocks of 16 tokens: every request (and its drafts) fits alone, all of them cannot
    llm = LLM(dtype="float32", max_num_batched_tokens=64, max_num_seqs=16, block_size=16,
              num_kv_blocks=32, **spec_options)
    stats = record_spec_stats(llm)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == baseline
    assert llm.engine.scheduler.make_stats().num_preemptions > 0
    assert llm.engine.scheduler.num_free_blocks == 32
    assert sum(s.num_drafts for s in stats) > 0


def test_self_draft_accepts_nearly_everything(prompts, baseline, default_model_dir,
                                              record_spec_stats) -> None:
    """The target as its own draft model: greedy drafts are the target's own tokens."""
    llm = LLM(dtype="float32", speculative="draft-model", draft_model=str(default_model_dir),
              num_speculative_tokens=4)
    stats = record_spec_stats(llm)
    outs = llm.generate(prompts[:4], GREEDY)
    assert [o.token_ids for o in outs] == baseline[:4]
    drafted = sum(s.num_draft_tokens for s in stats)
    assert _accepted(stats) >= 0.9 * drafted
    per_pos = [sum(s.num_accepted_tokens_per_pos[i] for s in stats) for i in range(4)]
    assert per_pos == sorted(per_pos, reverse=True)  # reaching depth i + 1 implies depth i


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=30, stop=["b)"]),
    SamplingParams(temperature=0.0, max_tokens=30, stop=["mat."], include_stop_str_in_output=True),
    SamplingParams(temperature=0.0, max_tokens=7),
    SamplingParams(temperature=0.0, max_tokens=30, repetition_penalty=1.1),
    SamplingParams(temperature=0.0, max_tokens=30, frequency_penalty=0.5, presence_penalty=0.3),
    SamplingParams(temperature=0.0, max_tokens=20, min_tokens=12, logprobs=3),
], ids=["stop", "stop-included", "max-tokens", "repetition", "frequency-presence", "logprobs"])
@pytest.mark.parametrize("speculative", ["ngram", "tree"])
def test_sampling_options_behave_as_without_speculation(params, speculative,
                                                       record_spec_stats) -> None:
    plain = LLM(dtype="float32").generate(ECHO, params)
    llm = LLM(dtype="float32", speculative=speculative, num_speculative_tokens=5)
    stats = record_spec_stats(llm)
    spec = llm.generate(ECHO, params)
    for a, b in zip(plain, spec, strict=True):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        if params.logprobs is not None:
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert (x.token_id, x.rank) == (y.token_id, y.rank)
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert _accepted(stats) > 0
