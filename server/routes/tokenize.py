"""POST /tokenize (a prompt, or chat messages through the template) and POST /detokenize."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.prompts import decode_ids, encode_chat, encode_text
from server.protocol import DetokenizeRequest, TokenizeCompletionRequest, TokenizeRequest
from server.protocol_responses import DetokenizeResponse, TokenizeResponse
from server.routes import ERROR_RESPONSES
from server.state import State

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State) -> TokenizeResponse:
    """The token ids the model would see for this prompt or conversation."""
    state.model.check(body.model)
    # Off the event loop, as for generation: a long prompt takes a while to tokenize.
    if isinstance(body, TokenizeCompletionRequest):
        prompt = await asyncio.to_thread(encode_text, state.tokenizer, body.prompt,
                                         body.add_special_tokens)
    else:
        prompt = await asyncio.to_thread(encode_chat, state.tokenizer, body.messages,
                                         body.add_generation_prompt)
    return TokenizeResponse(count=len(prompt.token_ids), max_model_len=state.model.max_model_len,
                            tokens=prompt.token_ids)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State) -> DetokenizeResponse:
    state.model.check(body.model)
    prompt = decode_ids(state.tokenizer, body.tokens, state.model.vocab_size, param="tokens")
    return DetokenizeResponse(prompt=prompt.text)
