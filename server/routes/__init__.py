"""HTTP routes, one module per endpoint group; each handler is a few lines over the serving
objects in ServerState. `ERROR_RESPONSES` documents the OpenAI error body in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from server.protocol_responses import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)
}
