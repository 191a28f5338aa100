"""The default model behind the server gives exactly what the offline `LLM.generate` gives.

Same engine options on both sides (the server's defaults, a small KV pool), greedy, one request at
a time, so both runs see the same batches and the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from engine import LLM, SamplingParams
from tests.server.harness import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the tallest mountain in the world?"},
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm(default_server: ServerProcess) -> Iterator[LLM]:
    yield LLM(MODEL, num_kv_blocks=16)


def offline(llm: LLM, prompt: str | list[int]) -> str:
    [out] = llm.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return out.text


def test_completions_match_llm_generate(default_server: ServerProcess, llm: LLM) -> None:
    client = default_server.client()
    for prompt in PROMPTS:
        online = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0.0)
        assert online.choices[0].text == offline(llm, prompt)


def test_chat_matches_llm_generate_and_streams_the_same(default_server: ServerProcess,
                                                        llm: LLM) -> None:
    text = llm.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = llm.tokenizer(text, add_special_tokens=False).input_ids
    expected = offline(llm, prompt_ids)
    assert expected.strip()

    client = default_server.client()
    online = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                            max_tokens=MAX_TOKENS, temperature=0.0)
    assert online.choices[0].message.content == expected
    assert online.usage is not None and online.usage.prompt_tokens == len(prompt_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                 max_tokens=MAX_TOKENS, temperature=0.0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == online.choices[0].finish_reason
