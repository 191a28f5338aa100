"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, for every failure.

Handlers turn everything that escapes a route into that shape: our own `APIError`s, FastAPI's
validation errors (400, not FastAPI's 422, as OpenAI and vLLM do), the engine's QueueFullError
(429 with Retry-After), EngineDeadError and AdmissionClosedError (503: dead, or shutting down,
the latter with Retry-After), the engine's RequestRejected (400),
unknown routes (404) and, last, any other exception (500 with a generic message; the traceback
goes to the server log, never to the client). Bodies over --max-request-bytes are refused with
413 by server/limits.py before they are parsed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import AdmissionClosedError, EngineDeadError, QueueFullError
from engine.request import RequestRejected

logger = logging.getLogger("xyserve")


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body; subclasses fix status and type."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one
        self.code = code or self.default_code  # a machine-readable reason (OpenAI's codes)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # json.dumps escapes non-ASCII: a message quoting client input stays valid UTF-8 even
        # when that input held lone surrogates.
        return Response(json.dumps(self.body()), status_code=self.status_code,
                        headers=self.headers, media_type="application/json")


class BadRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class RequestTimeoutError(APIError):
    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class InternalServerError(APIError):
    status_code = 500
    error_type = "server_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "engine_unavailable"


class ClientDisconnectedError(APIError):
    """The client went away before its response; nobody reads this one (nginx's 499)."""

    status_code = 499
    error_type = "client_closed_request"


INTERNAL_ERROR_MESSAGE = "internal server error; the server log has the details"


def to_api_error(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """The APIError a client sees for `exc`; unexpected exceptions are logged here, once."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return RateLimitError(f"the server is busy: {exc}; retry later",
                              headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError(f"the engine is not running: {exc}")
    if isinstance(exc, AdmissionClosedError):  # draining: another replica (or a restart) will
        return ServiceUnavailableError(f"the server is not accepting requests: {exc}",
                                       code="shutting_down",
                                       headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, RequestRejected):
        return BadRequestError(str(exc), param=exc.param, code=exc.code)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return InternalServerError(INTERNAL_ERROR_MESSAGE)


def validation_error(errors: Sequence[Any]) -> BadRequestError:
    """A 400 naming the first field pydantic rejected (and how many others there were);
    `errors` as pydantic's ValidationError.errors() or FastAPI's RequestValidationError's."""
    errors = list(errors)
    if not errors:
        return BadRequestError("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return BadRequestError(f"the request body is not valid JSON: {detail}")
    # loc is ("body", field, index or union member, ...), e.g. body.messages.0.content.str
    # (A part can be client input, e.g. a logit_bias key: cut short.)
    loc = [_clip(str(p), 64) for p in first.get("loc", ()) if p != "body"]
    path = ".".join(loc)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if msg.startswith(f"{loc[0]} " if loc else "\0"):
        message = msg  # our own validators already name the field
    else:
        message = f"{path}: {msg}" if path else f"request body: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return BadRequestError(message, param=loc[0] if loc else None)


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + "..."


def install_exception_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Route every exception a request can raise to an OpenAI-shaped JSON response."""

    async def on_api_error(_: Request, exc: Exception) -> Response:
        return to_api_error(exc, retry_after_s).response()

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc.errors()).response()

    async def on_unexpected_error(_: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware sends this body, then re-raises `exc` so that
        # uvicorn logs it with its traceback; logging it here too would log it twice.
        return InternalServerError(INTERNAL_ERROR_MESSAGE).response()

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        cls = NotFoundError if exc.status_code == 404 else BadRequestError
        error = cls(str(exc.detail))
        error.status_code = exc.status_code  # 405 etc. keep their status
        return error.response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(QueueFullError, on_api_error)
    app.add_exception_handler(EngineDeadError, on_api_error)
    app.add_exception_handler(AdmissionClosedError, on_api_error)
    app.add_exception_handler(RequestRejected, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
