"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.body import OffLoopBodyRoute
from server.protocol import ChatCompletionRequest
from server.protocol_responses import ChatCompletionResponse
from server.routes import GENERATION_RESPONSES
from server.state import State

# The body (up to --max-request-bytes of token ids) is parsed and validated off the event loop.
router = APIRouter(route_class=OffLoopBodyRoute)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=GENERATION_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request,
                                 state: State) -> Response:
    """Chat completion through the model's chat template; `stream: true` answers with SSE."""
    return await state.chat.create(body, raw_request)
