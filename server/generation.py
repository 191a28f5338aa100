"""One API call's engine requests (n choices for each prompt), merged into one stream.

    GenerationGroup.start()     queue every sub-request, wait for each one's first output
    async for choice, delta     deltas in arrival order, until every choice has finished
    GenerationGroup.aclose()    abort whatever is unfinished (disconnect, error, early exit)

Both the completions and the chat endpoint, streaming or not, go through this one path, so
rejection, fan-out and abort behave the same everywhere. (Metrics come from the engine's stats,
aborted requests included, not from here.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from engine.async_engine import AsyncEngine, RequestStream
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import FinishReason, RequestRejected, SamplingParams
from server.errors import BadRequestError, InternalServerError
from server.prompts import PromptInput


@dataclass
class Choice:
    """The accumulated state of one choice (one engine request)."""

    index: int  # position in the response's choices: prompt_index * n + i
    prompt: PromptInput  # the prompt it continues
    text: str = ""  # generated text so far (stop strings excluded)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, if asked
    num_output_tokens: int = 0  # generated tokens so far
    finish_reason: str | None = None  # set once finished: "stop" | "length" | "abort"

    def add(self, delta: RequestOutput) -> None:
        self.text += delta.new_text
        if delta.new_logprobs:
            self.logprobs.extend(delta.new_logprobs)
        self.num_output_tokens = delta.num_output_tokens
        if delta.finish_reason is not None:
            self.finish_reason = FinishReason(delta.finish_reason).value


class GenerationGroup:
    """The engine requests of one API call.

    Args:
        engine: the running AsyncEngine.
        request_id: the API call's id; sub-request i gets `<request_id>-<i>`.
        prompts: the prompts, in request order.
        params: one SamplingParams per prompt (its `n` is the number of choices).
    """

    def __init__(self, engine: AsyncEngine, request_id: str,
                 prompts: Sequence[PromptInput], params: Sequence[SamplingParams]) -> None:
        self.prompts = list(prompts)
        self.choices: list[Choice] = []
        self._requests: list[tuple[str, list[int], SamplingParams]] = []  # queued by start()
        for prompt, sp in zip(prompts, params, strict=True):
            for i in range(sp.n):
                choice = Choice(index=len(self.choices), prompt=prompt)
                self.choices.append(choice)
                self._requests.append((f"{request_id}-{choice.index}", prompt.token_ids,
                                       sp.for_choice(i)))
        self._engine = engine
        self._gens: list[RequestStream] = []
        # Bounded: a consumer slower than the engine (a client reading a stream slowly) holds the
        # pumps back, and the deltas they have not taken merge in the engine's mailboxes.
        self._queue: asyncio.Queue[tuple[Choice, RequestOutput] | BaseException] = \
            asyncio.Queue(maxsize=max(1, len(self.choices)))
        self._pumps: list[asyncio.Task[None]] = []
        self._first: RequestOutput | None = None  # a lone choice's first delta, not yet yielded
        self._num_unfinished = len(self.choices)
        self._closed = False
        self._closing: asyncio.Future[None] | None = None  # keeps the closing task referenced

    async def start(self) -> None:
        """Queue every sub-request and wait for its first output.

        Raises (after aborting the sub-requests already queued): QueueFullError, EngineDeadError,
        AdmissionClosedError, BadRequestError when the engine rejects a request (ValueError).
        """
        # All choices are admitted together and queued before the next await, so a burst of
        # calls cannot all pass the queue check before any of them is counted as waiting.
        self._engine.check_admission(len(self._requests))
        self._gens = [self._engine.add_request(*r, admission_checked=True)
                      for r in self._requests]
        firsts: list[RequestOutput | BaseException] = []
        try:
            firsts = await asyncio.gather(*(anext(g) for g in self._gens),
                                          return_exceptions=True)
        except BaseException:  # cancelled (the client went away): abort them all
            await self.aclose()
            raise
        if any(isinstance(f, BaseException) for f in firsts):
            await self.aclose()
        for first in firsts:
            if isinstance(first, RequestRejected):
                raise BadRequestError(str(first), param=first.param, code=first.code) from first
            if isinstance(first, ValueError):
                raise BadRequestError(str(first)) from first
            if isinstance(first, BaseException):
                raise first
        if len(self._gens) == 1:  # one choice: __aiter__ reads its stream itself, no pump task
            self._first = firsts[0]  # type: ignore[assignment]
            return
        self._pumps = [asyncio.create_task(self._pump(choice, gen, first))  # type: ignore[arg-type]
                       for choice, gen, first in zip(self.choices, self._gens, firsts,
                                                     strict=True)]

    async def _pump(self, choice: Choice, gen: RequestStream,
                    first: RequestOutput) -> None:
        try:
            delta = first
            while True:
                await self._queue.put((choice, delta))
                if delta.finished:
                    return
                delta = await anext(gen)
        except Exception as exc:  # EngineDeadError and the like: the consumer raises it
            await self._queue.put(exc)
        finally:
            await gen.aclose()  # aborts it if unfinished

    async def __aiter__(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Yield (choice, delta) as deltas arrive, the choice already updated with the delta.

        Raises InternalServerError if a choice finishes with reason "error", or the engine's
        exception (e.g. EngineDeadError) if a sub-request fails.
        """
        # A lone choice (most calls) is read straight from its stream: one task wake-up a token
        # instead of two (the pump's and this one's) and no queue between them.
        lone = self._gens[0] if len(self._gens) == 1 else None  # (start() made no pump)
        while self._num_unfinished:
            if lone is not None:
                choice, delta, self._first = self.choices[0], self._first, None
                if delta is None:
                    delta = await anext(lone)
            else:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                choice, delta = item
            choice.add(delta)
            if delta.finished:
                self._num_unfinished -= 1
            if delta.finish_reason is FinishReason.ERROR:
                raise InternalServerError(
                    f"the engine failed while generating choice {choice.index}")
            yield choice, delta

    async def aclose(self) -> None:
        """Abort every unfinished sub-request; idempotent."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.cancel()  # a pump cancelled inside anext() aborts its request at once
        # NOTE: shielded, in a task of its own: Starlette cancels a dropped stream's task again
        # at every await (anyio cancel scopes are level-triggered), and the generators must
        # still all be closed.
        self._closing = asyncio.ensure_future(self._close_generators())
        await asyncio.shield(self._closing)

    async def _close_generators(self) -> None:
        await asyncio.gather(*self._pumps, return_exceptions=True)
        # A pump cancelled before it ever ran never closed its generator, and a rejected call
        # has no pumps: close them all here (no-op when finished, an abort when queued).
        for gen in self._gens:
            await gen.aclose()

    async def __aenter__(self) -> GenerationGroup:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the call, each prompt counted once (as OpenAI's usage does)."""
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)
