"""The event loop stays responsive while big bodies are parsed, validated and detokenized: /health
answers promptly while 4 MiB bodies of 1.35 M token ids go to /v1/completions and /detokenize
at once
(their parsing, validation and decoding run on worker threads, in slices that let the loop in).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import statistics
import time

import httpx

from tests.server.harness import TINY_NAME, ServerProcess

NUM_TOKEN_IDS = 1_350_000
MAX_REQUEST_BYTES = 4 << 20  # the default --max-request-bytes
HEALTH_MAX_S = 0.25  # the slowest /health answer while the bodies are handled (was ~1 s)
PROBE_INTERVAL_S = 0.01


def big_bodies(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    rng = random.Random(0)
    ids = [rng.randrange(100) for _ in range(NUM_TOKEN_IDS)]  # short ids: the most per MiB
    compact = {"separators": (",", ":")}
    bodies = {
        "/v1/completions": json.dumps({"model": TINY_NAME, "prompt": ids, "max_tokens": 1},
                                      **compact),  # type: ignore[arg-type]
        "/detokenize": json.dumps({"tokens": ids}, **compact),  # type: ignore[arg-type]
    }
    paths = {}
    for route, body in bodies.items():
        assert len(body) <= MAX_REQUEST_BYTES
        paths[route] = directory / f"{route.strip('/').replace('/', '-')}.json"
        paths[route].write_text(body)
    return paths


def test_health_stays_fast_while_big_token_id_bodies_are_handled(
        tiny_server: ServerProcess, tmp_path: pathlib.Path) -> None:
    """The bodies go from curl processes, so that only the server's loop is measured (not this
    process's, which would parse the 9 MB answers)."""
    bodies = big_bodies(tmp_path)

    async def send(route: str) -> tuple[int, bytes]:
        out = tmp_path / f"out-{random.random()}"
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-o", str(out), "-w", "%{http_code}", "-H",
            "content-type: application/json", "--data-binary", f"@{bodies[route]}",
            f"{tiny_server.url}{route}", stdout=asyncio.subprocess.PIPE)
        status, _ = await curl.communicate()
        return int(status), out.read_bytes()

    async def probe(http: httpx.AsyncClient, busy: asyncio.Future[list[tuple[int, bytes]]]
                    ) -> list[float]:
        latencies = []
        while not busy.done():
            start = time.perf_counter()
            response = await http.get("/health")
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200
            await asyncio.sleep(PROBE_INTERVAL_S)
        return latencies

    async def main() -> tuple[list[tuple[int, bytes]], list[float], float]:
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120) as prober:
            await prober.get("/health")  # connected before the bodies go
            start = time.perf_counter()
            busy = asyncio.ensure_future(asyncio.gather(send("/v1/completions"),
                                                        send("/detokenize")))
            latencies = await probe(prober, busy)
            return await busy, latencies, time.perf_counter() - start

    responses, latencies, elapsed = asyncio.run(main())
    assert [status for status, _ in responses] == [400, 200], responses
    # Far longer than max_model_len (512): refused, by the engine's length check.
    assert json.loads(responses[0][1])["error"]["param"] == "prompt"
    assert len(json.loads(responses[1][1])["prompt"]) > NUM_TOKEN_IDS
    assert len(latencies) >= 10, "the bodies were handled before the probes could measure"
    print(f"\n/health during 2 x {NUM_TOKEN_IDS} token ids ({elapsed:.2f} s): {len(latencies)} "
          f"probes, median {statistics.median(latencies) * 1e3:.1f} ms, max "
          f"{max(latencies) * 1e3:.1f} ms")
    assert max(latencies) < HEALTH_MAX_S, sorted(latencies)[-5:]
