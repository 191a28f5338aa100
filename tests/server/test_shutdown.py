"""Graceful shutdown of a real `xyserve serve` process: SIGTERM mid-load.

- Admission stops at once: a new request gets 503 (the listener stays open: no refused
  connection) and /health answers 503, while the requests in flight run to the end; then the
  process exits 0.
- Requests still running at --shutdown-timeout are aborted: each ends with finish_reason "abort"
  (a stream with its last chunk and [DONE]), and the process still exits 0, soon after the
  deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import signal
import time
from typing import Any

import httpx
import pytest

from tests.server.harness import (
    TINY_ENGINE_ARGS,
    TINY_NAME,
    ServerProcess,
    assert_error,
    metric_value,
    run_server,
)

TIMEOUT_S = 30.0


def call(server: ServerProcess, max_tokens: int, stream: bool) -> tuple[list[str], int]:
    """One completion; returns (finish reason of each choice, completion tokens or chunks)."""
    body = {"model": TINY_NAME, "prompt": "Keep going", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}
    url = f"{server.url}/v1/completions"
    if not stream:
        response = httpx.post(url, json=body, timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text
        data = response.json()
        return [c["finish_reason"] for c in data["choices"]], data["usage"]["completion_tokens"]
    finish: list[str] = []
    chunks = 0
    with httpx.stream("POST", url, json=body, timeout=TIMEOUT_S) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert "error" not in chunk, chunk
        chunks += 1
        finish += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
    return finish, chunks


def wait_running(server: ServerProcess, running: int, waiting: int = 0) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while (server.metric("xyserve:num_requests_running") < running
           or server.metric("xyserve:num_requests_waiting") < waiting):
        if time.monotonic() > deadline:
            pytest.fail("the load never started")
        time.sleep(0.01)


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_llama_dir: pathlib.Path,
                                                        server_logs: pathlib.Path) -> None:
    with (run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS,
                     "--shutdown-timeout", "30", served_name=TINY_NAME) as server,
          concurrent.futures.ThreadPoolExecutor(6) as pool):
        futures = [pool.submit(call, server, 300, stream=i % 2 == 0) for i in range(6)]
        wait_running(server, 6)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Draining: new requests are refused with 503, not with a refused connection.
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"},
                             timeout=TIMEOUT_S)
        assert assert_error(refused, 503)["code"] == "shutting_down"
        health = httpx.get(f"{server.url}/health", timeout=TIMEOUT_S)
        assert_error(health, 503)
        # Both tell clients and load balancers when to try again (elsewhere, or after a restart).
        assert refused.headers["retry-after"].isdigit() and health.headers["retry-after"].isdigit()
        assert httpx.head(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 503
        metrics = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT_S)
        assert metrics.status_code == 200
        # The 503s are on /metrics by route and status.
        for handler in ("/v1/completions", "/health"):
            assert metric_value(metrics.text, "http_requests_total", handler=handler,
                                status="503") >= 1, handler
        # Every accepted request completes in full.
        for future in futures:
            finish, _ = future.result(timeout=TIMEOUT_S)
            assert finish == ["length"]
        assert [f.result()[1] for f in futures[1::2]] == [300] * 3  # JSON: all 300 tokens
        assert server.process.wait(timeout=TIMEOUT_S) == 0
        exited_s = time.monotonic() - signalled
        assert "drained in" in server.log()
    print(f"\nSIGTERM with 6 requests in flight: all completed, exit 0 after {exited_s:.2f} s")


def test_requests_past_the_shutdown_timeout_are_aborted(tiny_llama_dir: pathlib.Path,
                                                        server_logs: pathlib.Path) -> None:
    timeout_s = 1.0
    with (run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS, "--max-num-seqs", "1",
                     "--shutdown-timeout", str(timeout_s), served_name=TINY_NAME) as server,
          concurrent.futures.ThreadPoolExecutor(3) as pool):
        # One at a time, ~1 s each: the last cannot finish within the timeout.
        futures = [pool.submit(call, server, 490, stream=stream)
                   for stream in (True, False, True)]
        wait_running(server, 1, waiting=2)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        finishes: list[Any] = [f.result(timeout=TIMEOUT_S)[0] for f in futures]
        assert server.process.wait(timeout=TIMEOUT_S) == 0
        exited_s = time.monotonic() - signalled
        assert all(f in (["length"], ["abort"]) for f in finishes), finishes
        assert ["abort"] in finishes
        assert timeout_s <= exited_s < timeout_s + 5.0
        assert "shutdown timeout" in server.log()
    print(f"\nSIGTERM, --shutdown-timeout {timeout_s} s: finish reasons {finishes}, exit 0 after "
          f"{exited_s:.2f} s")
