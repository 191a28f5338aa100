"""The HTTP connections themselves: where the server listens, how long a request may take to
arrive, how large its head may be, how many connections may be open.

Uvicorn closes idle keep-alive connections and nothing else: a client that sends its headers a
byte every few seconds, a chunked body without its last chunk, or fewer bytes than its
Content-Length holds a socket (and a file descriptor) for as long as it likes; and its httptools
protocol takes headers of any size. GuardedHttpToolsProtocol is uvicorn's httptools protocol
(llhttp, a C parser: its h11 protocol, pure Python, took ~10 us more of the event loop's CPU a
streamed token, ~15%) with:

    header deadline  from a connection's opening, or from the first byte of the next request on
                     a kept-alive one, to the end of the request's headers (`header_timeout_s`)
    body deadline    from the end of the headers to the end of the body (`body_timeout_s`)
    on expiry        a 408 in OpenAI's error shape where a response is still possible (bytes of
                     the request arrived, no response started), then the connection is closed;
                     an app still reading the body sees http.disconnect
    head size        a request line and headers of more than MAX_HEAD_BYTES are answered 431 and
                     the connection closed, before the app sees the request (what uvicorn's h11
                     protocol refused with a 400)
    max_connections  one connection more is answered 503 (Retry-After) and closed at once,
                     before it can hold anything

The deadlines follow the parser's callbacks: a message's first byte (on_message_begin) starts the
header clock of a kept-alive connection's next request, the end of its headers starts the body
clock, the end of the message stops it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import APIError, RequestTimeoutError, ServiceUnavailableError

logger = logging.getLogger("xyserve")

LINGER_S = 1.0  # a connection answered 408 / 431 / 503 is closed this long after the answer,
#   what the client still sends being dropped meanwhile: closing at once, with its bytes unread,
#   would reset the connection, and the client could lose the answer
MAX_HEAD_BYTES = 16 * 1024  # request target + header names and values, at most (h11's limit,
#   which uvicorn's h11 protocol applied)

Phase = Literal["headers", "body"]


class HeadersTooLargeError(APIError):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


@dataclass(frozen=True)
class ConnectionLimits:
    """What GuardedHttpToolsProtocol enforces (ServerConfig's fields of the same names)."""

    header_timeout_s: float  # end of headers at most this long after the request's first byte
    body_timeout_s: float  # end of body at most this long after the end of the headers
    max_connections: int  # open connections at most
    retry_after_s: int  # Retry-After of the 503 to a connection over the limit


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening (uvicorn listens once the app has
    started). Binding before the model loads makes a taken port fail at once. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), enforcing `limits`."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with request deadlines, a head size limit and a connection
    limit (module docstring)."""

    limits: ConnectionLimits  # set on the subclass guarded_protocol() makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: Phase | None = None  # what the armed deadline waits for
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False  # answered (408 / 431 / 503) and closing: input is dropped
        self._begun = False  # the parser has seen the first byte of the current request
        self._head_bytes = 0  # its target and headers so far
        self._awaiting_head = True  # no request's head is complete since the last request ended
        self._bytes_awaiting_head = 0  # bytes received meanwhile (llhttp holds a header it has
        #   not seen the end of: this bounds what a never-ending one can take)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            logger.warning("refusing a connection from %s: %d connections are open "
                           "(max_connections)", _peer(self.client), self.limits.max_connections)
            self._answer_and_close(ServiceUnavailableError(
                f"the server has {self.limits.max_connections} connections open "
                "(max_connections); retry later", code="too_many_connections",
                headers={"Retry-After": str(self.limits.retry_after_s)}))
            return
        self._arm("headers")  # a connection that never sends a byte is closed too

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered: nothing the client says matters any more
        if self._awaiting_head:
            self._bytes_awaiting_head += len(data)
        super().data_received(data)
        over = self._refused() or (self._awaiting_head
                                   and self._bytes_awaiting_head > MAX_HEAD_BYTES)
        if over and not self._lingering:
            logger.info("closing the connection of %s: a request head of more than %d bytes",
                        _peer(self.client), MAX_HEAD_BYTES)
            self._answer_and_close(HeadersTooLargeError(
                f"the request's target and headers exceed {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ------------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun, self._head_bytes = True, 0
        if self._phase is None:  # the next request on a kept-alive connection: its clock starts
            self._arm("headers")  # (the first request's started with the connection)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused():
            return  # answered once the parser returns (data_received): the app never sees it
        self._awaiting_head, self._bytes_awaiting_head = False, 0
        super().on_headers_complete()
        self._arm("body")  # a request without a body completes at once (on_message_complete)

    def on_body(self, body: bytes) -> None:
        if not self._refused():
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._begun, self._awaiting_head = False, True
        if not self._refused():
            super().on_message_complete()

    def _refused(self) -> bool:
        """The current request's target and headers are over the limit (it gets a 431 once
        the parser returns, its cycle never starts)."""
        return self._head_bytes > MAX_HEAD_BYTES

    # ---------------------------------------------------------------------------- deadlines

    def _arm(self, phase: Phase) -> None:
        self._disarm()
        timeout_s = (self.limits.header_timeout_s if phase == "headers"
                     else self.limits.body_timeout_s)
        self._phase = phase
        self._deadline = self.loop.call_later(timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._phase = None

    def _expired(self) -> None:
        phase, self._phase, self._deadline = self._phase, None, None
        if self._lingering or self.transport.is_closing():
            return
        if phase == "headers":
            can_respond = self._begun  # a silent connection gets no 408
            timeout_s, option = self.limits.header_timeout_s, "header_timeout_s"
        else:
            can_respond = self.cycle is not None and not self.cycle.response_started
            timeout_s, option = self.limits.body_timeout_s, "body_timeout_s"
        logger.info("closing the connection of %s: the request's %s did not arrive within "
                    "%g s", _peer(self.client), phase, timeout_s)
        if can_respond:
            self._answer_and_close(RequestTimeoutError(
                f"the request's {phase} did not arrive within {timeout_s:g} s ({option})"))
        else:
            self.transport.close()
        # Either way an app still reading the body receives http.disconnect once it is closed.

    def _answer_and_close(self, error: APIError) -> None:
        """Send `error` as the whole response, then close (after LINGER_S at the latest)."""
        self._lingering = True
        self._disarm()
        self.transport.write(_raw_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then sees the end
        self.loop.call_later(LINGER_S, self.transport.close)


def _raw_response(error: APIError) -> bytes:
    """`error` as a complete HTTP/1.1 response that closes the connection (written to the
    transport directly: it answers a request the app has not seen, or not fully)."""
    body = error.response().body
    reason = {408: "Request Timeout", 431: "Request Header Fields Too Large",
              503: "Service Unavailable"}.get(error.status_code, "Error")
    headers = {"content-type": "application/json", "content-length": str(len(body)),
               "connection": "close", **error.headers}
    head = f"HTTP/1.1 {error.status_code} {reason}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + bytes(body)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
