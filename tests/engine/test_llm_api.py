"""The offline API on a tiny model: prompts in both forms, stopping rules, seeds, n, logprobs."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.core import EngineCore


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(model=str(tiny_llama_dir), dtype="float32", block_size=16, num_kv_blocks=64,
               max_num_batched_tokens=64, max_model_len=256)


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_string_and_token_prompts_agree(llm: LLM) -> None:
    text = "Hello there, how are you"
    ids = llm.tokenizer(text).input_ids
    by_text, by_ids = llm.generate([text, ids], GREEDY)
    assert by_text.prompt_token_ids == ids
    assert by_text.token_ids == by_ids.token_ids and len(by_text.token_ids) == 10
    assert by_text.finish_reason == "length"
    assert by_text.text == llm.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)
    assert by_text.prompt == text and by_ids.prompt is None


def test_batch_composition_does_not_change_greedy_output(llm: LLM) -> None:
    prompts = [[5, 6, 7, 8], list(range(100, 170)), [42]]
    alone = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    together = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == alone


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    [ref] = llm.generate([7, 8, 9], GREEDY)
    stop_at = ref.token_ids[3]
    first = ref.token_ids.index(stop_at)
    [out] = llm.generate([7, 8, 9], SamplingParams(temperature=0.0, max_tokens=10,
                                                   stop_token_ids=[stop_at], ignore_eos=True))
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[:first + 1]
    # min_tokens masks stop ids while too few tokens exist: the stop token cannot come first
    [late] = llm.generate([7, 8, 9], SamplingParams(temperature=0.0, max_tokens=10,
                                                    stop_token_ids=[ref.token_ids[0]],
                                                    min_tokens=1, ignore_eos=True))
    assert late.token_ids[0] != ref.token_ids[0]


def test_stop_string_is_cut_from_text(llm: LLM) -> None:
    [ref] = llm.generate([11, 12, 13], SamplingParams(temperature=0.0, max_tokens=20,
                                                      ignore_eos=True))
    assert len(ref.text) > 6
    stop = ref.text[3:6]
    [out] = llm.generate([11, 12, 13], SamplingParams(temperature=0.0, max_tokens=20,
                                                      ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:ref.text.index(stop)]
    [kept] = llm.generate([11, 12, 13], SamplingParams(temperature=0.0, max_tokens=20,
                                                       ignore_eos=True, stop=[stop],
                                                       include_stop_str_in_output=True))
    assert kept.text == ref.text[:ref.text.index(stop) + len(stop)]


def test_seed_repeats_and_n_completions_differ(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True, n=3)
    [a] = llm.generate([1, 2, 3], params)
    [b] = llm.generate([1, 2, 3], params)
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3  # seed + i per completion
    # the same seeded request in a different batch gives the same tokens
    single = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([1, 2, 3], single)[0].token_ids
    mixed = llm.generate([[9, 9], [1, 2, 3], [4] * 30],
                         [SamplingParams(temperature=1.0, max_tokens=5), single,
                          SamplingParams(temperature=0.7, max_tokens=20)])
    assert mixed[1].token_ids == alone


def test_logprobs(llm: LLM) -> None:
    [out] = llm.generate([3, 4, 5], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                                   ignore_eos=True))
    assert out.outputs[0].logprobs is not None and len(out.outputs[0].logprobs) == 4
    for token_id, lp in zip(out.token_ids, out.outputs[0].logprobs, strict=True):
        assert lp.token_id == token_id and lp.rank == 1  # greedy picks the most likely
        assert len(lp.top) == 3 and lp.top[0] == (token_id, pytest.approx(lp.logprob))
        assert lp.logprob <= 0.0


def test_max_model_len_caps_generation(llm: LLM) -> None:
    prompt = list(range(10, 250))  # 240 tokens of max_model_len 256
    [out] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=None,
                                                ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 16


@pytest.mark.parametrize(("prompt", "params", "message"), [
    (list(range(300)), SamplingParams(), "max_model_len"),
    ([1, 2], SamplingParams(max_tokens=255), "max_model_len"),
    ([10**6], SamplingParams(), "outside the vocabulary"),
    ([], SamplingParams(), "empty"),
])
def test_unservable_requests_raise_and_leave_engine_clean(llm: LLM, prompt, params,
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6], prompt], params)
    engine: EngineCore = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_free_blocks == engine.info.num_kv_blocks


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("x", list(range(1, 40)), GREEDY)
    engine.step()
    assert engine.scheduler.num_free_blocks < engine.info.num_kv_blocks
    engine.abort_requests(["x"])
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_free_blocks == engine.info.num_kv_blocks
