"""POST /v1/chat/completions: messages (and tools) through the chat template, chat-format
logprobs, tool calls read out of the text (server.tool_parser) and streamed as OpenAI does."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.outputs import RequestOutput, TokenLogprob
from engine.structured import StructuredOutputs
from server.errors import BadRequestError
from server.generation import Choice, GenerationGroup
from server.logprobs import chat_logprobs
from server.prompts import PromptInput, encode_conversation
from server.protocol import ChatCompletionRequest
from server.protocol_responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    ResponseFunction,
    ResponseToolCall,
    UsageInfo,
)
from server.serving import OpenAIServing, ResponseContext, usage
from server.structured import request_constraint
from server.tool_parser import ToolCallDelta, ToolCallParser
from server.tools import conversation, tool_call_constraint, tool_mode


class ChatServing(OpenAIServing):
    """One prompt (the rendered conversation), n choices.

    max_tokens: max_completion_tokens, else max_tokens, else up to max_model_len (vLLM's default).
    A stream starts with one `delta: {"role": "assistant", "content": ""}` chunk per choice.
    With tools offered, each choice's text goes through a ToolCallParser: calls become
    `tool_calls` (finish_reason "tool_calls"), the rest stays content.
    """

    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def num_prompts(self, request: ChatCompletionRequest) -> int:
        return 1

    def prompts(self, request: ChatCompletionRequest) -> list[PromptInput]:
        template = getattr(self.tokenizer, "chat_template", None) or ""
        messages, tools = conversation(request, template_has_tools="tools" in template)
        return [encode_conversation(self.tokenizer, messages, request.add_generation_prompt,
                                    tools)]

    def max_tokens(self, request: ChatCompletionRequest) -> int | None:
        return request.max_new_tokens

    def num_logprobs(self, request: ChatCompletionRequest) -> int | None:
        return request.num_logprobs

    def constraint(self, request: ChatCompletionRequest) -> StructuredOutputs | None:
        tools = tool_call_constraint(request)
        asked = request_constraint(request)
        if tools is not None and asked is not None:
            raise BadRequestError(f"{asked.param} cannot be combined with tool_choice "
                                  f"{request.tool_choice!r}: the tool call is the output",
                                  param=asked.param)
        return tools or asked

    def response(self, ctx: ResponseContext, group: GenerationGroup) -> ChatCompletionResponse:
        request: ChatCompletionRequest = ctx.request
        choices = []
        for c in group.choices:
            message = ChatResponseMessage(content=c.text)
            finish_reason = c.finish_reason
            if tool_mode(request) is not None:
                parser = ToolCallParser()
                content, _ = parser.feed(c.text, final=True)
                calls = [ResponseToolCall(id=p.id, function=ResponseFunction(
                    name=p.name, arguments=p.arguments)) for p in parser.calls]
                message = ChatResponseMessage(
                    content=content if content.strip() or not calls else None, tool_calls=calls)
                finish_reason = _finish_reason(finish_reason, bool(calls))
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=self._logprobs(request, c.logprobs),
                                      finish_reason=finish_reason))
        return ChatCompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model,
                                      choices=choices, usage=usage(group))

    def stream_prologue(self, ctx: ResponseContext,
                        group: GenerationGroup) -> Iterable[ChatCompletionChunk]:
        for choice in group.choices:
            yield self._chunk(ctx, ChatStreamChoice(
                index=choice.index, delta=DeltaMessage(role="assistant", content="")))

    def stream_chunk(self, ctx: ResponseContext, choice: Choice,
                     delta: RequestOutput) -> ChatCompletionChunk | str | None:
        content, calls, finish_reason = delta.new_text, [], choice.finish_reason
        if tool_mode(ctx.request) is not None:
            parser = ctx.state.setdefault(choice.index, ToolCallParser())
            content, calls = parser.feed(delta.new_text, final=delta.finished)
            if delta.finished:
                finish_reason = _finish_reason(finish_reason, bool(parser.calls))
        if not (content or calls or delta.finished or delta.new_logprobs):
            return None  # e.g. half of a multi-byte character, or a tag not yet complete
        if not calls and ctx.request.num_logprobs is None:  # the plain chunk, written directly
            return ctx.text_chunks.json(choice.index, content, finish_reason)
        return self._chunk(ctx, ChatStreamChoice(
            index=choice.index,
            delta=DeltaMessage(content=content or None,
                               tool_calls=[_delta_call(c) for c in calls] or None),
            logprobs=self._logprobs(ctx.request, delta.new_logprobs or ()),
            finish_reason=finish_reason))

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


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for a choice that ended by itself after calling tools."""
    return "tool_calls" if called and reason == "stop" else reason


def _delta_call(call: ToolCallDelta) -> DeltaToolCall:
    if call.id is None:
        return DeltaToolCall(index=call.index, function=DeltaFunction(arguments=call.arguments))
    return DeltaToolCall(index=call.index, id=call.id, type="function",
                         function=DeltaFunction(name=call.name, arguments=call.arguments))
