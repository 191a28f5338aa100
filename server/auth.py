"""API-key authentication: `Authorization: Bearer <key>`, compared in constant time.

A pure ASGI middleware in front of every route: with a key configured, every path but the open
ones (/health and /metrics: monitoring must keep working without the key) needs it, the OpenAPI
schema and docs pages included, and so does a path that does not exist (401, not 404: no probing
for routes without the key). With no key configured, everything is open. The key is never echoed in
a response, and `redact_in_logs` keeps it out of the log even when a client sends it in a URL.
"""

from __future__ import annotations

import hmac
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import AuthenticationError

OPEN_PATHS = frozenset({"/health", "/metrics"})


class APIKeyMiddleware:
    """Answer 401 (OpenAI-shaped) to HTTP requests without the configured bearer key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = AuthenticationError("missing or incorrect API key; send the header "
                                    "`Authorization: Bearer <key>`",
                                    headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._expected)


class _RedactFilter(logging.Filter):
    """Replaces a secret by *** in log records (in the message and in its arguments, keeping
    their shape: uvicorn's access formatter unpacks them)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and self.secret in record.msg:
            record.msg = record.msg.replace(self.secret, "***")
        if isinstance(record.args, tuple):
            record.args = tuple(a.replace(self.secret, "***")
                                if isinstance(a, str) and self.secret in a else a
                                for a in record.args)
        return True


def redact_in_logs(secret: str, logger_names: tuple[str, ...] = ("", "uvicorn", "uvicorn.error",
                                                                    "uvicorn.access")) -> None:
    """Keep `secret` out of every log line, even one quoting a client that put the key in a URL:
    a filter on each handler of these loggers (call once logging is configured)."""
    redact = _RedactFilter(secret)
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(redact)
