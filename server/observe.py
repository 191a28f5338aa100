"""Observability at the HTTP edge: each request's id and the HTTP series.

`ObserveMiddleware` (outermost, so it sees every status: 401, 413 and 429 included) takes the
client's `X-Request-Id` (or makes one), holds it in a context variable for the request's whole
handling (server.logs puts it on every log line written meanwhile, uvicorn's access line
included; responses' `id` fields are built on it) and returns it as a response header; when the
response ends it records the request in `http_requests_total{handler, method, status}` and
`http_request_duration_seconds` under the route's path template (bounded labels).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from contextvars import ContextVar

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import ServerMetrics

REQUEST_ID_HEADER = b"x-request-id"
# Taken as given when it is short and printable without spaces (it goes into log lines and
# response ids); anything else is replaced by a fresh id.
_GOOD_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
UNMATCHED_HANDLER = "none"  # prometheus-fastapi-instrumentator's label for unknown paths
UNRECORDED_PATHS = frozenset({"/metrics"})  # scrapes would drown the rest

request_id_var: ContextVar[str | None] = ContextVar("xyserve_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being handled in this context (None outside one)."""
    return request_id_var.get()


class ObserveMiddleware:
    """Request ids and HTTP metrics; see the module docstring."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Sequence[BaseRoute]) -> None:
        """routes: the app's API routes, to name the handler of a request refused before the
        router saw it (401, 413); the router names the others (scope["route"])."""
        self.app = app
        self.metrics = metrics
        self.routes = routes
        metrics.declare_http_handlers(
            (str(route.path), method) for route in routes  # type: ignore[attr-defined]
            if str(getattr(route, "path", "")) not in UNRECORDED_PATHS
            for method in sorted(getattr(route, "methods", None) or ()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = request_id_var.set(request_id)
        start_s = time.perf_counter()
        status = 500  # an exception before the response started is a 500 (Starlette sends it)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            if scope["path"] not in UNRECORDED_PATHS:
                self.metrics.record_http(self._handler(scope), scope["method"], status,
                                         time.perf_counter() - start_s)

    def _handler(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", UNMATCHED_HANDLER))
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED_HANDLER))
        return UNMATCHED_HANDLER


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _GOOD_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def response_id(prefix: str) -> str:
    """`<prefix>-<request id>`: the `id` of a completion, as vLLM builds it."""
    return f"{prefix}-{current_request_id() or uuid.uuid4().hex}"
