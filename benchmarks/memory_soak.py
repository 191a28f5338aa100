"""Resident memory of a running server before and after many mixed requests, read from its own
`process_resident_memory_bytes` (+ `xyserve:engine_process_resident_memory_bytes`, its engine
process's) on /metrics (HTTP only, like every benchmark).

    make serve &                                    # or any `xyserve serve`
    .venv/bin/python -m benchmarks.memory_soak --requests 10000 --big-bodies 20

Phases: a warm-up (--warmup mixed calls: batch shapes, caches), the measured mixed calls
(completions and chat, half streaming, a third of the streams hung up after a few events, a tenth
bad input; 1-16 tokens each), then --big-bodies bodies of ~4 MiB (1.35 M token ids each, refused
as longer than the context after they are parsed and validated: the worst garbage a client can
leave), then --settle-s of idle (the server's memory watcher looks every 5 s). Prints the
resident set after each phase; --json writes them. Nothing is checked here: the soak test
(tests/server/test_soak.py) asserts the bound on the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import httpx

PROMPTS = ["Hello", "The capital of France is", "Once upon a time", "1, 2, 3,", "Why is the sky",
           "def fib(n):", "Dear Sir or Madam", "a b c d e f g"]
BAD_BODIES: list[dict[str, Any]] = [{"prompt": [1, 10**9]}, {"prompt": "x", "n": 0},
                                    {"prompt": "x", "temperature": -1}, {"messages": []}]
BAD_SHARE = 0.1  # of the mixed calls
STREAM_SHARE = 0.5  # of the good ones
HANG_UP_SHARE = 1 / 3  # of the streaming ones
BIG_BODY_TOKEN_IDS = 1_350_000  # ~4 MiB as compact JSON: the default --max-request-bytes
MiB = 1 << 20


async def resident_mib(client: httpx.AsyncClient) -> float:
    """The front end's resident set plus the engine process's, where it has one."""
    total = None
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(("process_resident_memory_bytes ",
                            "xyserve:engine_process_resident_memory_bytes ")):
            total = (total or 0.0) + float(line.split()[1]) / MiB
    if total is None:
        raise SystemExit("the server exports no process_resident_memory_bytes")
    return total


async def mixed_call(client: httpx.AsyncClient, model: str, seed: int, tally: Counter[str]
                     ) -> None:
    rng = random.Random(seed)
    if rng.random() < BAD_SHARE:
        body = rng.choice(BAD_BODIES)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        response = await client.post(path, json={"model": model, **body})
        tally["4xx" if 400 <= response.status_code < 500 else f"bad->{response.status_code}"] += 1
        return
    stream = rng.random() < STREAM_SHARE
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 16), "stream": stream,
                            "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": seed}
    if rng.random() < 0.3:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user",
                                                           "content": rng.choice(PROMPTS)}]
    else:
        path, body["prompt"] = "/v1/completions", rng.choice(PROMPTS)
    if not stream:
        response = await client.post(path, json=body)
        tally["ok" if response.status_code == 200 else f"{response.status_code}"] += 1
        return
    hang_up_after = rng.randint(1, 4) if rng.random() < HANG_UP_SHARE else None
    async with client.stream("POST", path, json=body) as response:
        events = 0
        async for line in response.aiter_lines():
            events += line.startswith("data: ")
            if hang_up_after is not None and events >= hang_up_after:
                tally["hung_up"] += 1
                return
    tally["stream_ok" if response.status_code == 200 else f"{response.status_code}"] += 1


async def run_mixed(client: httpx.AsyncClient, model: str, seeds: range, concurrency: int,
                    tally: Counter[str]) -> None:
    pending = iter(seeds)

    async def worker() -> None:
        for seed in pending:
            try:
                await mixed_call(client, model, seed, tally)
            except httpx.HTTPError as exc:
                tally[type(exc).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def send_big_bodies(client: httpx.AsyncClient, model: str, count: int,
                          concurrency: int, tally: Counter[str]) -> None:
    rng = random.Random(0)
    ids = ",".join(str(rng.randrange(100)) for _ in range(BIG_BODY_TOKEN_IDS))
    content = f'{{"model":"{model}","prompt":[{ids}],"max_tokens":1}}'.encode()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            response = await client.post("/v1/completions", content=content,
                                         headers={"content-type": "application/json"})
            tally[f"big->{response.status_code}"] += 1

    await asyncio.gather(*(one() for _ in range(count)))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=300, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        resident = {"start": await resident_mib(client)}
        tally: Counter[str] = Counter()
        start = time.monotonic()
        await run_mixed(client, model, range(args.warmup), args.concurrency, tally)
        resident["after_warmup"] = await resident_mib(client)
        await run_mixed(client, model, range(args.warmup, args.warmup + args.requests),
                        args.concurrency, tally)
        mixed_s = time.monotonic() - start
        resident["after_mixed"] = await resident_mib(client)
        await send_big_bodies(client, model, args.big_bodies, 2, tally)
        resident["after_big_bodies"] = await resident_mib(client)
        await asyncio.sleep(args.settle_s)
        resident["settled"] = await resident_mib(client)
    return {"model": model, "requests": args.requests, "warmup": args.warmup,
            "big_bodies": args.big_bodies, "mixed_s": round(mixed_s, 1),
            "outcomes": dict(tally), "resident_mib": {k: round(v) for k, v in resident.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--requests", type=int, default=10_000, help="measured mixed calls")
    parser.add_argument("--warmup", type=int, default=200, help="mixed calls before measuring")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--big-bodies", type=int, default=20, help="~4 MiB bodies at the end")
    parser.add_argument("--settle-s", type=float, default=12.0,
                        help="idle wall seconds before the last reading")
    parser.add_argument("--json", help="also write the result to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    result = asyncio.run(main(options))
    text = json.dumps(result, indent=1)
    print(text)
    if options.json:
        with open(options.json, "w") as f:
            f.write(text + "\n")
    sys.exit(0)
