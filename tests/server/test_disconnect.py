"""A client that goes away aborts its requests at once: nothing keeps running, all KV is free."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.harness import TINY_NAME, ServerProcess

# ~2 ms a token on the tiny model: a full run would take about a second, far longer than the
# few milliseconds the client stays.
LONG = {"model": TINY_NAME, "prompt": "Keep going", "max_tokens": 490, "ignore_eos": True}


def wait_until_idle(server: ServerProcess, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (server.metric("xyserve:num_requests_running") == 0
                and server.metric("xyserve:num_requests_waiting") == 0
                and server.metric("xyserve:kv_cache_usage_perc") == 0):
            return
        time.sleep(0.02)
    pytest.fail("the server still holds requests or KV blocks after the client left")


def aborted(server: ServerProcess) -> float:
    return server.metric("xyserve:request_success_total", finished_reason="abort")


def generated(server: ServerProcess) -> float:
    return server.metric("xyserve:generation_tokens_total")


def test_dropped_stream_is_aborted(tiny_server: ServerProcess) -> None:
    wait_until_idle(tiny_server)
    aborted_before, generated_before = aborted(tiny_server), generated(tiny_server)
    with (httpx.Client(base_url=tiny_server.url, timeout=30) as http,
          http.stream("POST", "/v1/completions", json={**LONG, "stream": True, "n": 2}) as s):
        lines = s.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few chunks (and their blank lines)
    assert any(line.startswith("data: {") for line in received)
    wait_until_idle(tiny_server)
    assert aborted(tiny_server) == aborted_before + 2  # both choices
    assert generated(tiny_server) - generated_before < 2 * LONG["max_tokens"]


def test_dropped_non_streaming_request_is_aborted(tiny_server: ServerProcess) -> None:
    wait_until_idle(tiny_server)
    aborted_before, generated_before = aborted(tiny_server), generated(tiny_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.url}/v1/completions", json={**LONG, "prompt": ["a", "b"]},
                   timeout=0.1)
    wait_until_idle(tiny_server)
    assert aborted(tiny_server) == aborted_before + 2  # both prompts' requests
    assert generated(tiny_server) - generated_before < 2 * LONG["max_tokens"]
