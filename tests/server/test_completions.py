"""POST /v1/completions through the official OpenAI SDK against a real server (tiny model)."""

from __future__ import annotations

import openai
import pytest

from tests.server.harness import TINY_NAME, ServerProcess

GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}  # vLLM extension: a random model may emit EOS at any point


def test_single_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=TINY_NAME, prompt="Hello, my name is",
                                           max_tokens=8, extra_body=NO_EOS, **GREEDY)
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert completion.model == TINY_NAME
    assert isinstance(completion.created, int)
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.text
    assert choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8


def test_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=TINY_NAME, prompt="Hi", extra_body=NO_EOS)
    assert completion.usage is not None and completion.usage.completion_tokens == 16


def test_usage_counts_are_exact(tiny_server: ServerProcess, client: openai.OpenAI) -> None:
    prompts = ["The quick brown fox", "jumps over the lazy dog again and again"]
    with tiny_server.http() as http:
        counts = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts]
    completion = client.completions.create(model=TINY_NAME, prompt=prompts, n=2, max_tokens=5,
                                           extra_body=NO_EOS)
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == sum(counts)  # each prompt once, not once per choice
    assert usage.completion_tokens == 2 * 2 * 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_prompt_list_with_n_is_prompt_major(client: openai.OpenAI) -> None:
    prompts = ["First prompt:", "Second prompt:"]
    completion = client.completions.create(model=TINY_NAME, prompt=prompts, n=2, max_tokens=4,
                                           echo=True, seed=3)
    choices = completion.choices
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(prompts[c.index // 2]) for c in choices)


def test_token_id_prompts(tiny_server: ServerProcess, client: openai.OpenAI) -> None:
    with tiny_server.http() as http:
        ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_text = client.completions.create(model=TINY_NAME, prompt="Once upon a time",
                                        max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=TINY_NAME, prompt=ids, max_tokens=6, **GREEDY)
    by_id_lists = client.completions.create(model=TINY_NAME, prompt=[ids, ids], max_tokens=6,
                                            **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.text for c in by_id_lists.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)


def test_n_choices_differ_but_a_seed_repeats(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        completion = client.completions.create(model=TINY_NAME, prompt="Tell me a story",
                                               n=2, max_tokens=12, temperature=1.0, seed=seed,
                                               extra_body=NO_EOS)
        return [c.text for c in completion.choices]

    first = sample(seed=1234)
    assert sample(seed=1234) == first  # reproducible
    assert first[0] != first[1]  # choice i uses seed + i
    assert sample(seed=99) != first


def test_echo(client: openai.OpenAI) -> None:
    prompt = "Echo this prompt"
    plain = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=5, **GREEDY)
    echoed = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=5, echo=True,
                                       **GREEDY)
    assert echoed.choices[0].text == prompt + plain.choices[0].text


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    free = client.completions.create(model=TINY_NAME, prompt="Write words:", max_tokens=24,
                                     extra_body=NO_EOS, **GREEDY).choices[0].text
    # Three letters from the second half of the text (never half of a multi-byte character).
    start = next(i for i in range(len(free) // 2, len(free) - 2) if free[i:i + 3].isalpha())
    stop = free[start:start + 3]
    stopped = client.completions.create(model=TINY_NAME, prompt="Write words:", max_tokens=24,
                                        stop=[stop], extra_body=NO_EOS, **GREEDY).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[:free.index(stop)]


def test_logprobs_legacy_format(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=TINY_NAME, prompt="Logprobs please",
                                           max_tokens=6, logprobs=3, extra_body=NO_EOS,
                                           **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert logprobs.top_logprobs and logprobs.text_offset
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 6
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs, strict=True):
        assert logprob is not None and logprob <= 0.0
        assert 1 <= len(top) <= 4 and top[token] == logprob  # chosen + up to 3 alternatives
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen is the best
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_with_logprobs_has_null_prompt_logprobs(tiny_server: ServerProcess,
                                                     client: openai.OpenAI) -> None:
    with tiny_server.http() as http:
        num_prompt = http.post("/tokenize", json={"prompt": "Echo me"}).json()["count"]
    completion = client.completions.create(model=TINY_NAME, prompt="Echo me", max_tokens=3,
                                           echo=True, logprobs=0, extra_body=NO_EOS)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs and logprobs.top_logprobs
    assert logprobs.token_logprobs[:num_prompt] == [None] * num_prompt
    assert logprobs.top_logprobs[:num_prompt] == [None] * num_prompt
    assert all(lp is not None for lp in logprobs.token_logprobs[num_prompt:])
    assert len(logprobs.token_logprobs) == num_prompt + 3


def test_stream_equals_non_streamed_text(client: openai.OpenAI) -> None:
    kwargs = {"model": TINY_NAME, "prompt": ["Stream me", "And me too"], "n": 2,
              "max_tokens": 20, **GREEDY}
    full = client.completions.create(**kwargs)
    texts = [""] * 4
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True},
                                           **kwargs):
        assert chunk.id.startswith("cmpl-")
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            assert c.index not in finish  # nothing after a choice's finish_reason
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert texts == [c.text for c in full.choices]
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage == full.usage


def test_logit_bias_and_vllm_extensions(tiny_server: ServerProcess,
                                        client: openai.OpenAI) -> None:
    with tiny_server.http() as http:
        [token_id] = http.post("/tokenize", json={"prompt": " world"}).json()["tokens"]
    biased = client.completions.create(model=TINY_NAME, prompt="Hello", max_tokens=4,
                                       logit_bias={str(token_id): 100}, extra_body=NO_EOS,
                                       **GREEDY)
    assert biased.choices[0].text == " world" * 4
    # A stop token id ends the request at once (vLLM extension), without the token's text.
    stopped = client.completions.create(model=TINY_NAME, prompt="Hello", max_tokens=4,
                                        logit_bias={str(token_id): 100}, **GREEDY,
                                        extra_body={"stop_token_ids": [token_id]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == ""
