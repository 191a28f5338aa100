"""Admission by the work a call brings: every call counts its prompts x n engine requests against
--max-waiting-requests, also when nothing waits yet; a call that could never be queued is a 400
naming the limit, and --max-choices-per-request caps prompts x n of any one call.

The server here is the issue's: --max-waiting-requests 4 --max-num-seqs 4.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server.harness import (
    TINY_ENGINE_ARGS,
    TINY_NAME,
    ServerProcess,
    assert_error,
    assert_serves,
    run_server,
)
from tests.server.test_disconnect import wait_until_idle

MAX_WAITING = 4
TIMEOUT_S = 20.0  # a refused call answers at once; an accepted flood would not


@pytest.fixture(scope="module")
def server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS, "--max-num-seqs", "4",
                    "--max-waiting-requests", str(MAX_WAITING), served_name=TINY_NAME) as server:
        yield server


def completion(**fields: object) -> dict[str, object]:
    return {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 2, **fields}


def test_one_small_body_cannot_queue_thousands_of_requests(server: ServerProcess) -> None:
    # The body: 1.5 KB, 300 prompts x n 128 = 38,400 engine requests.
    body = completion(prompt=["Hi"] * 300, n=128, max_tokens=16)
    assert len(json.dumps(body)) < 2048
    with server.http(timeout=TIMEOUT_S) as http:
        start = time.monotonic()
        error = assert_error(http.post("/v1/completions", json=body), 400, param="n")
        assert time.monotonic() - start < 5.0
        assert "38400" in error["message"] and "max_choices_per_request" in error["message"]
        # Nothing was queued: the next client is served, not refused with 429.
        assert http.post("/v1/completions", json=completion()).status_code == 200
    assert server.metric("xyserve:num_requests_waiting") == 0


def test_a_call_larger_than_the_queue_is_400_even_when_idle(server: ServerProcess) -> None:
    wait_until_idle(server)
    client = server.client(timeout=TIMEOUT_S)
    for body in (completion(n=MAX_WAITING + 1), completion(prompt=["a"] * (MAX_WAITING + 1)),
                 completion(prompt=[[1, 2]] * 3, n=2)):
        with server.http(timeout=TIMEOUT_S) as http:
            error = assert_error(http.post("/v1/completions", json=body), 400, param="n")
        assert "max_waiting_requests" in error["message"]
    chat = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "n": MAX_WAITING + 1}
    with server.http(timeout=TIMEOUT_S) as http:
        assert_error(http.post("/v1/chat/completions", json=chat), 400, param="n")
    with pytest.raises(openai.BadRequestError, match="max_waiting_requests"):
        client.completions.create(model=TINY_NAME, prompt=["x"] * (MAX_WAITING + 1), max_tokens=1)
    # Exactly the limit fits an empty queue.
    response = client.completions.create(model=TINY_NAME, prompt=["x", "y"], n=2, max_tokens=2)
    assert len(response.choices) == MAX_WAITING
    assert_serves(server)


def test_a_call_that_would_overfill_the_queue_is_429(server: ServerProcess) -> None:
    """4 requests run, 2 wait: a call of 3 more is 429 (2 + 3 > 4), a call of 2 fits."""
    wait_until_idle(server)
    long = completion(max_tokens=490, ignore_eos=True, stream=True)

    async def hold(http: httpx.AsyncClient, n: int, started: asyncio.Event) -> None:
        async with http.stream("POST", "/v1/completions", json={**long, "n": n}) as response:
            assert response.status_code == 200
            async for _ in response.aiter_lines():
                started.set()
                await asyncio.sleep(3600)  # hold the stream until cancelled

    async def main() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as http:
            running = asyncio.Event()
            holders = [asyncio.create_task(hold(http, 4, running))]
            await asyncio.wait_for(running.wait(), TIMEOUT_S)
            holders.append(asyncio.create_task(hold(http, 2, asyncio.Event())))
            deadline = time.monotonic() + TIMEOUT_S
            while server.metric("xyserve:num_requests_waiting") < 2:
                assert time.monotonic() < deadline, "the second call never waited"
                await asyncio.sleep(0.02)
            too_many = await http.post("/v1/completions", json=completion(n=3))
            assert_error(too_many, 429)
            assert too_many.headers["retry-after"].isdigit()
            fits = asyncio.create_task(http.post("/v1/completions", json=completion(n=2)))
            await asyncio.sleep(0.2)  # queued behind the first 4 (not refused)
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return too_many.status_code, (await fits).status_code

    assert asyncio.run(main()) == (429, 200)
    wait_until_idle(server)


def test_max_choices_per_request_caps_any_call(tiny_server: ServerProcess) -> None:
    # The default server: max_waiting_requests 256, max_choices_per_request 1024.
    with tiny_server.http(timeout=TIMEOUT_S) as http:
        error = assert_error(http.post("/v1/completions", json=completion(
            prompt=["Hi"] * 300, n=128)), 400, param="n")
        assert "max_choices_per_request" in error["message"]
        error = assert_error(http.post("/v1/completions", json=completion(
            prompt=["Hi"] * 1025)), 400, param="prompt")
        assert "1025" in error["message"]
    assert_serves(tiny_server)
