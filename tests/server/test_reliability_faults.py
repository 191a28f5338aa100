"""Engine faults, injected from the test into a real engine (no fault hook in the product code):

- an exception inside one step (the model runner raises once) fails exactly the requests of that
  step, with a 500 (JSON) or an error event (stream); requests not in it finish, the engine goes
  on and still gives the same greedy tokens;
- an exception that kills the engine loop (the scheduler raises) makes /health answer 503 within a
  second, fails the requests in flight with 503 / an error event, and every later request gets a
  503 at once: nothing hangs.

The app runs in-process (uvicorn on a thread, real HTTP) so the test can reach its engine.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.core import EngineCore
from server.app import build_app
from server.config import ServerConfig
from tests.server.harness import MakeCore, assert_error, metric_value
from tests.server.inprocess import serve_in_thread

LONG = {"prompt": "Keep going", "max_tokens": 400, "ignore_eos": True}
GREEDY = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
WAIT_S = 10.0  # bound on every wait: a hang fails the test instead of blocking it


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT_S)


def stream_events(url: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads of a streamed completion (the response must be a 200 stream)."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=WAIT_S) as response:
        assert response.status_code == 200, response.read()
        return [line.removeprefix("data: ") for line in response.iter_lines()
                if line.startswith("data: ")]


def check_error_event(events: list[str], error_type: str) -> None:
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == error_type


def test_step_fault_fails_only_that_steps_requests(tiny_llama_dir: pathlib.Path) -> None:
    # Two requests run at once, the rest wait.
    core = EngineCore.load(EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_kv_blocks=64,
                                                    block_size=16, max_num_seqs=2))
    app = build_app(AsyncEngine(core), ServerConfig())
    real_execute = core.runner.execute
    armed = threading.Event()
    failed_ids: list[str] = []

    def execute(scheduler_output: Any) -> Any:
        if armed.is_set() and not failed_ids:
            failed_ids.extend(c.request_id for c in scheduler_output.chunks)
            raise RuntimeError("injected fault")
        return real_execute(scheduler_output)

    core.runner.execute = execute  # type: ignore[method-assign]
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(4) as pool:
        reference = post(url, GREEDY).json()["choices"][0]["text"]
        # A (stream) and B run; C and D (stream) wait behind them when the fault hits.
        a = pool.submit(stream_events, url, LONG)
        b = pool.submit(post, url, LONG)
        wait_for(lambda: len(core.scheduler.running) == 2, "A and B to run")
        c = pool.submit(post, url, {**LONG, "max_tokens": 20})
        d = pool.submit(stream_events, url, {**LONG, "max_tokens": 20})
        wait_for(lambda: len(core.scheduler.waiting) == 2, "C and D to wait")
        armed.set()
        check_error_event(a.result(), "server_error")
        error = assert_error(b.result(), 500)
        assert "the engine failed" in error["message"]
        assert len(failed_ids) == 2
        # The waiting requests were not in the failed step: both finish normally.
        c_body = c.result().json()
        assert c_body["choices"][0]["finish_reason"] == "length"
        assert c_body["usage"]["completion_tokens"] == 20
        d_events = d.result()
        assert d_events[-1] == "[DONE]" and not any('"error"' in e for e in d_events)
        assert json.loads(d_events[-2])["choices"][0]["finish_reason"] == "length"
        # The engine goes on: same greedy tokens as before the fault, every block free.
        assert post(url, GREEDY).json()["choices"][0]["text"] == reference
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "xyserve:request_success_total",
                            finished_reason="error") == 2
        wait_for(lambda: core.scheduler.kv_cache.num_free_blocks == core.info.num_kv_blocks,
                 "every KV block to be free")
        assert httpx.get(f"{url}/health").status_code == 200


def test_dead_engine_loop_is_503_within_a_second(make_core: MakeCore) -> None:
    core = make_core()
    engine = AsyncEngine(core)
    app = build_app(engine, ServerConfig())
    real_schedule = core.scheduler.schedule
    armed = threading.Event()
    died_at: list[float] = []

    def schedule() -> Any:
        if armed.is_set():
            died_at.append(time.monotonic())
            raise RuntimeError("injected engine-loop fault")
        return real_schedule()

    core.scheduler.schedule = schedule  # type: ignore[method-assign]
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert httpx.get(f"{url}/health").status_code == 200
        streamed = pool.submit(stream_events, url, LONG)
        waited = pool.submit(post, url, LONG)
        wait_for(lambda: len(core.scheduler.running) == 2, "both requests to run")
        armed.set()
        wait_for(lambda: bool(died_at), "the fault")
        while (health := httpx.get(f"{url}/health", timeout=WAIT_S)).status_code == 200:
            assert time.monotonic() - died_at[0] < 1.0, "/health still 200 a second after"
            time.sleep(0.005)
        health_s = time.monotonic() - died_at[0]
        assert_error(health, 503)
        assert health_s < 1.0
        # In flight: the stream gets an error event, the JSON request a 503; neither hangs.
        check_error_event(streamed.result(timeout=WAIT_S), "server_error")
        assert_error(waited.result(timeout=WAIT_S), 503)
        # Later requests: 503 at once, streaming or not, and the dead loop is not restarted.
        for body in (LONG, {**LONG, "stream": True}):
            start = time.monotonic()
            assert_error(post(url, body), 503)
            assert time.monotonic() - start < 1.0
        assert not engine.is_alive
    print(f"\n/health answered 503 {health_s * 1000:.1f} ms after the engine loop died")
