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


@dataclass(frozen=True)
class PromptInput:
    """One prompt of a request, tokenized."""

    token_ids: list[int]  # what the engine sees
    text: str  # the prompt as text (decoded when it came as token ids), for echo


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> PromptInput:
    """A text prompt, tokenized. Raises BadRequestError for text that is not valid Unicode
    (JSON can carry lone surrogates, which no tokenizer accepts)."""
    _check_unicode(text, "prompt")
    ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    return PromptInput(token_ids=list(ids), text=text)


def decode_ids(tokenizer: Any, token_ids: Sequence[int], vocab_size: int,
               param: str = "prompt") -> PromptInput:
    """A token-id prompt with its text. Raises BadRequestError for ids outside the vocabulary."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise BadRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                              param=param)
    return PromptInput(token_ids=list(token_ids), text=tokenizer.decode(list(token_ids)))


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
