"""POST /v1/chat/completions through the official OpenAI SDK against a real server (tiny model)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.server.harness import TINY_NAME, ServerProcess

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say something nice."},
]
NO_EOS = {"ignore_eos": True}


def test_system_and_user_messages(tiny_server: ServerProcess, client: openai.OpenAI) -> None:
    with tiny_server.http() as http:
        count = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    completion = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES,
                                                max_tokens=7, temperature=0.0,
                                                extra_body=NO_EOS)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == TINY_NAME
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count  # the chat template, rendered
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == count + 7


def test_max_completion_tokens_wins(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES,
                                                max_tokens=9, max_completion_tokens=3,
                                                extra_body=NO_EOS)
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_default_max_tokens_runs_to_max_model_len(tiny_server: ServerProcess,
                                                  client: openai.OpenAI) -> None:
    # vLLM's chat default: no max_tokens = up to the context length (512 for the tiny model).
    completion = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES,
                                                extra_body=NO_EOS)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.total_tokens == 512


def test_streaming_deltas_role_first_and_equal_to_non_streamed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": TINY_NAME, "messages": MESSAGES, "max_tokens": 16,
                              "temperature": 0.0, "n": 2}
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first_by_choice: dict[int, Any] = {}
    texts = ["", ""]
    finish: dict[int, str] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        first_by_choice.setdefault(choice.index, choice)
        if choice is not first_by_choice[choice.index]:
            assert choice.delta.role is None  # the role only in the first chunk
        assert choice.index not in finish  # the finish_reason is on the last chunk
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finish[choice.index] = choice.finish_reason
    assert all(c.delta.role == "assistant" for c in first_by_choice.values())
    assert texts == [c.message.content for c in full.choices]
    assert finish == {c.index: c.finish_reason for c in full.choices}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == full.usage


def test_logprobs_chat_format(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES,
                                                max_tokens=5, logprobs=True, top_logprobs=2,
                                                temperature=0.0, extra_body=NO_EOS)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 5
    for entry in logprobs.content:
        assert entry.logprob <= 0.0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES,
                                                max_tokens=2)
    assert completion.choices[0].logprobs is None


def test_text_content_parts(client: openai.OpenAI) -> None:
    as_parts: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    as_text: list[Any] = [{"role": "user", "content": "Hi there"}]
    a = client.chat.completions.create(model=TINY_NAME, messages=as_parts, max_tokens=4,
                                       temperature=0.0)
    b = client.chat.completions.create(model=TINY_NAME, messages=as_text, max_tokens=4,
                                       temperature=0.0)
    assert a.choices[0].message.content == b.choices[0].message.content
