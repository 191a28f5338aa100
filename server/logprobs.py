"""The engine's TokenLogprobs in OpenAI's two logprobs formats.

- Completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict per
  token that includes the chosen token, so up to logprobs + 1 entries, as OpenAI documents) and
  `text_offset` (where each token starts in the choice's text).
- Chat: `content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]`.

Each token's text is `tokenizer.decode([id])`; a token that holds part of a multi-byte character
decodes to U+FFFD on its own (its `bytes` are those of that text, not the raw byte).
Echoed prompt tokens get a null logprob: the engine computes no prompt logprobs (vLLM fills them
only when prompt_logprobs is asked for, which this server does not support).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.outputs import TokenLogprob
from server.protocol_responses import ChatLogprob, ChatLogprobs, CompletionLogprobs, TopLogprob

MIN_LOGPROB = -9999.0  # -inf (a token top-k/top-p filtered out) is not JSON; vLLM clamps too


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(tokenizer: Any, logprobs: Sequence[TokenLogprob],
                        prompt_ids: Sequence[int] = (), text_offset: int = 0) -> CompletionLogprobs:
    """Legacy logprobs for `prompt_ids` (echoed, null logprobs) then the generated tokens.

    `text_offset` is where the first of these tokens starts in the choice's text (non-zero for
    the later chunks of a stream).
    """
    out = CompletionLogprobs()
    for token_id in prompt_ids:
        token = tokenizer.decode([token_id])
        out.tokens.append(token)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    for lp in logprobs:
        token = tokenizer.decode([lp.token_id])
        top = {tokenizer.decode([t]): _clamp(v) for t, v in lp.top}
        top.setdefault(token, _clamp(lp.logprob))
        out.tokens.append(token)
        out.token_logprobs.append(_clamp(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def _top(tokenizer: Any, token_id: int, logprob: float) -> TopLogprob:
    token = tokenizer.decode([token_id])
    return TopLogprob(token=token, logprob=_clamp(logprob), bytes=list(token.encode()))


def chat_logprobs(tokenizer: Any, logprobs: Sequence[TokenLogprob],
                  num_top: int) -> ChatLogprobs:
    """Chat logprobs of the generated tokens, with `num_top` alternatives each."""
    content = []
    for lp in logprobs:
        chosen = _top(tokenizer, lp.token_id, lp.logprob)
        content.append(ChatLogprob(**chosen.model_dump(), top_logprobs=[
            _top(tokenizer, t, v) for t, v in lp.top[:num_top]]))
    return ChatLogprobs(content=content)
