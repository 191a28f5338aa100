"""A stream read slower than it is written: back-pressure, not unbounded memory.

The client stops reading for a while, then reads slowly, while the engine generates at full speed.
The server's socket buffer is kept small (SO_SNDBUF on the listener), so the response stops
draining and uvicorn's `send` blocks; from there the request's pending output must stay bounded:
each engine mailbox holds at most one delta, later deltas are merged into it, and the client still
gets every token, in order, the same text as without the stall, in fewer (merged) chunks.
The app runs in-process (uvicorn on a thread) so the test can watch the engine's mailboxes.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from engine.async_engine import AsyncEngine
from server.app import build_app
from server.config import ServerConfig
from tests.server.harness import MakeCore
from tests.server.inprocess import serve_in_thread

N = 4
MAX_TOKENS = 300
# Greedy, with 20 alternatives a token: ~1.5 KB a chunk, ~2 MB in all, far beyond the buffers.
BODY = {"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "n": N, "temperature": 0,
        "ignore_eos": True, "logprobs": 20}
STALL_S = 1.5  # the client reads nothing this long: the engine finishes meanwhile
READ_BYTES = 16384  # then reads this much at a time...
READ_PAUSE_S = 0.001  # ...with a pause in between
SOCKET_BUFFER_BYTES = 32768  # SO_SNDBUF of the server, SO_RCVBUF of the client (the kernel
#   doubles them): ~130 KB in the sockets plus uvicorn's 64 KB write buffer, < 1/5 of the stream


def test_slow_reader_gets_every_token_with_bounded_buffers(make_core: MakeCore) -> None:
    engine = AsyncEngine(make_core())
    app = build_app(engine, ServerConfig())
    max_depth = 0  # the most items any mailbox held, sampled while the stream runs
    max_open = 0
    sampling = True

    def sample_mailboxes() -> None:
        nonlocal max_depth, max_open
        while sampling:
            boxes = list(engine._mailboxes.values())
            max_open = max(max_open, len(boxes))
            max_depth = max([max_depth, *(b.depth for b in boxes)])
            time.sleep(0.001)

    with serve_in_thread(app, send_buffer_bytes=SOCKET_BUFFER_BYTES) as url:
        expected = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()
        sampler = threading.Thread(target=sample_mailboxes)
        sampler.start()
        merged_before = 0
        raw = bytearray()
        try:
            transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                             SOCKET_BUFFER_BYTES)])
            with (httpx.Client(transport=transport, timeout=60) as client,
                  client.stream("POST", f"{url}/v1/completions",
                                json={**BODY, "stream": True}) as response):
                assert response.status_code == 200
                chunks = response.iter_raw(READ_BYTES)
                raw += next(chunks)
                time.sleep(STALL_S)
                merged_before = sum(b.num_merged for b in engine._mailboxes.values())
                for piece in chunks:
                    raw += piece
                    time.sleep(READ_PAUSE_S)
        finally:
            sampling = False
            sampler.join()

    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks_json = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks_json)
    texts = [""] * N
    num_tokens = [0] * N
    finish = [None] * N
    for chunk in chunks_json:
        for choice in chunk["choices"]:
            i = choice["index"]
            texts[i] += choice["text"]
            num_tokens[i] += len(choice["logprobs"]["tokens"])
            finish[i] = choice["finish_reason"] or finish[i]
    # Every token arrived, in order: the same text as the unstalled request, all its logprobs.
    assert texts == [c["text"] for c in expected["choices"]]
    assert num_tokens == [MAX_TOKENS] * N
    assert finish == ["length"] * N
    # The stall was absorbed by merging deltas, not by queueing them: fewer chunks than tokens,
    # never more than one delta (plus a terminal error) pending in a mailbox.
    assert merged_before > 0
    assert len(chunks_json) < N * MAX_TOKENS
    assert max_depth <= 2
    assert max_open <= N
    print(f"\n{len(chunks_json)} chunks for {N * MAX_TOKENS} tokens; {merged_before} deltas "
          f"merged while stalled; deepest mailbox {max_depth}")
