"""The HTTP connections themselves: where the server listens, how long a request may take to
arrive, how many connections may be open.

Uvicorn closes idle keep-alive connections and nothing else: a client that sends its headers a
byte every few seconds, a chunked body without its last chunk, or fewer bytes than its
Content-Length holds a socket (and a file descriptor) for as long as it likes. GuardedH11Protocol
is uvicorn's h11 protocol with:

    header deadline  from a connection's opening, or from the first byte of the next request on
                     a kept-alive one, to the end of the request's headers (`header_timeout_s`)
    body deadline    from the end of the headers to the end of the body (`body_timeout_s`)
    on expiry        a 408 in OpenAI's error shape where a response is still possible (bytes of
                     the request arrived, no response started), then the connection is closed;
                     an app still reading the body sees http.disconnect
    max_connections  one connection more is answered 503 (Retry-After) and closed at once,
                     before it can hold anything

The deadlines follow h11's view of the peer (`their_state`): IDLE = headers pending, SEND_BODY
= body pending, anything else = the request has arrived (no deadline while the app works).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import APIError, RequestTimeoutError, ServiceUnavailableError

logger = logging.getLogger("xyserve")

LINGER_S = 1.0  # a connection answered 408 / 503 is closed this long after the answer, what the
#   client still sends being dropped meanwhile: closing at once, with its bytes unread, would
#   reset the connection, and the client could lose the answer

Phase = Literal["headers", "body"]


@dataclass(frozen=True)
class ConnectionLimits:
    """What GuardedH11Protocol enforces (ServerConfig's fields of the same names)."""

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


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), enforcing `limits`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with request deadlines and a connection limit (module docstring)."""

    limits: ConnectionLimits  # set on the subclass guarded_protocol() makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: Phase | None = None  # what the armed deadline waits for
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False  # answered (408 / 503) and closing: input is dropped

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
        if self._phase is None and self.conn.their_state is h11.IDLE:
            self._arm("headers")  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        self._follow()

    def eof_received(self) -> bool | None:
        if self._lingering:
            self.transport.close()
        return super().eof_received()  # type: ignore[func-returns-value]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---------------------------------------------------------------------------- deadlines

    def _follow(self) -> None:
        """Move the deadline along with the request: headers -> body -> none."""
        if self._lingering or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif state is h11.IDLE:
            # Between requests: the next one's clock starts with its first byte (pipelined bytes
            # may already be here); until then uvicorn's keep-alive timeout applies.
            if self._phase != "headers" and self.conn.trailing_data[0]:
                self._arm("headers")
            elif self._phase == "body":
                self._disarm()
        else:  # DONE, MUST_CLOSE, CLOSED, ERROR: the request has arrived, or the end has come
            self._disarm()

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
            can_respond = bool(self.conn.trailing_data[0])  # a silent connection gets no 408
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
        self.transport.write(_raw_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then sees the end
        self.loop.call_later(LINGER_S, self.transport.close)


def _raw_response(error: APIError) -> bytes:
    """`error` as a complete HTTP/1.1 response that closes the connection (written to the
    transport directly: h11 cannot answer a request it has not fully seen)."""
    body = error.response().body
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(error.status_code, "Error")
    headers = {"content-type": "application/json", "content-length": str(len(body)),
               "connection": "close", **error.headers}
    head = f"HTTP/1.1 {error.status_code} {reason}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + bytes(body)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
