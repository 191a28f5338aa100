"""HTTP routes, one module per endpoint group; each handler is a few lines over the serving
objects in ServerState. `ERROR_RESPONSES` documents the OpenAI error body in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from server.protocol_responses import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)
}

# The generation endpoints answer `stream: true` with server-sent events (`data: {chunk}` lines
# ending in `data: [DONE]`); documented so clients and fuzzers know both 200 bodies.
_SSE_EVENT = {  # one event (OpenAPI before 3.2: `schema` of an event stream describes an event)
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk (JSON), or `[DONE]` last"},
                   "event": {"type": "string"}}}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
          "description": "the response; with `stream: true`, server-sent events of chunks"},
    **ERROR_RESPONSES,
}
