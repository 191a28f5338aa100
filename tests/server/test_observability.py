"""Request ids, logs and HTTP series of a real server: X-Request-Id honoured (or made) and
returned, in the response's id and in every log line about the request; --log-format json;
vLLM's periodic stats line; /metrics scrapes kept out of the access log; every HTTP status
counted by handler."""

from __future__ import annotations

import json
import pathlib
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.harness import TINY_ENGINE_ARGS, TINY_NAME, ServerProcess, run_server

CHAT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def json_server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path,
                ) -> Iterator[ServerProcess]:
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS, "--log-format", "json",
                    "--log-stats-interval", "0.2", "--max-request-bytes", "10000",
                    served_name=TINY_NAME) as server:
        yield server


def log_lines(server: ServerProcess) -> list[dict[str, object]]:
    """The server's JSON log lines (its own output; progress bars and the like are not logs)."""
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def test_request_id_is_honoured_and_returned(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        given = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-42"})
        made = http.post("/v1/chat/completions", json=CHAT)
        odd = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                        headers={"X-Request-Id": "has spaces"})
    assert given.headers["x-request-id"] == "abc-42"
    assert given.json()["id"] == "chatcmpl-abc-42"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert made.json()["id"] == "chatcmpl-" + made.headers["x-request-id"]
    assert odd.headers["x-request-id"] != "has spaces"  # not fit for logs: replaced
    # the access line of that request carries its id (text format)
    deadline = time.monotonic() + 5
    while "[request_id=abc-42]" not in tiny_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [ln for ln in tiny_server.log().splitlines() if "[request_id=abc-42]" in ln]
    assert "uvicorn.access" in line and "POST /v1/chat/completions" in line


def test_json_logs_stats_line_and_no_scrapes(json_server: ServerProcess) -> None:
    with json_server.http() as http:
        response = http.post("/v1/completions", headers={"X-Request-Id": "json-1"},
                             json={"model": TINY_NAME, "prompt": "Count:", "max_tokens": 300,
                                   "ignore_eos": True})
        assert response.status_code == 200
        http.get("/metrics")
    time.sleep(0.3)
    lines = log_lines(json_server)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    [access] = [ln for ln in lines if ln.get("request_id") == "json-1"]
    assert access["logger"] == "uvicorn.access" and access["path"] == "/v1/completions"
    assert access["status"] == 200 and access["method"] == "POST"
    assert not [ln for ln in lines if ln.get("path") == "/metrics"]
    stats = [ln["message"] for ln in lines if "Avg prompt throughput" in str(ln["message"])]
    assert stats, "no stats line while the engine worked"
    assert re.search(r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, "
                     r"Prefix cache hit rate: [\d.]+%", str(stats[0]))


def test_http_series_by_handler_and_status(json_server: ServerProcess) -> None:
    url = json_server.url
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 0}).status_code == 400
    assert httpx.post(f"{url}/v1/completions",
                      json={"model": "other", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{url}/v1/completions",
                      content=b'{"prompt": "' + b"x" * 20000 + b'"}').status_code == 413
    assert httpx.get(f"{url}/no/such/path").status_code == 404

    def count(handler: str, status: str) -> float:
        return json_server.metric("http_requests_total", handler=handler, status=status)

    assert count("/v1/completions", "400") >= 1
    assert count("/v1/completions", "404") >= 1
    assert count("/v1/completions", "413") >= 1  # refused before routing, still named
    assert count("none", "404") >= 1
    assert json_server.metric("http_request_duration_seconds_count",
                              handler="/v1/completions") >= 3
    assert count("/metrics", "200") == 0  # scrapes are not counted
