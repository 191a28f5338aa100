"""The protocol's edges: seeds over their whole documented range (every bit counts, beyond it a
400), strict types where OpenAI is strict, min_tokens beyond the context, HEAD for probes."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.harness import API_KEY, TINY_NAME, ServerProcess, assert_error

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def sampled(http: httpx.Client, seed: int, n: int = 1) -> list[str]:
    response = http.post("/v1/completions", json={
        "model": TINY_NAME, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0,
        "seed": seed, "n": n, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return [c["text"] for c in response.json()["choices"]]


def test_every_bit_of_the_seed_counts(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        assert sampled(http, 5) == sampled(http, 5)  # a seed repeats exactly
        texts = {seed: sampled(http, seed)[0]
                 for seed in (5, 5 + 2**32, 5 + 2**40, -5, SEED_MIN, SEED_MAX, 0)}
        assert len(set(texts.values())) == len(texts), texts
        # Choice i uses seed + i; at the top of the range it wraps around instead of failing.
        top = sampled(http, SEED_MAX, n=2)
        assert top[0] == texts[SEED_MAX] and top[1] == texts[SEED_MIN]


@pytest.mark.parametrize("seed", [2**63, 2**64, SEED_MIN - 1, 10**400, -(10**400)])
def test_seeds_beyond_64_bits_are_400(tiny_server: ServerProcess, seed: int) -> None:
    body = f'{{"model": "{TINY_NAME}", "prompt": "x", "max_tokens": 1, "seed": {seed}}}'
    with tiny_server.http() as http:
        error = assert_error(http.post("/v1/completions", content=body,
                                       headers={"content-type": "application/json"}),
                             400, param="seed")
    assert "9223372036854775807" in error["message"]


def test_the_sdk_sees_seed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model=TINY_NAME, prompt="x", max_tokens=1, seed=2**64)


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": "16"}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": "2"}, "n"),
    ({"seed": 1.0}, "seed"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"stream": "true"}, "stream"),
    ({"echo": 1}, "echo"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": [[1], [2, 3.0]]}, "prompt"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
])
def test_wrong_types_are_400(tiny_server: ServerProcess, fields: dict[str, object],
                             param: str) -> None:
    body = {"model": TINY_NAME, "prompt": "x", "max_tokens": 1, **fields}
    with tiny_server.http() as http:
        assert_error(http.post("/v1/completions", json=body), 400, param=param)


def test_right_types_still_pass(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        body = {"model": TINY_NAME, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 1,
                "top_p": 1, "logit_bias": {"5": 1}, "stream": False}
        assert http.post("/v1/completions", json=body).status_code == 200
        chat = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1, "logprobs": True, "top_logprobs": 2}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        assert_error(http.post("/v1/chat/completions", json={**chat, "logprobs": "yes"}), 400,
                     param="logprobs")
        assert_error(http.post("/detokenize", json={"tokens": [1, False]}), 400, param="tokens")


def test_min_tokens_beyond_the_context_is_400(tiny_server: ServerProcess,
                                              client: openai.OpenAI) -> None:
    # max_model_len is 512: no room for 600 tokens after any prompt (max_tokens null: up to it)
    with tiny_server.http() as http:
        error = assert_error(http.post("/v1/completions", json={
            "model": TINY_NAME, "prompt": "x", "max_tokens": None, "min_tokens": 600}),
            400, param="min_tokens")
    assert error["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.chat.completions.create(model=TINY_NAME, messages=[{"role": "user",
                                                                   "content": "hi"}],
                                       extra_body={"min_tokens": 600})


def test_head_answers_like_get_for_load_balancers(tiny_server: ServerProcess,
                                                  auth_server: ServerProcess) -> None:
    for path in ("/health", "/v1/models"):
        get = httpx.get(f"{tiny_server.url}{path}", timeout=10)
        head = httpx.head(f"{tiny_server.url}{path}", timeout=10)
        assert head.status_code == get.status_code == 200
        assert head.content == b""
        assert head.headers.get("content-type") == get.headers.get("content-type")
    # Behind the key, HEAD is as closed as GET; /health stays open.
    assert httpx.head(f"{auth_server.url}/v1/models", timeout=10).status_code == 401
    assert httpx.head(f"{auth_server.url}/v1/models", timeout=10,
                      headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.head(f"{auth_server.url}/health", timeout=10).status_code == 200
