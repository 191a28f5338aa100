"""POST /tokenize (a prompt, or chat messages through the template) and POST /detokenize.

Bodies are parsed and validated off the event loop (OffLoopBodyRoute), and so are the
tokenizer's work and the response's serialization: either side may hold a million token ids.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.body import OffLoopBodyRoute, to_thread_json
from server.prompts import decode_ids, encode_chat, encode_text
from server.protocol import DetokenizeRequest, TokenizeCompletionRequest, TokenizeRequest
from server.protocol_responses import DetokenizeResponse, TokenizeResponse
from server.routes import ERROR_RESPONSES
from server.state import State

router = APIRouter(responses=ERROR_RESPONSES, route_class=OffLoopBodyRoute)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, state: State) -> Response:
    """The token ids the model would see for this prompt or conversation."""
    state.model.check(body.model)

    def respond() -> TokenizeResponse:
        if isinstance(body, TokenizeCompletionRequest):
            prompt = encode_text(state.tokenizer, body.prompt, body.add_special_tokens)
        else:
            prompt = encode_chat(state.tokenizer, body.messages, body.add_generation_prompt)
        return TokenizeResponse(count=len(prompt.token_ids),
                                max_model_len=state.model.max_model_len, tokens=prompt.token_ids)

    return await to_thread_json(respond)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, state: State) -> Response:
    state.model.check(body.model)
    return await to_thread_json(lambda: DetokenizeResponse(
        prompt=decode_ids(state.tokenizer, body.tokens, state.model.vocab_size)))
