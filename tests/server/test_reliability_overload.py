"""Overload: once --max-waiting-requests are queued, new requests get 429 with Retry-After at once
(the refusal latency is measured while the accepted requests stream), and every accepted request
still finishes with all its tokens.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.server.harness import TINY_ENGINE_ARGS, TINY_NAME, ServerProcess, run_server
from tests.server.test_disconnect import wait_until_idle

MAX_WAITING = 4
PROBERS = 8  # concurrent clients, each sending one request after another
DURATION_S = 3.0
MAX_TOKENS = 64
BODY = {"model": TINY_NAME, "prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "stream": True}
REFUSAL_P99_BOUND_S = 0.25


@pytest.fixture(scope="module")
def server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS, "--max-num-seqs", "2",
                    "--max-waiting-requests", str(MAX_WAITING), served_name=TINY_NAME) as server:
        yield server


@dataclass
class Results:
    refusal_latencies_s: list[float] = field(default_factory=list)
    accepted: int = 0
    completed: int = 0  # accepted and streamed to the end with all their tokens
    failures: list[str] = field(default_factory=list)


async def prober(client: httpx.AsyncClient, deadline: float, results: Results) -> None:
    while time.monotonic() < deadline:
        start = time.monotonic()
        async with client.stream("POST", "/v1/completions", json=BODY) as response:
            if response.status_code == 429:
                results.refusal_latencies_s.append(time.monotonic() - start)
                body = json.loads(await response.aread())
                if (not response.headers.get("retry-after", "").isdigit()
                        or body["error"]["type"] != "rate_limit_error"):
                    results.failures.append(f"429 without Retry-After: {response.headers}")
                await asyncio.sleep(0.02)  # a client backing off (and less client CPU)
                continue
            if response.status_code != 200:
                results.failures.append(f"{response.status_code}: {await response.aread()!r}")
                continue
            results.accepted += 1
            tokens, finish = 0, None
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    tokens += bool(choice["text"])
                    finish = choice["finish_reason"] or finish
            if finish == "length" and tokens >= MAX_TOKENS // 2:  # merged deltas: fewer chunks
                results.completed += 1
            else:
                results.failures.append(f"accepted request ended with {finish}, {tokens} chunks")


async def overload(url: str) -> Results:
    results = Results()
    deadline = time.monotonic() + DURATION_S
    limits = httpx.Limits(max_connections=PROBERS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.wait_for(
            asyncio.gather(*(prober(client, deadline, results) for _ in range(PROBERS))),
            DURATION_S + 60)
    return results


def test_overload_is_refused_at_once_and_accepted_requests_finish(server: ServerProcess) -> None:
    results = asyncio.run(overload(server.url))
    assert not results.failures, results.failures[:10]
    latencies = sorted(results.refusal_latencies_s)
    assert len(latencies) >= 50, "the server was never overloaded"
    assert results.accepted >= 2 * (2 + MAX_WAITING)
    assert results.completed == results.accepted
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\noverload: {len(latencies)} refusals (429), p50 {p50 * 1000:.1f} ms, p99 "
          f"{p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; {results.accepted} accepted, "
          f"all {results.completed} completed")
    assert p99 < REFUSAL_P99_BOUND_S
    # Every refusal is on /metrics by route and status.
    assert server.metric("http_requests_total", handler="/v1/completions",
                         status="429") == len(latencies)
    wait_until_idle(server)
