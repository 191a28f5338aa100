"""Prompts in, token ids out (and back): the tokenizer calls every endpoint shares.

Text is encoded exactly as `LLM.generate` encodes it (`tokenizer(text).input_ids`), so a prompt
gets the same tokens online and offline. Chat messages are rendered to text by the tokenizer's
chat template, then encoded without adding special tokens (the template already has them), as
vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from server.errors import BadRequestError
from server.protocol import ChatMessage

DECODE_SLICE_TOKENS = 16384  # tokens decoded per tokenizer call (~5 ms with the GIL held)
DECODE_CONTEXT_TOKENS = 8  # tokens before a slice decoded with it, for the text at the seam


@dataclass
class PromptInput:
    """One prompt of a request, tokenized."""

    token_ids: list[int]  # what the engine sees
    text: str | None  # the prompt as text, for echo; None for token ids until decoded (only
    #   when echo asks for it, once the engine has accepted them)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> PromptInput:
    """A text prompt, tokenized. Raises BadRequestError for text that is not valid Unicode
    (JSON can carry lone surrogates, which no tokenizer accepts)."""
    _check_unicode(text, "prompt")
    ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    return PromptInput(token_ids=list(ids), text=text)


def token_prompt(token_ids: Sequence[int]) -> PromptInput:
    """A prompt given as token ids (the engine checks them against the vocabulary)."""
    return PromptInput(token_ids=list(token_ids), text=None)


def decode_ids(tokenizer: Any, token_ids: Sequence[int], vocab_size: int,
               param: str = "tokens") -> str:
    """The text of token ids that reach no engine (/detokenize). Raises BadRequestError for ids
    outside the vocabulary."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})",
                              param=param)
    return decode_text(tokenizer, token_ids)


def decode_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """`tokenizer.decode(token_ids)`, a slice at a time for long lists: one call over 1.35 M ids
    holds the GIL for ~0.5 s, a stall of the event loop even from a worker thread.

    Each slice is decoded with the few tokens before it, and the text those give alone is cut
    off (as vLLM's incremental detokenizer does), so spaces at a seam come out as from one call;
    a seam moves forward while the text before it ends in an incomplete character (U+FFFD).
    """
    ids = list(token_ids)
    if len(ids) <= DECODE_SLICE_TOKENS:
        return str(tokenizer.decode(ids))
    parts: list[str] = []
    start, context = 0, DECODE_CONTEXT_TOKENS
    while start < len(ids):
        end = min(start + DECODE_SLICE_TOKENS, len(ids))
        while (end < len(ids) and end - start < 2 * DECODE_SLICE_TOKENS
               and tokenizer.decode(ids[end - context:end]).endswith("\ufffd")):
            end += 1
        head = max(0, start - context)
        seam_text = tokenizer.decode(ids[head:start]) if start else ""
        parts.append(tokenizer.decode(ids[head:end])[len(seam_text):])
        start = end
    return "".join(parts)


def encode_chat(tokenizer: Any, messages: Sequence[ChatMessage],
                add_generation_prompt: bool = True) -> PromptInput:
    """Chat messages through the chat template, tokenized. Raises BadRequestError when the
    model has no chat template or the template rejects the conversation."""
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in messages]
    return encode_conversation(tokenizer, conversation, add_generation_prompt)


def encode_conversation(tokenizer: Any, conversation: Sequence[dict[str, Any]],
                        add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None) -> PromptInput:
    """A conversation as the chat template takes it (and the tools it renders, if any),
    tokenized. Raises BadRequestError as encode_chat."""
    for message in conversation:
        _check_unicode(message["content"], "messages")
    try:
        text = tokenizer.apply_chat_template(list(conversation), tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (ValueError, TemplateError) as exc:
        raise BadRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
    return encode_text(tokenizer, text, add_special_tokens=False)


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequestError(f"the {param} is not valid Unicode: {exc.reason} at character "
                              f"{exc.start}", param=param) from None
