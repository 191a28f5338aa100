"""The request path shared by /v1/completions and /v1/chat/completions (vLLM's OpenAIServing).

    create(): model check -> SamplingParams (field ranges: 400s) -> the call's size: prompts x n
              within max_choices_per_request (400) -> admission pre-check of that many engine
              requests (400 if they could never wait, 429 / 503 now; before any real work)
              -> prompts (tokenized off the event loop)
              -> GenerationGroup.start() (429 / 503, and the engine's 400s for what needs the
                 model: lengths, token ids; still before any byte is sent)
              -> JSON response, or an SSE stream of chunks

A subclass says how its prompts are read and how choices, deltas and usage look on the wire.
A client that disconnects aborts its requests: while we wait for a JSON response, a listener on
the ASGI receive channel cancels the wait; a stream is cancelled by Starlette itself.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.request import RequestRejected, SamplingParams
from engine.structured import StructuredOutputs
from server import sse
from server.config import ServerConfig
from server.errors import BadRequestError, ClientDisconnectedError
from server.generation import Choice, GenerationGroup
from server.observe import response_id
from server.prompts import PromptInput
from server.protocol import GenerationRequest
from server.protocol_responses import UsageInfo
from server.state import ModelInfo
from server.stream_json import ChunkObject, TextChunks
from server.structured import request_constraint

T = TypeVar("T")


@dataclass(frozen=True)
class ResponseContext:
    """What every response and chunk of one API call repeats."""

    id: str  # cmpl-<hex> / chatcmpl-<hex>
    created: int  # unix seconds
    model: str  # the served name
    request: Any  # the validated request (the subclass's request type)
    chunk_object: ChunkObject  # its stream chunks' "object"
    state: dict[Any, Any] = field(default_factory=dict)  # the endpoint's own, per call (chat:
    #   each choice's tool-call parser)

    @functools.cached_property
    def text_chunks(self) -> TextChunks:
        """The JSON of its text-only stream chunks (built by a stream's first one)."""
        return TextChunks(self.id, self.created, self.model, self.chunk_object)


class OpenAIServing:
    """Serves one generation endpoint; subclasses fill in the endpoint-specific parts."""

    id_prefix = "cmpl"
    chunk_object: ChunkObject = "text_completion"  # a stream chunk's "object"

    def __init__(self, engine: AsyncEngine, model: ModelInfo, tokenizer: Any,
                 config: ServerConfig) -> None:
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.config = config

    # ------------------------------------------------------------------ endpoint-specific parts

    def num_prompts(self, request: Any) -> int:
        """How many prompts the request carries (counted without tokenizing them)."""
        raise NotImplementedError

    def prompts(self, request: Any) -> list[PromptInput]:
        """The request's prompts, tokenized. Raises BadRequestError."""
        raise NotImplementedError

    async def accepted(self, request: Any, group: GenerationGroup) -> None:
        """Called once the engine has accepted the call's requests, before the response."""

    def max_tokens(self, request: Any) -> int | None:
        """Tokens to generate at most; None = up to max_model_len."""
        raise NotImplementedError

    def num_logprobs(self, request: Any) -> int | None:
        """SamplingParams.logprobs for the request (None = no logprobs)."""
        raise NotImplementedError

    def constraint(self, request: Any) -> StructuredOutputs | None:
        """The structured output the request asks for (None = free text). Raises
        BadRequestError naming the field."""
        return request_constraint(request)

    def response(self, ctx: ResponseContext, group: GenerationGroup) -> BaseModel:
        """The JSON response once every choice has finished."""
        raise NotImplementedError

    def stream_prologue(self, ctx: ResponseContext, group: GenerationGroup) -> Iterable[BaseModel]:
        """Chunks sent before any delta (chat: the role of every choice)."""
        return ()

    def stream_chunk(self, ctx: ResponseContext, choice: Choice,
                     delta: RequestOutput) -> BaseModel | str | None:
        """The chunk for one delta of one choice (already added to `choice`): a model, or the
        JSON text of one (`ctx.text_chunks`); None = skip it."""
        raise NotImplementedError

    def usage_chunk(self, ctx: ResponseContext, usage: UsageInfo) -> BaseModel:
        """The last chunk of a stream with include_usage: `choices: []` and the usage."""
        raise NotImplementedError

    # -------------------------------------------------------------------------- shared path

    async def create(self, request: GenerationRequest, raw_request: Request) -> Response:
        """Serve one API call: a JSON response or an SSE stream.

        Raises (before anything is sent) BadRequestError, NotFoundError, QueueFullError,
        EngineDeadError, AdmissionClosedError; the app's handlers turn them into OpenAI error
        responses.
        """
        self.model.check(request.model)
        sampling_params = self.sampling_params(request)
        # Refuse at once, before tokenizing, a call too large (400) or one the queue has no room
        # for now (429 / 503); the check is repeated when the requests are queued.
        self.engine.check_admission(self.num_choices(request))
        # Tokenizing a long prompt takes a while (~1 s a MB) and releases the GIL: off the loop.
        prompts = await asyncio.to_thread(self.prompts, request)
        # So is compiling a structured output's grammar (cached; the engine then finds it).
        await self._compile(sampling_params)
        params = [sampling_params] * len(prompts)
        request_id = response_id(self.id_prefix)  # built on X-Request-Id, as vLLM's
        ctx = ResponseContext(request_id, int(time.time()), self.model.name, request,
                              self.chunk_object)
        # Engine ids stay unique when a client repeats an X-Request-Id.
        group = GenerationGroup(self.engine, f"{request_id}-{uuid.uuid4().hex[:8]}", prompts,
                                params)
        # The first output of every choice is awaited here, so an engine-side rejection is
        # still an HTTP error status, not an error event inside a 200 stream.
        await _until_disconnected(raw_request, group.start())
        try:
            await self.accepted(request, group)
        except BaseException:
            await group.aclose()
            raise
        if request.stream:
            return StreamingResponse(sse.sse_stream(self._chunks(ctx, group),
                                                   self.config.retry_after_s),
                                     media_type=sse.MEDIA_TYPE,
                                     background=BackgroundTask(group.aclose))
        try:
            await _until_disconnected(raw_request, _drain(group))
        finally:
            await group.aclose()
        return json_response(self.response(ctx, group))

    def num_choices(self, request: GenerationRequest) -> int:
        """The engine requests the call brings: prompts x n. BadRequestError beyond
        max_choices_per_request (each one is queued, scheduled and streamed on its own)."""
        num_choices = self.num_prompts(request) * request.n
        limit = self.config.max_choices_per_request
        if num_choices > limit:
            raise BadRequestError(
                f"the call asks for {num_choices} choices (prompts x n), more than the {limit} "
                f"this server allows in one call (max_choices_per_request)",
                param="n" if request.n > 1 else "prompt")
        return max(1, num_choices)  # (an empty prompt list is refused with the prompts)

    def sampling_params(self, request: GenerationRequest) -> SamplingParams:
        """The engine parameters of the call's prompts. Field ranges are SamplingParams' to
        check (a ValueError names the field); what needs the model (lengths, token ids) the
        engine checks when the requests are queued, still before any byte is sent."""
        constraint = self.constraint(request)
        try:
            return request.to_sampling_params(self.max_tokens(request),
                                              self.num_logprobs(request), constraint)
        except ValueError as exc:
            raise BadRequestError(str(exc), param=str(exc).split()[0]) from exc

    async def _compile(self, params: SamplingParams) -> None:
        try:
            await self.engine.compile_grammar(params)
        except RequestRejected as exc:
            raise BadRequestError(str(exc), param=exc.param, code=exc.code) from exc

    async def _chunks(self, ctx: ResponseContext,
                      group: GenerationGroup) -> AsyncIterator[BaseModel | str]:
        try:
            for chunk in self.stream_prologue(ctx, group):
                yield chunk
            async for choice, delta in group:
                chunk = self.stream_chunk(ctx, choice, delta)
                if chunk is not None:
                    yield chunk
            if ctx.request.include_usage:
                yield self.usage_chunk(ctx, usage(group))
        finally:
            await group.aclose()  # aborts the rest on disconnect or error


def usage(group: GenerationGroup) -> UsageInfo:
    prompt, completion = group.num_prompt_tokens, group.num_output_tokens
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def json_response(body: BaseModel) -> Response:
    # pydantic serializes directly (faster than FastAPI's jsonable_encoder round trip).
    return Response(content=body.model_dump_json(), media_type="application/json")


async def _drain(group: GenerationGroup) -> None:
    async for _ in group:
        pass


async def _wait_for_disconnect(raw_request: Request) -> None:
    # The body has been read, so the next ASGI message is http.disconnect (uvicorn sends it
    # when the connection drops, or once the response is complete).
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnected(raw_request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise
    ClientDisconnectedError (the work's own cleanup aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnectedError("the client disconnected")
    return task.result()
