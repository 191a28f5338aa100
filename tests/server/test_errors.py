"""One test per error class: status, OpenAI error body, and the server still serves afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from tests.server.harness import API_KEY, TINY_NAME, ServerProcess, assert_error, assert_serves

CHAT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def post(server: ServerProcess, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    with server.http() as http:
        if body is not None:
            kwargs["json"] = body
        return http.post(path, **kwargs)


def test_400_malformed_json(tiny_server: ServerProcess) -> None:
    response = post(tiny_server, "/v1/chat/completions", content=b'{"messages": [',
                    headers={"Content-Type": "application/json"})
    assert "JSON" in assert_error(response, 400)["message"]
    assert_serves(tiny_server)


def test_400_wrong_type(tiny_server: ServerProcess) -> None:
    response = post(tiny_server, "/v1/completions", {"prompt": "x", "max_tokens": "many"})
    assert_error(response, 400, param="max_tokens")
    assert_serves(tiny_server)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.5), ("top_p", 1.5), ("logprobs", 21), ("n", 0), ("max_tokens", 0),
    ("presence_penalty", 3.0), ("min_p", 2.0)])
def test_400_out_of_range(tiny_server: ServerProcess, field: str, value: float) -> None:
    response = post(tiny_server, "/v1/completions", {"prompt": "x", field: value})
    assert field in assert_error(response, 400, param=field)["message"]
    assert_serves(tiny_server)


def test_400_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY_NAME, messages=CHAT["messages"],
                                       temperature=-1.0)
    assert info.value.status_code == 400
    assert "temperature" in info.value.message


def test_400_empty_messages(tiny_server: ServerProcess) -> None:
    response = post(tiny_server, "/v1/chat/completions", {**CHAT, "messages": []})
    assert_error(response, 400, param="messages")
    assert_serves(tiny_server)


def test_400_empty_prompt(tiny_server: ServerProcess) -> None:
    assert_error(post(tiny_server, "/v1/completions", {"prompt": ""}), 400, param="prompt")
    assert_error(post(tiny_server, "/v1/completions", {"prompt": []}), 400, param="prompt")


@pytest.mark.parametrize("stream", [False, True])
def test_400_too_long_before_streaming(tiny_server: ServerProcess, stream: bool) -> None:
    waiting_before = tiny_server.metric("xyserve:num_requests_waiting")
    response = post(tiny_server, "/v1/completions",
                    {"prompt": "hello " * 100, "max_tokens": 500, "stream": stream})
    error = assert_error(response, 400, param="max_tokens")  # JSON, not an event stream
    assert error["code"] == "context_length_exceeded"
    assert "512" in error["message"]
    assert tiny_server.metric("xyserve:num_requests_waiting") == waiting_before
    assert_error(post(tiny_server, "/v1/completions", {"prompt": "hello " * 600}), 400)
    assert_serves(tiny_server)


def test_400_token_id_outside_vocabulary(tiny_server: ServerProcess) -> None:
    response = post(tiny_server, "/v1/completions", {"prompt": [1, 2, 10**9]})
    assert "vocabulary" in assert_error(response, 400, param="prompt")["message"]


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "structural_tag"}}, "response_format"),
    ("/v1/completions", {"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ("/v1/completions", {"suffix": "the end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
])
def test_400_unsupported_parameter(tiny_server: ServerProcess, path: str, extra: dict[str, Any],
                                   param: str) -> None:
    body = {**CHAT, **extra} if "chat" in path else {"prompt": "x", **extra}
    error = assert_error(post(tiny_server, path, body), 400, param=param)
    assert "not supported" in error["message"]
    assert_serves(tiny_server)


def test_unknown_fields_are_ignored(tiny_server: ServerProcess) -> None:
    response = post(tiny_server, "/v1/completions",
                    {"prompt": "x", "max_tokens": 2, "no_such_field": 1, "user": "me",
                     "response_format": {"type": "text"}, "tool_choice": None})
    assert response.status_code == 200, response.text


def test_401_missing_and_wrong_key(auth_server: ServerProcess) -> None:
    url = f"{auth_server.url}/v1/completions"
    body = {"prompt": "x", "max_tokens": 2}
    assert_error(httpx.post(url, json=body), 401)
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{auth_server.url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        auth_server.client(api_key="wrong").models.list()
    # Monitoring stays open; the right key works.
    assert httpx.get(f"{auth_server.url}/health").status_code == 200
    assert httpx.get(f"{auth_server.url}/metrics").status_code == 200
    assert auth_server.client(api_key=API_KEY).models.list().data[0].id == TINY_NAME
    assert_serves(auth_server)


def test_404_unknown_model(tiny_server: ServerProcess, client: openai.OpenAI) -> None:
    error = assert_error(post(tiny_server, "/v1/completions", {"prompt": "x", "model": "gpt-9"}),
                         404, param="model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CHAT["messages"])
    assert_serves(tiny_server)


def test_429_when_the_queue_is_full(small_queue_server: ServerProcess) -> None:
    # One request runs (max_num_seqs 1), one waits (max_waiting_requests 1): the rest are 429.
    # Long generations keep the one running slot busy while the flood arrives, even on a loaded
    # machine where the requests trickle in.
    body = {"prompt": "flood", "max_tokens": 400, "ignore_eos": True}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_queue_server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body)
                                          for _ in range(12)))

    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code != 429]
    assert refused and accepted, [r.status_code for r in responses]
    for response in refused:
        assert_error(response, 429)
        assert int(response.headers["Retry-After"]) >= 0
    for response in accepted:  # every accepted request finished with its tokens
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 400
    assert_serves(small_queue_server)
