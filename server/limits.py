"""`--max-request-bytes`: request bodies over the limit are refused with 413 before parsing.

A pure ASGI middleware. A declared Content-Length over the limit is refused without reading the
body; a body without one (chunked) is counted as it arrives and refused once it passes the limit.
Either way the rest of the body is read and dropped (up to DISCARD_LIMIT_BYTES) before the 413 is
sent, so the client, which is still writing, gets the response rather than a reset connection.
A body within the limit is buffered (FastAPI reads it whole anyway) and replayed to the app.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLargeError

DISCARD_LIMIT_BYTES = 64 << 20  # the most of a refused body we read and drop before answering


class RequestSizeLimitMiddleware:
    """Refuse HTTP request bodies larger than `max_bytes` with an OpenAI-shaped 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # A client waiting for `100 Continue` never sends the body: nothing to drop.
            waiting = _header(scope, b"expect") == "100-continue"
            await self._refuse(receive, send, scope, int(declared), -1 if waiting else 0)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                more = message.get("more_body", False)
                await self._refuse(receive, send, scope, None, size if more else -1)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # http.disconnect, when the client goes away

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Receive, send: Send, scope: Scope, declared: int | None,
                      received: int) -> None:
        """Drop the rest of the body (received = bytes so far; -1 = nothing more to read), then
        answer 413."""
        while 0 <= received <= DISCARD_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        size = f" ({declared} bytes)" if declared is not None else ""
        error = PayloadTooLargeError(
            f"the request body{size} is larger than the limit of {self.max_bytes} bytes",
            param=None)
        await error.response()(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1")).strip().lower()
    return None
