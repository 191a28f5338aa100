"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.body import OffLoopBodyRoute
from server.protocol import CompletionRequest
from server.protocol_responses import CompletionResponse
from server.routes import GENERATION_RESPONSES
from server.state import State

# The body (up to --max-request-bytes of token ids) is parsed and validated off the event loop.
router = APIRouter(route_class=OffLoopBodyRoute)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=GENERATION_RESPONSES)
async def create_completion(body: CompletionRequest, raw_request: Request,
                            state: State) -> Response:
    """Text completion; `stream: true` answers with server-sent events."""
    return await state.completions.create(body, raw_request)
