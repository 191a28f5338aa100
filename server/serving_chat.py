"""POST /v1/chat/completions: messages through the chat template, chat-format logprobs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.outputs import RequestOutput, TokenLogprob
from server.generation import Choice, GenerationGroup
from server.logprobs import chat_logprobs
from server.prompts import PromptInput, encode_chat
from server.protocol import ChatCompletionRequest
from server.protocol_responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from server.serving import OpenAIServing, ResponseContext, usage


class ChatServing(OpenAIServing):
    """One prompt (the rendered conversation), n choices.

    max_tokens: max_completion_tokens, else max_tokens, else up to max_model_len (vLLM's default).
    A stream starts with one `delta: {"role": "assistant", "content": ""}` chunk per choice.
    """

    id_prefix = "chatcmpl"

    def num_prompts(self, request: ChatCompletionRequest) -> int:
        return 1

    def prompts(self, request: ChatCompletionRequest) -> list[PromptInput]:
        return [encode_chat(self.tokenizer, request.messages, request.add_generation_prompt)]

    def max_tokens(self, request: ChatCompletionRequest) -> int | None:
        return request.max_new_tokens

    def num_logprobs(self, request: ChatCompletionRequest) -> int | None:
        return request.num_logprobs

    def response(self, ctx: ResponseContext, group: GenerationGroup) -> ChatCompletionResponse:
        request: ChatCompletionRequest = ctx.request
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self._logprobs(request, c.logprobs),
                              finish_reason=c.finish_reason)
                   for c in group.choices]
        return ChatCompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model,
                                      choices=choices, usage=usage(group))

    def stream_prologue(self, ctx: ResponseContext,
                        group: GenerationGroup) -> Iterable[ChatCompletionChunk]:
        for choice in group.choices:
            yield self._chunk(ctx, ChatStreamChoice(
                index=choice.index, delta=DeltaMessage(role="assistant", content="")))

    def stream_chunk(self, ctx: ResponseContext, choice: Choice,
                     delta: RequestOutput) -> ChatCompletionChunk | None:
        if not (delta.new_text or delta.finished or delta.new_logprobs):
            return None  # e.g. half of a multi-byte character: nothing to show yet
        return self._chunk(ctx, ChatStreamChoice(
            index=choice.index, delta=DeltaMessage(content=delta.new_text or None),
            logprobs=self._logprobs(ctx.request, delta.new_logprobs or ()),
            finish_reason=choice.finish_reason))

    def usage_chunk(self, ctx: ResponseContext, usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=[],
                                   usage=usage)

    def _chunk(self, ctx: ResponseContext, choice: ChatStreamChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model,
                                   choices=[choice])

    def _logprobs(self, request: ChatCompletionRequest,
                  logprobs: Sequence[TokenLogprob]) -> ChatLogprobs | None:
        if request.num_logprobs is None:
            return None
        return chat_logprobs(self.tokenizer, logprobs, request.num_logprobs)
