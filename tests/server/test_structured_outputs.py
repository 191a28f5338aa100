"""Structured outputs over HTTP, through the official OpenAI SDK (tiny model): response_format
on both endpoints, vLLM's structured_outputs and guided_* fields, streamed and not; every output
validates, over many seeded sampled requests; what cannot be compiled is a 400 naming the field.

Strings and numbers are bounded in the schemas: the random-weight model would otherwise write
one string until max_tokens (the grammar keeps it valid, not short).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server.harness import TINY_NAME, ServerProcess, assert_error

MESSAGES: list[Any] = [{"role": "user", "content": "Describe a pet."}]
MAX_TOKENS = 96


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=30)
    kind: Literal["cat", "dog"]
    vaccinated: bool


PET_SCHEMA = {**Pet.model_json_schema(), "additionalProperties": False}


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=TINY_NAME, messages=MESSAGES, response_format=Pet, max_tokens=MAX_TOKENS,
        temperature=0.0)
    choice = completion.choices[0]
    assert isinstance(choice.message.parsed, Pet)
    assert choice.finish_reason == "stop"


def test_sdk_stream_with_a_pydantic_model(client: openai.OpenAI) -> None:
    with client.beta.chat.completions.stream(
            model=TINY_NAME, messages=MESSAGES, response_format=Pet, max_tokens=MAX_TOKENS,
            temperature=0.8, seed=3) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1  # streamed, token by token
    assert isinstance(final.choices[0].message.parsed, Pet)


def test_many_seeded_sampled_requests_validate(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, n=24, seed=11, temperature=1.0,
        max_tokens=MAX_TOKENS, response_format={
            "type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA,
                                                   "strict": True}})
    texts = [c.message.content or "" for c in completion.choices]
    for choice, text in zip(completion.choices, texts, strict=True):
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(text), PET_SCHEMA)
    assert len(set(texts)) > 12  # sampled, and seeded per choice
    again = client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, n=2, seed=11, temperature=1.0,
        max_tokens=MAX_TOKENS, extra_body={"guided_json": PET_SCHEMA})
    assert [c.message.content for c in again.choices] == texts[:2]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_take_response_format_and_guided_json(client: openai.OpenAI,
                                                          stream: bool) -> None:
    for extra in ({"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "p", "schema": PET_SCHEMA}}},
                  {"guided_json": json.dumps(PET_SCHEMA)},
                  {"structured_outputs": {"json": PET_SCHEMA}}):
        result = client.completions.create(model=TINY_NAME, prompt="A pet:", stream=stream,
                                           max_tokens=MAX_TOKENS, temperature=0.0,
                                           extra_body=extra)
        text = ("".join(c.choices[0].text for c in result) if stream  # type: ignore[union-attr]
                else result.choices[0].text)  # type: ignore[union-attr]
        jsonschema.validate(json.loads(text), PET_SCHEMA)


@pytest.mark.parametrize(("extra", "pattern"), [
    ({"guided_regex": r"\d{3}-[a-z]{3}"}, r"\d{3}-[a-z]{3}"),
    ({"guided_choice": ["red", "green"]}, r"red|green"),
    ({"structured_outputs": {"choice": ["up", "down"]}}, r"up|down"),
    ({"structured_outputs": {"regex": "[xy]{5}"}}, r"[xy]{5}"),
    ({"guided_grammar": 'root ::= "ab" [0-9]'}, r"ab[0-9]"),
    ({"structured_outputs": {"grammar": 'start: "v" /[0-9]/ "." /[0-9]/'}}, r"v\d\.\d"),
])
def test_regex_choice_and_grammar(client: openai.OpenAI, extra: dict[str, Any],
                                  pattern: str) -> None:
    completion = client.completions.create(model=TINY_NAME, prompt="Answer:", n=3, seed=5,
                                           temperature=1.0, max_tokens=16, extra_body=extra)
    for choice in completion.choices:
        assert re.fullmatch(pattern, choice.text), choice.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "nope"}}}}},
     "structured_outputs"),
])
def test_uncompilable_is_400_before_streaming(tiny_server: ServerProcess, extra: dict[str, Any],
                                              param: str, stream: bool) -> None:
    body = {"model": TINY_NAME, "messages": MESSAGES, "stream": stream, **extra}
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=30)
    error = assert_error(response, 400, param=param)
    assert error["code"] == "invalid_grammar" and "cannot be compiled" in error["message"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
     "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "structural_tag"}}, "response_format"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
])
def test_malformed_or_unsupported_options_are_400(tiny_server: ServerProcess,
                                                  extra: dict[str, Any], param: str) -> None:
    body = {"model": TINY_NAME, "prompt": "x", **extra}
    assert_error(httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=30), 400,
                 param=param)


def test_compiles_and_cache_hits_on_metrics(tiny_server: ServerProcess,
                                            client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"z": {"type": "integer", "maximum": 5}},
              "required": ["z"], "additionalProperties": False}
    before_hits = tiny_server.metric("xyserve:structured_output_cache_hits_total")
    for _ in range(2):
        client.completions.create(model=TINY_NAME, prompt="x", max_tokens=16,
                                  extra_body={"guided_json": schema})
    assert tiny_server.metric("xyserve:structured_output_cache_hits_total") >= before_hits + 1
    assert tiny_server.metric("xyserve:structured_output_compile_seconds_count") >= 1
