"""The JSON of the chunk nearly every streamed token is, written without its pydantic model.

A plain stream (no logprobs, no echo, no tools) sends one chunk a token whose only parts that
change are the choice's index, its text and its finish_reason:

    {"id":"cmpl-..","object":"text_completion","created":..,"model":"..","choices":[
        {"index":0,"text":" Paris","logprobs":null,"finish_reason":null}]}
    {"id":"chatcmpl-..","object":"chat.completion.chunk","created":..,"model":"..","choices":[
        {"index":0,"delta":{"content":" Paris"},"logprobs":null,"finish_reason":null}]}

Validating and dumping CompletionResponse / ChatCompletionChunk for it was a tenth of the
event loop's CPU a streamed token, on a small machine CPU taken from the engine's kernels. Here
the call's constant head is written once and a chunk is three string pieces around the text,
escaped by json's C encoder. The output is byte for byte the models' `model_dump_json()`
(tests/server/test_stream_json.py holds them equal over awkward texts); every other chunk (the
chat role prologue, logprobs, tool calls, echo, usage) still goes through the models.
"""

from __future__ import annotations

from json.encoder import encode_basestring  # the C encoder; non-ASCII as is, as pydantic writes
from typing import Literal

ChunkObject = Literal["text_completion", "chat.completion.chunk"]


class TextChunks:
    """The text-only stream chunks of one API call.

    Args:
        response_id: the call's id (cmpl-<hex> / chatcmpl-<hex>).
        created: unix seconds, as every chunk of the call repeats it.
        model: the served model name.
        kind: "text_completion" (the text in `text`) or "chat.completion.chunk" (in
            `delta.content`).
    """

    def __init__(self, response_id: str, created: int, model: str, kind: ChunkObject) -> None:
        self._head = (f'{{"id":{encode_basestring(response_id)},"object":"{kind}",'
                      f'"created":{created},"model":{encode_basestring(model)},'
                      f'"choices":[{{"index":')
        self._chat = kind == "chat.completion.chunk"

    def json(self, index: int, text: str, finish_reason: str | None) -> str:
        """The chunk of choice `index` carrying `text` (chat: an empty text is `delta: {}`)."""
        reason = "null" if finish_reason is None else encode_basestring(finish_reason)
        if self._chat:
            delta = f'{{"content":{encode_basestring(text)}}}' if text else "{}"
            body = f'"delta":{delta}'
        else:
            body = f'"text":{encode_basestring(text)}'
        return f'{self._head}{index},{body},"logprobs":null,"finish_reason":{reason}}}]}}'
