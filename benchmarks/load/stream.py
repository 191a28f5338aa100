"""The load client's transport: one HTTP/1.1 POST on a connection of its own, its response body
handed over as it arrives.

The client shares the machine with the server it measures, so every microsecond of its CPU a
streamed token is one the server's kernels lose. Here the response is parsed by httptools
(llhttp, the C parser uvicorn serves with) inside the event loop's data callback, and each piece
of body goes straight to the caller's callback there: no stream reader, future or task wake-up
per token. aiohttp, reading each event whole, took ~30-37 us of CPU a streamed token; this ~20
(decode-heavy, 16 streams, uvloop, the 2-core dev machine).

    end = await post_stream(url, body, headers, on_body, timeout_s)
    on_body(piece) -> True once the caller has read all it wants (the connection is then closed)

A connection per request (`Connection: close`): llama.cpp's server closes a kept-alive
connection after a few requests, and a request that found it closed failed.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

MAX_ERROR_BODY_BYTES = 64 * 1024  # of a non-200 response's body, kept for its error message


@dataclass(frozen=True)
class StreamEnd:
    """How a post_stream ended."""

    status: int  # the response's HTTP status; 0 when none arrived
    error: str  # what went wrong with the connection or the response's framing; "" if nothing
    error_body: str  # a non-200 response's body (its first MAX_ERROR_BODY_BYTES), else ""


async def post_stream(url: str, body: bytes, headers: Mapping[str, str],
                      on_body: Callable[[bytes], bool], timeout_s: float) -> StreamEnd:
    """POST `body` to `url` (http or https), handing a 200 response's body to `on_body` piece by
    piece as it arrives. `timeout_s` bounds the connect and every wait for more bytes. Raises
    OSError (refused, unreachable, TLS) and asyncio.TimeoutError (connect) and ValueError (not
    an http(s) URL); what goes wrong after the connection is open is in StreamEnd.error."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = {"Host": f"{host}:{port}", "Content-Type": "application/json",
            "Content-Length": str(len(body)), "Accept": "text/event-stream",
            "Connection": "close", **headers}
    request = (f"POST {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
               + "\r\n").encode("latin-1") + body
    loop = asyncio.get_running_loop()
    exchange = _Exchange(loop, request, on_body, timeout_s)
    await asyncio.wait_for(loop.create_connection(
        lambda: exchange, parts.hostname, port,
        ssl=_tls_context() if tls else None), timeout_s)
    return await exchange.done


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # (loads the CA certificates: once, not per request)


class _Exchange(asyncio.Protocol):
    """One request and its response on one connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes,
                 on_body: Callable[[bytes], bool], timeout_s: float) -> None:
        self._loop = loop
        self._request = request
        self._on_body = on_body
        self._timeout_s = timeout_s
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._status = 0
        self._framed = False  # the body's end is marked (Content-Length or chunked), not the EOF
        self._error_body = bytearray()
        self._last_read = loop.time()
        self._watchdog: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[StreamEnd] = loop.create_future()

    # ------------------------------------------------------------------------ the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]
        self._watchdog = self._loop.call_later(self._timeout_s, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"the response is not HTTP/1.1 as expected: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._finish(f"{type(exc).__name__}: {exc}")
        elif self._framed or not self._status:  # the server went before the response's end
            self._finish("the server closed the connection before the response ended")
        else:  # a body that ends with the connection
            self._finish("")

    def _check_idle(self) -> None:
        idle_s = self._loop.time() - self._last_read
        if idle_s >= self._timeout_s:
            self._finish(f"TimeoutError: no bytes from the server for {self._timeout_s:g} s")
        else:
            self._watchdog = self._loop.call_later(self._timeout_s - idle_s, self._check_idle)

    def _finish(self, error: str) -> None:
        if not self.done.done():
            self.done.set_result(StreamEnd(self._status, error, self._error_body.decode(
                "utf-8", errors="replace") if self._status != 200 else ""))
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._transport is not None:
            self._transport.close()

    # ------------------------------------------------------------------ the parser's callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.done.done():
            return
        if self._status != 200:
            self._error_body += body[:MAX_ERROR_BODY_BYTES - len(self._error_body)]
        elif self._on_body(body):
            self._finish("")

    def on_message_complete(self) -> None:
        self._finish("")
