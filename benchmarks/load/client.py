"""The load generator: streaming /v1/completions or /v1/chat/completions requests, on a
schedule.

Arrivals: at `request_rate` requests per second with gamma-distributed gaps (shape =
`burstiness`; 1 is a Poisson process, lower is burstier, higher more regular), or all at once
(rate inf); `max_concurrency` caps the requests in flight (a closed loop when the rate is inf).
Each request streams with `stream_options.include_usage`, so token counts come from the
server's own usage; times are taken when each chunk arrives.

The client shares the machine with the server it measures, so it should take as little CPU as
it can: a connection per request parsed by httptools in the event loop's data callback
(benchmarks.load.stream), each SSE event handled there (EventReader), on uvloop (`run`): ~20 us
of CPU a streamed token, where aiohttp (vLLM's serving benchmark's client) reading each event
whole took ~30-37, on asyncio's own loop reading line by line ~47, and httpx ~170 (decode-heavy,
16 streams, on the 2-core dev machine), CPU the server's kernels otherwise lose.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmarks.load.datasets import BenchRequest
from benchmarks.load.stream import post_stream

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed (the server's dependency; not on Windows):
    its C event loop takes ~a quarter less of the client's CPU a streamed token."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


@dataclass
class RequestResult:
    """What one benchmark request saw, in wall seconds from when it was sent."""

    prompt_len: int  # prompt tokens (the server's usage; the client's count without one)
    output_len: int = 0  # generated tokens (the server's usage; chunks counted without one)
    success: bool = False
    error: str = ""
    ttft_s: float = 0.0  # sent -> first chunk with text
    e2e_s: float = 0.0  # sent -> stream closed
    itls_s: list[float] = field(default_factory=list)  # gaps between chunks with text
    start_s: float = 0.0  # when it was sent, from the start of the run
    text: str = ""  # the generated text
    usage_reported: bool = False  # the server sent usage

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first (0 for a single token)."""
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else 0.0


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # http://host:port (without /v1)
    model: str  # the model name to send
    endpoint: str = "/v1/completions"  # one of datasets.ENDPOINTS (chat: sends messages)
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM / xyserve extension; other servers may reject it
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    timeout_s: float = 600.0


async def arrivals(num: int, request_rate: float, burstiness: float,
                   seed: int) -> AsyncIterator[int]:
    """Yield 0 .. num-1 at the arrival times of the schedule."""
    rng = random.Random(seed)
    for i in range(num):
        yield i
        if request_rate != float("inf") and i + 1 < num:
            # gamma(shape k, scale theta) with mean k * theta = 1 / rate
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness)))


async def send(config: ClientConfig, request: BenchRequest, t0: float) -> RequestResult:
    """Send one streaming completion; never raises (errors land in the result)."""
    chat = config.endpoint == "/v1/chat/completions"
    body: dict[str, Any] = {"model": config.model, "max_tokens": request.output_len,
                            "temperature": config.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    body.update(config.extra_body)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    result = RequestResult(prompt_len=request.prompt_len)
    start = time.perf_counter()
    result.start_s = start - t0
    reader = EventReader(chat, start, result)
    try:
        end = await post_stream(config.base_url + config.endpoint, json.dumps(body).encode(),
                                headers, reader.feed, config.timeout_s)
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:500]
        return result
    if end.status and end.status != 200:
        result.error = f"HTTP {end.status}: {end.error_body[:500]}"
    elif end.error and not result.error:
        result.error = end.error[:500]
    if result.error:
        return result
    result.e2e_s = time.perf_counter() - start
    result.text = "".join(reader.pieces)
    if not result.usage_reported:
        result.output_len = len(reader.pieces)
    result.success = result.output_len > 0
    if not result.success:
        result.error = "no tokens generated"
    return result


class EventReader:
    """A 200 response's SSE events, fed as its body arrives, into `result` (the chunks' times,
    the usage, an error event's message) and `pieces` (the chunks' texts), up to [DONE]. Each
    feed splits the events itself, keeping an event cut short for the next."""

    def __init__(self, chat: bool, start: float, result: RequestResult) -> None:
        self.pieces: list[str] = []  # the texts of the chunks that had some
        self._chat = chat
        self._result = result
        self._start = self._last = start
        self._pending = b""  # an event's beginning, its end not yet arrived

    def feed(self, data: bytes) -> bool:
        """Read the events `data` completes; True once the stream is over ([DONE], an error
        event, or a chunk that is not JSON)."""
        events = (self._pending + data).split(b"\n\n") if self._pending else data.split(b"\n\n")
        self._pending = events.pop()  # after the last separator: b"", or an event cut short
        now = time.perf_counter()  # (every event of the piece arrived now)
        result = self._result
        # (an event may carry fields other than data: skipped)
        for payload in [line[5:].strip() for event in events for line in event.split(b"\n")
                        if line.startswith(b"data:")]:
            if payload == b"[DONE]":
                return True
            try:
                chunk = json.loads(payload)
            except ValueError as exc:
                result.error = f"a chunk that is not JSON: {exc}"[:500]
                return True
            if "error" in chunk:
                result.error = str(chunk["error"])[:500]
                return True
            text = "".join([_chunk_text(c, self._chat) for c in chunk.get("choices") or ()])
            if text:
                if not self.pieces:
                    result.ttft_s = now - self._start
                else:
                    result.itls_s.append(now - self._last)
                self._last = now
                self.pieces.append(text)
            usage = chunk.get("usage")
            if usage:
                result.usage_reported = True
                result.prompt_len = int(usage.get("prompt_tokens", result.prompt_len))
                result.output_len = int(usage.get("completion_tokens", 0))
        return False


def _chunk_text(choice: dict[str, Any], chat: bool) -> str:
    if chat:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


async def run_requests(config: ClientConfig, requests: list[BenchRequest], request_rate: float,
                       burstiness: float, max_concurrency: int | None, seed: int,
                       on_done: Callable[[RequestResult], None] | None = None,
                       ) -> tuple[list[RequestResult], float]:
    """Run `requests` on the schedule; returns the results (in request order) and the run's
    duration (first send to last completion)."""
    semaphore = asyncio.Semaphore(max_concurrency or len(requests) or 1)  # (None: all at once)
    results: list[RequestResult | None] = [None] * len(requests)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        async with semaphore:
            results[i] = await send(config, requests[i], t0)
        if on_done is not None:
            on_done(results[i])  # type: ignore[arg-type]

    tasks = []
    async for i in arrivals(len(requests), request_rate, burstiness, seed):
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    return [r for r in results if r is not None], duration
