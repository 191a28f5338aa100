"""Server-sent events framing for the streaming endpoints.

    data: {chunk}\\n\\n ... data: [DONE]\\n\\n

An error after the stream has started can no longer change the HTTP status, so it goes out as an
event in OpenAI's error shape, `data: {"error": {...}}`, followed by `[DONE]` (as vLLM does).
A client that disconnects cancels the stream (Starlette cancels the response task): nothing more
is sent, and the chunk source's `finally` aborts the engine requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel

from server.errors import to_api_error

MEDIA_TYPE = "text/event-stream"
DONE = "data: [DONE]\n\n"


def event(chunk: BaseModel | str) -> str:
    """The event of a chunk: a model, or its JSON text already written (server.stream_json)."""
    return f"data: {chunk if isinstance(chunk, str) else chunk.model_dump_json()}\n\n"


async def sse_stream(chunks: AsyncIterator[BaseModel | str],
                     retry_after_s: int = 1) -> AsyncIterator[str]:
    """Frame `chunks` as SSE events; an exception becomes an error event; always ends in DONE
    (unless cancelled, when the client is gone anyway)."""
    async with aclosing(chunks):  # type: ignore[type-var]
        try:
            async for chunk in chunks:
                yield event(chunk)
        except Exception as exc:
            yield f"data: {json.dumps(to_api_error(exc, retry_after_s).body())}\n\n"
    yield DONE
