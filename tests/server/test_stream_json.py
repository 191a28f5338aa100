"""server.stream_json writes the plain stream chunk byte for byte as its pydantic model does."""

from __future__ import annotations

import random

import pytest

from server.protocol_responses import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from server.stream_json import TextChunks

AWKWARD_TEXTS = [
    "", " Paris", "\n", "\n\n", '"', "\\", '\\"', "a\tb\rc\x08d\x0ce", "\x00\x01\x1f\x7f",
    "é", "日本語", "🙂", "\u2028\u2029", "</script>", "{\"json\": [1, 2]}", "\ufeff", "\ufffd",
    "'single'", " " * 7,
]


def completion_model(rid: str, created: int, model: str, index: int, text: str,
                     reason: str | None) -> str:
    return CompletionResponse(id=rid, created=created, model=model, choices=[
        CompletionChoice(index=index, text=text, finish_reason=reason)]).model_dump_json()


def chat_model(rid: str, created: int, model: str, index: int, text: str,
               reason: str | None) -> str:
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[
        ChatStreamChoice(index=index, delta=DeltaMessage(content=text or None),
                         finish_reason=reason)]).model_dump_json()


@pytest.mark.parametrize(("kind", "reference"), [("text_completion", completion_model),
                                                 ("chat.completion.chunk", chat_model)])
@pytest.mark.parametrize("reason", [None, "stop", "length", "abort", "tool_calls"])
def test_awkward_texts_match_the_models(kind, reference, reason):
    rid, model, created = "cmpl-5e1f\"x\\", "smöl \"model\"/1", 1764950000
    chunks = TextChunks(rid, created, model, kind)
    for index in (0, 3, 127):
        for text in AWKWARD_TEXTS:
            assert chunks.json(index, text, reason) == reference(rid, created, model, index,
                                                                  text, reason), (index, text)


@pytest.mark.parametrize(("kind", "reference"), [("text_completion", completion_model),
                                                 ("chat.completion.chunk", chat_model)])
def test_random_texts_match_the_models(kind, reference):
    rng = random.Random(7)
    # code points from every range a token's text may hold (surrogates excluded: a str decoded
    # from UTF-8 never has one)
    ranges = [(0, 0x7f), (0x80, 0x7ff), (0x800, 0xd7ff), (0xe000, 0xffff), (0x10000, 0x10ffff)]
    chunks = TextChunks("chatcmpl-0", 1, "m", kind)
    for _ in range(2000):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 12)))
        assert chunks.json(0, text, None) == reference("chatcmpl-0", 1, "m", 0, text, None), \
            ascii(text)
