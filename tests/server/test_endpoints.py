"""The non-generation endpoints, and the raw wire format as curl sees it."""

from __future__ import annotations

import json
import shutil
import subprocess

import openai
import pytest

from tests.server.harness import TINY_NAME, ServerProcess

curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def test_models(client: openai.OpenAI) -> None:
    [model] = client.models.list().data
    assert model.id == TINY_NAME and model.object == "model"
    assert model.owned_by == "xyserve"
    assert client.models.retrieve(TINY_NAME).id == TINY_NAME


def test_health_and_version(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        assert http.get("/health").status_code == 200
        version = http.get("/version")
    assert version.status_code == 200 and version.json()["version"]


def test_tokenize_detokenize_round_trip(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": "Hello world", "model": TINY_NAME}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0
        assert tokens["max_model_len"] == 512
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert text == {"prompt": "Hello world"}
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
        rendered = http.post("/detokenize", json={"tokens": chat.json()["tokens"]}).json()
    # The chat template wraps the message and ends with the assistant cue.
    assert "Hi" in rendered["prompt"] and rendered["prompt"].rstrip().endswith("assistant")


def test_metrics_exposes_the_gauges(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in ("xyserve:num_requests_running", "xyserve:num_requests_waiting",
                 "xyserve:kv_cache_usage_perc"):
        assert f'{name}{{model_name="{TINY_NAME}"}}' in response.text


def test_metrics_count_tokens(tiny_server: ServerProcess, client: openai.OpenAI) -> None:
    before = tiny_server.metric("xyserve:generation_tokens_total")
    finished_before = tiny_server.metric("xyserve:request_success_total", finished_reason="length")
    client.completions.create(model=TINY_NAME, prompt="Count me", n=2, max_tokens=3,
                              extra_body={"ignore_eos": True})
    assert tiny_server.metric("xyserve:generation_tokens_total") == before + 6
    assert tiny_server.metric("xyserve:request_success_total",
                              finished_reason="length") == finished_before + 2


@curl
def test_curl_sse_framing(tiny_server: ServerProcess) -> None:
    body = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    out = subprocess.run(["curl", "-sN", "-i", f"{tiny_server.url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, check=True, timeout=30).stdout.decode()
    head, _, stream = out.partition("\r\n\r\n")
    assert "content-type: text/event-stream" in head.lower()
    events = stream.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


@curl
def test_curl_completion(tiny_server: ServerProcess) -> None:
    out = subprocess.run(["curl", "-s", f"{tiny_server.url}/v1/completions",
                          "-H", "Content-Type: application/json",
                          "-d", '{"prompt": "Say hi", "max_tokens": 3, "ignore_eos": true}'],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    completion = json.loads(out)
    assert completion["object"] == "text_completion"
    assert completion["usage"]["completion_tokens"] == 3
