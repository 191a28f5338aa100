"""Request bodies parsed and validated off the event loop.

FastAPI parses a JSON body (json.loads) and validates it (pydantic) on the event loop. For a 4 MiB
body of 1.35 M token ids that is ~0.6 s with the GIL held, during which every stream and /health
stall. `OffLoopBodyRoute` does both on a worker thread before FastAPI sees the request, and hands
FastAPI the validated model, which it accepts as it is (pydantic does not validate an instance of
the model again). Bodies up to INLINE_BODY_BYTES are parsed the same way on the loop (faster than
a thread hop). Two things keep the worker from holding the GIL for long stretches, which would
stall the loop just the same:

- pydantic-core's JSON parser (~3x faster than json's; json's takes over for the bodies it
  refuses, so errors, lone surrogates and deep nesting read exactly as before);
- the long lists (token ids) are checked in slices by `protocol.token_id_lists`, not by one
  pydantic call, so the GIL changes hands between slices.

The JSON response of a route with a big answer (/tokenize, /detokenize) is serialized on the
worker too (`to_thread_json`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.message
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import Receive, Scope

from server.errors import BadRequestError, validation_error

T = TypeVar("T")
INLINE_BODY_BYTES = 64 << 10  # bodies up to this size are parsed on the loop (< 1 ms)
# One thread for the big bodies: their work holds the GIL (in slices), so more threads would not
# parse them any faster, only contend with the event loop for the GIL. Small bodies never wait
# behind them (they are parsed inline).
BODY_EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xyserve-body")


class OffLoopBodyRoute(APIRoute):
    """An APIRoute whose JSON body is parsed and validated on a worker thread (module
    docstring). Bodies FastAPI would not read as JSON (another content type) are left to it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        adapter: TypeAdapter[Any] = TypeAdapter(self.body_field.field_info.annotation)

        async def route_handler(request: Request) -> Response:
            if _is_json(request.headers.get("content-type")):
                body = await request.body()
                if len(body) > INLINE_BODY_BYTES:
                    parsed = await asyncio.get_running_loop().run_in_executor(
                        BODY_EXECUTOR, parse_body, adapter, body)
                    request = _ParsedRequest(request.scope, request.receive, body, parsed)
                elif body:  # a thread hop would cost more than parsing it here
                    request = _ParsedRequest(request.scope, request.receive, body,
                                             parse_body(adapter, body))
            return await handler(request)

        return route_handler


def parse_body(adapter: TypeAdapter[T], body: bytes) -> T:
    """The validated body. Raises BadRequestError for JSON that does not parse or a body the
    schema refuses, worded as the app's validation handler words FastAPI's errors."""
    try:
        data = pydantic_core.from_json(body)
    except ValueError:  # json's parser decides, with its own messages and leniencies
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"the request body is not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise BadRequestError("the request body is not valid JSON: nested too deeply") \
                from None
        except ValueError as exc:  # bad UTF-8, an integer of more than 4300 digits
            raise BadRequestError(f"the request body is not valid JSON: {exc}") from None
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def to_thread_json(build: Callable[[], BaseModel]) -> Response:
    """`build()`'s model as a JSON response, built and serialized on the body thread."""
    def serialize() -> bytes:
        return build().model_dump_json().encode()

    content = await asyncio.get_running_loop().run_in_executor(BODY_EXECUTOR, serialize)
    return Response(content=content, media_type="application/json")


class _ParsedRequest(Request):
    """A request whose body has been read and parsed already: FastAPI gets the parsed value."""

    def __init__(self, scope: Scope, receive: Receive, body: bytes, parsed: Any) -> None:
        super().__init__(scope, receive)
        self._body = body  # Starlette's cache of the body bytes
        self._parsed = parsed

    async def json(self) -> Any:
        return self._parsed


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI would read a body of this content type as JSON (as its router decides:
    application/json or application/*+json; no content type is not JSON)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))
