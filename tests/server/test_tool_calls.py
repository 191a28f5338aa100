"""Tool calls on /v1/chat/completions through the OpenAI SDK and its tool helpers (tiny model).

tool_choice "required" and a named function are enforced by the grammar, so even the random
model calls them with valid arguments; "auto" is parsed from whatever the model writes, checked
here with a scripted sampler that writes a Hermes-style call; "none" leaves the tools out.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.core import EngineCore
from server.app import build_app
from server.config import ServerConfig
from tests.server.harness import TINY_NAME, ServerProcess, assert_error
from tests.server.inprocess import serve_in_thread


class GetWeather(pydantic.BaseModel):
    """Current weather in a city."""

    city: str = pydantic.Field(max_length=10)
    unit: Literal["celsius", "fahrenheit"]


class Address(pydantic.BaseModel):
    zip: str = pydantic.Field(pattern=r"^[0-9]{5}$")


class SendLetter(pydantic.BaseModel):
    to: Address  # a nested model: its schema comes with $defs
    urgent: bool


TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(SendLetter)]
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_is_enforced_and_parsed_by_the_sdk(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=TINY_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", n=6, seed=1,
        temperature=1.0, max_tokens=64, parallel_tool_calls=False)
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls
        assert len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            assert isinstance(call.function.parsed_arguments, GetWeather | SendLetter)


def test_named_function_streamed_as_openai_does(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "SendLetter"}}
    chunks = list(client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=named,  # type: ignore
        stream=True, temperature=0.7, seed=2, max_tokens=64))
    calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function is not None and first.function.name == "SendLetter"
    assert rest and all(d.index == 0 and d.id is None for d in rest)  # argument fragments
    arguments = "".join(d.function.arguments or "" for d in calls if d.function)
    SendLetter.model_validate_json(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.beta.chat.completions.stream(model=TINY_NAME, messages=MESSAGES, tools=TOOLS,
                                             tool_choice=named,  # type: ignore[arg-type]
                                             temperature=0.0, max_tokens=64) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, SendLetter)


def test_none_and_a_tool_conversation(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert completion.choices[0].message.tool_calls is None
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "GetWeather",
                                 "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    completion = client.chat.completions.create(model=TINY_NAME, messages=history, tools=TOOLS,
                                                max_tokens=8)
    assert completion.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("extra", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_tool_errors_are_400(tiny_server: ServerProcess, extra: dict[str, Any],
                             param: str) -> None:
    body = {"model": TINY_NAME, "messages": MESSAGES, **extra}
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=30)
    assert_error(response, 400, param=param)


# ------------------------------------------------------------------ auto: parsing the model


class ScriptedSampler:
    """Stands in for the runner's sampler: every row takes the next token of one script."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.position: dict[str, int] = {}

    def sample(self, logits: Any, rows: Any, masks: Any = None) -> list[tuple[int, None]]:
        out = []
        for row in rows:
            i = self.position.get(row.request_id, 0)
            self.position[row.request_id] = i + 1
            out.append((self.script[min(i, len(self.script) - 1)], None))
        return out

    def free(self, request_ids: Any) -> None:
        pass


@pytest.fixture(scope="module")
def scripted_url(tiny_llama_dir: pathlib.Path) -> Iterator[tuple[str, str]]:
    core = EngineCore.load(EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_kv_blocks=64,
                                                    block_size=16))
    tokenizer = core.info.tokenizer
    text = ('Let me check.<tool_call>\n{"name": "GetWeather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    script = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    core.runner.sampler = ScriptedSampler(script)  # type: ignore[attr-defined]
    with serve_in_thread(build_app(AsyncEngine(core), ServerConfig())) as url:
        yield url, core.info.model_name


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_models_call(scripted_url: tuple[str, str], stream: bool) -> None:
    url, model = scripted_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    request: dict[str, Any] = dict(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=64)
    if stream:
        with client.beta.chat.completions.stream(**request) as s:
            content = "".join(e.delta for e in s if e.type == "content.delta")
            completion = s.get_final_completion()
        assert content == "Let me check."
    else:
        completion = client.beta.chat.completions.parse(**request)
    choice = completion.choices[0]
    assert choice.message.content == "Let me check."
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "GetWeather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert call.function.parsed_arguments == GetWeather(city="Paris", unit="celsius")
