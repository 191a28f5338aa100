"""POST /v1/completions: prompts as text or token ids, legacy logprobs, echo."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from engine.outputs import RequestOutput, TokenLogprob
from server.errors import BadRequestError
from server.generation import Choice, GenerationGroup
from server.logprobs import completion_logprobs
from server.prompts import PromptInput, decode_text, encode_text, token_prompt
from server.protocol import CompletionRequest
from server.protocol_responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
)
from server.serving import OpenAIServing, ResponseContext, usage


class CompletionServing(OpenAIServing):
    """Choices are prompt-major: choice i of prompt p has index p * n + i.

    echo=True prepends the prompt's text to each choice (in a stream, to its first chunk); with
    logprobs, the prompt's tokens come first with null logprobs (no prompt logprobs here).
    """

    id_prefix = "cmpl"

    def num_prompts(self, request: CompletionRequest) -> int:
        return len(_prompt_list(request))

    def prompts(self, request: CompletionRequest) -> list[PromptInput]:
        texts_or_ids = _prompt_list(request)
        if not texts_or_ids:
            raise BadRequestError("the prompt list is empty", param="prompt")
        return [encode_text(self.tokenizer, p) if isinstance(p, str) else token_prompt(p)
                for p in texts_or_ids]

    async def accepted(self, request: CompletionRequest, group: GenerationGroup) -> None:
        if request.echo:  # the text of token-id prompts, now that the engine has checked them
            await asyncio.to_thread(self._decode_prompts, group)

    def _decode_prompts(self, group: GenerationGroup) -> None:
        for prompt in group.prompts:
            if prompt.text is None:
                prompt.text = decode_text(self.tokenizer, prompt.token_ids)

    def max_tokens(self, request: CompletionRequest) -> int | None:
        return request.max_tokens

    def num_logprobs(self, request: CompletionRequest) -> int | None:
        return request.logprobs

    def response(self, ctx: ResponseContext, group: GenerationGroup) -> CompletionResponse:
        request: CompletionRequest = ctx.request
        choices = []
        for choice in group.choices:
            echo = choice.prompt if request.echo else None
            choices.append(CompletionChoice(
                index=choice.index, text=((echo.text or "") if echo else "") + choice.text,
                logprobs=self._logprobs(request, choice.logprobs, echo, 0),
                finish_reason=choice.finish_reason))
        return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model,
                                  choices=choices, usage=usage(group))

    def stream_chunk(self, ctx: ResponseContext, choice: Choice,
                     delta: RequestOutput) -> CompletionResponse | str | None:
        request: CompletionRequest = ctx.request
        is_first = choice.num_output_tokens == len(delta.new_token_ids)
        echo = choice.prompt if request.echo and is_first else None
        if not (delta.new_text or delta.finished or echo or delta.new_logprobs):
            return None  # e.g. half of a multi-byte character: nothing to show yet
        text = ((echo.text or "") if echo else "") + delta.new_text
        if request.logprobs is None:  # the plain chunk, its JSON written directly
            return ctx.text_chunks.json(choice.index, text, choice.finish_reason)
        # Where this delta starts in the choice's full text (choice.text already includes it).
        prefix_len = len(choice.prompt.text or "") if request.echo else 0
        offset = 0 if echo else prefix_len + len(choice.text) - len(delta.new_text)
        logprobs = self._logprobs(request, delta.new_logprobs or (), echo, offset)
        return CompletionResponse(
            id=ctx.id, created=ctx.created, model=ctx.model,
            choices=[CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                                      finish_reason=choice.finish_reason)])

    def usage_chunk(self, ctx: ResponseContext, usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=[],
                                  usage=usage)

    def _logprobs(self, request: CompletionRequest, logprobs: Sequence[TokenLogprob],
                  echo: PromptInput | None, offset: int) -> CompletionLogprobs | None:
        if request.logprobs is None:
            return None
        return completion_logprobs(self.tokenizer, logprobs, echo.token_ids if echo else (),
                                   offset)


def _prompt_list(request: CompletionRequest) -> list[str] | list[list[int]]:
    """The request's prompts as a list: one text, one token-id list, or a list of either."""
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]
