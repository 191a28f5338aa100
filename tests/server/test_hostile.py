"""Hostile input beyond the schema: each gets a clear 4xx (in OpenAI's error shape) or is served
correctly; none is a 500 or a hang, and the server serves normally afterwards.

The server here has a 64 KiB body limit and a KV pool of 16 blocks x 16 tokens = 256 tokens,
smaller than max_model_len (512): a request that could never fit the pool is a 400.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.harness import (
    TINY_NAME,
    ServerProcess,
    assert_error,
    assert_serves,
    run_server,
)
from tests.server.test_disconnect import wait_until_idle

MAX_REQUEST_BYTES = 65536
VOCAB_SIZE = 49152  # the tiny models use the SmolLM2 tokenizer
TIMEOUT_S = 30.0  # no request here may take longer: a hang fails instead of blocking


@pytest.fixture(scope="module")
def server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    with run_server(str(tiny_llama_dir), server_logs, "--num-kv-blocks", "16", "--block-size",
                    "16", "--max-model-len", "512", "--max-request-bytes", str(MAX_REQUEST_BYTES),
                    served_name=TINY_NAME) as server:
        yield server
        assert "Traceback" not in server.log()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client:
        yield client
    wait_until_idle(server)
    assert_serves(server)


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 4, **fields}


def post_raw(http: httpx.Client, content: bytes | Iterator[bytes],
             path: str = "/v1/completions") -> httpx.Response:
    return http.post(path, content=content, headers={"content-type": "application/json"})


# ------------------------------------------------------------------------------ body size


def test_body_over_the_limit_is_413_before_parsing(http: httpx.Client) -> None:
    padding = "x" * MAX_REQUEST_BYTES
    body = json.dumps(completion(user=padding)).encode()
    error = assert_error(post_raw(http, body), 413)
    assert str(MAX_REQUEST_BYTES) in error["message"]
    # Not even valid JSON, and far larger: refused by its Content-Length alone.
    assert_error(post_raw(http, b"{" * (8 * MAX_REQUEST_BYTES)), 413)
    # Just under the limit: parsed and served as usual.
    fits = json.dumps(completion(user="x" * (MAX_REQUEST_BYTES - 200))).encode()
    assert len(fits) <= MAX_REQUEST_BYTES
    assert post_raw(http, fits).status_code == 200


def test_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"prompt": "'
        for _ in range(2 * MAX_REQUEST_BYTES // 4096):
            yield b"y" * 4096
        yield b'"}'

    response = post_raw(http, chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_error(response, 413)

    def small_chunks() -> Iterator[bytes]:
        yield json.dumps(completion())[:10].encode()
        yield json.dumps(completion())[10:].encode()

    assert post_raw(http, small_chunks()).status_code == 200


# -------------------------------------------------------------------------- malformed bodies


def test_invalid_utf8_is_400(http: httpx.Client) -> None:
    assert_error(post_raw(http, b'{"prompt": "caf\xc3\x28 \xff\xfe"}'), 400)
    assert_error(post_raw(http, b'\xff\xfe{"prompt": "x"}'), 400)


def test_lone_surrogates_are_400(http: httpx.Client) -> None:
    # Valid JSON, but not valid Unicode: no tokenizer takes it.
    assert_error(post_raw(http, b'{"prompt": "a\\ud800b"}'), 400, param="prompt")
    chat = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    assert_error(post_raw(http, chat, "/v1/chat/completions"), 400, param="messages")
    assert_error(post_raw(http, b'{"prompt": "\\ud800"}', "/tokenize"), 400)
    # Echoed in an error message, it stays valid (escaped) JSON.
    response = post_raw(http, b'{"prompt": "x", "model": "\\ud800"}')
    assert_error(response, 404, param="model")


def test_deeply_nested_json_is_400(http: httpx.Client) -> None:
    depth = 30_000  # 60 KB: under the size limit, far over any parser's recursion limit
    assert_error(post_raw(http, b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"), 400)
    nested = "[" * 200 + "1" + "]" * 200  # parses; not a prompt
    assert_error(post_raw(http, f'{{"prompt": {nested}}}'.encode()), 400, param="prompt")
    assert_error(post_raw(http, f'{{"prompt": "x", "guided_json": {nested}}}'.encode()), 400,
                 param="guided_json")


def test_non_finite_numbers_are_400(http: httpx.Client) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        body = b'{"prompt": "x", "temperature": ' + literal + b"}"
        assert_error(post_raw(http, body), 400, param="temperature")


def test_huge_numbers_are_400(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json=completion(max_tokens=10**30)), 400,
                 param="max_tokens")
    assert_error(http.post("/v1/completions", json=completion(n=10**12)), 400, param="n")
    assert_error(post_raw(http, b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}"), 400)


# ------------------------------------------------------------------------------- token ids


def test_token_ids_outside_the_vocabulary_are_400(http: httpx.Client) -> None:
    for bad in (VOCAB_SIZE, -1, 10**30):
        assert_error(http.post("/v1/completions", json=completion(prompt=[1, bad])), 400,
                     param="prompt")
        assert_error(http.post("/v1/completions", json=completion(prompt=[[1], [2, bad]])), 400,
                     param="prompt")
        assert_error(http.post("/detokenize", json={"tokens": [bad]}), 400, param="tokens")
        assert_error(http.post("/v1/completions", json=completion(stop_token_ids=[bad])), 400,
                     param="stop_token_ids")
    assert http.post("/v1/completions", json=completion(prompt=[VOCAB_SIZE - 1])).is_success


def test_logit_bias_with_bad_keys_is_400(http: httpx.Client) -> None:
    for key in ("abc", "1.5", "", str(VOCAB_SIZE), "-1", "9" * 40):
        assert_error(http.post("/v1/completions", json=completion(logit_bias={key: 1})), 400,
                     param="logit_bias")
    assert_error(http.post("/v1/completions", json=completion(logit_bias={"5": 1000})), 400,
                 param="logit_bias")
    too_many = {str(i): 1 for i in range(1025)}
    assert_error(http.post("/v1/completions", json=completion(logit_bias=too_many)), 400,
                 param="logit_bias")
    # Valid keys are applied: a +100 bias makes that token the greedy choice.
    body = http.post("/v1/completions", json=completion(logit_bias={"42": 100}, temperature=0,
                                                        logprobs=0)).json()
    assert body["choices"][0]["text"] == http.post(
        "/detokenize", json={"tokens": [42] * 4}).json()["prompt"]


def test_stop_lists_too_long_are_400(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json=completion(stop=["a"] * 17)), 400,
                 param="stop")
    assert_error(http.post("/v1/completions", json=completion(stop="s" * 1025)), 400,
                 param="stop")
    assert_error(http.post("/v1/completions", json=completion(stop=["ok", "s" * 1025])), 400,
                 param="stop")
    assert_error(http.post("/v1/completions", json=completion(stop_token_ids=[1] * 1025)), 400,
                 param="stop_token_ids")
    assert http.post("/v1/completions", json=completion(stop=["x" * 1024] * 16)).is_success


# ----------------------------------------------------------------------------- the KV pool


def test_max_tokens_beyond_the_kv_pool_is_400_before_streaming(http: httpx.Client) -> None:
    # 300 tokens fit max_model_len (512) but need 19 blocks of a 16-block pool: never runnable.
    for stream in (False, True):
        response = http.post("/v1/completions",
                             json=completion(max_tokens=300, stream=stream))
        error = assert_error(response, 400)  # a status, not an error event in a 200 stream
        assert "KV blocks" in error["message"]
    # Chat without max_tokens may run to max_model_len (512 tokens): it can never fit either.
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert_error(http.post("/v1/chat/completions", json=chat), 400)


def test_n_beyond_the_kv_pool_is_served_in_turns(http: httpx.Client) -> None:
    # 8 choices x ~7 blocks each > 16 blocks: they cannot all run at once, so they take turns.
    body = http.post("/v1/completions", json=completion(n=8, max_tokens=100, ignore_eos=True))
    assert body.status_code == 200, body.text
    choices = body.json()["choices"]
    assert [c["index"] for c in choices] == list(range(8))
    assert all(c["finish_reason"] == "length" for c in choices)
    assert body.json()["usage"]["completion_tokens"] == 800
    assert_error(http.post("/v1/completions", json=completion(n=129)), 400, param="n")


def test_a_slow_hostile_burst_leaves_no_trace(server: ServerProcess, http: httpx.Client) -> None:
    """Many bad requests in a row: all refused fast, nothing queued, nothing leaked."""
    start = time.monotonic()
    for i in range(50):
        bad = [completion(n=0), completion(prompt=[VOCAB_SIZE + i]), completion(max_tokens=300),
               completion(logit_bias={"x": 1}), completion(stop=["a"] * 20)][i % 5]
        assert 400 <= http.post("/v1/completions", json=bad).status_code < 500
    assert time.monotonic() - start < 10.0
    assert server.metric("xyserve:num_requests_waiting") == 0
