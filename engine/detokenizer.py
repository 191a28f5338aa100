"""Incremental detokenization with stop strings: token ids in, safe-to-stream text deltas out.

`tokenizers.decoders.DecodeStream` turns ids into text chunks, holding back tokens that end inside
a multi-byte character. It is primed with a short prompt suffix (as vLLM does), so the first
generated token decodes in context; for byte-level BPE tokenizers (SmolLM2, GPT-2, Llama 3) the
text then equals `tokenizer.decode(output_token_ids)`.

Stop strings are matched on the text, across token boundaries: the first stop string to complete
ends the request, the text is cut before it (or after it, with include_stop_str_in_output), and
nothing after it is ever emitted. While the tail of the text could still be the start of a stop
string it is held back; `flush()` releases it when the request ends for another reason. Each
update costs O(new tokens) plus a scan of a window shorter than the longest stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.request import SamplingParams

_PROMPT_CONTEXT = (4, 24)  # prime the stream with the shortest clean prompt suffix in this range
_INVALID_PREFIX = "Invalid prefix"  # DecodeStream's error when a decoder rewrote earlier text
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode puts for incomplete bytes


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer (or itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"need a fast (Rust-backed) tokenizer, got {type(tokenizer).__name__}")
    return backend


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas, stopping on stop strings.

    Contract: `update()` per step with the new ids; once it returns stopped=True the request is
    finished and later calls return ("", True). When the request finishes for another reason
    (EOS, stop token, length, abort) call `flush()` once for the held-back tail. The deltas
    returned by update() and flush() concatenate to `text`.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = backend_tokenizer(tokenizer)
        self._skip_special = params.skip_special_tokens
        self._stops = params.stop  # non-empty strings (SamplingParams checks)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens  # stop strings may only end after this many tokens
        self._context = _prompt_context(self._tokenizer, prompt_token_ids, self._skip_special)
        self._stream = DecodeStream(self._context, skip_special_tokens=self._skip_special)
        self._pending: list[int] = []  # ids in the stream that have not produced text yet
        self._num_tokens = 0  # output tokens seen
        self._lookback = max((len(x) for x in self._stops), default=1) - 1  # chars a stop spans
        self._decoded_len = 0  # chars decoded so far (emitted + held back)
        self._no_stop_len = 0  # chars from the first min_tokens tokens: no stop may end there
        self._recent = ""  # the last self._lookback decoded chars (where a stop could begin)
        self._held = 0  # how many of them are not emitted: they could start a stop string
        self._pieces: list[str] = []  # emitted text, in order
        self._finished = False
        self._stopped = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the request."""
        return self._stopped

    def update(
        self, new_token_ids: Sequence[int], stop_terminated: bool = False
    ) -> tuple[str, bool]:
        """Decode new tokens; return (text safe to emit now, whether a stop string matched).

        stop_terminated: the last id ended the request as EOS or a stop token id; its text is left
        out unless include_stop_str_in_output (vLLM); call flush() afterwards as usual.
        """
        if self._finished:
            return "", self._stopped
        ids = list(new_token_ids)
        self._num_tokens += len(ids)
        if stop_terminated and not self._include_stop and ids:
            ids.pop()
        first = self._num_tokens - len(new_token_ids)  # output tokens before this update
        new: list[str] = []
        for k, token_id in enumerate(ids):
            piece = self._step(token_id)
            if piece:
                new.append(piece)
                self._decoded_len += len(piece)
            if first + k + 1 <= self._min_tokens:
                self._no_stop_len = self._decoded_len
        return self._advance("".join(new), final=False)

    def flush(self) -> str:
        """Finish: return the held-back tail plus any incomplete trailing bytes (as U+FFFD)."""
        if self._finished:
            return ""
        tail = self._decode_pending()
        self._decoded_len += len(tail)
        text, _ = self._advance(tail, final=True)
        self._finished = True
        return text

    def _step(self, token_id: int) -> str | None:
        """Feed one id to the stream; recover like vLLM when the stream's prefix breaks."""
        try:
            piece = self._stream.step(self._tokenizer, token_id)
        except (OverflowError, TypeError):  # negative or oversized id: no text (vLLM)
            return None
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            self._context = []
            self._stream = DecodeStream(skip_special_tokens=self._skip_special)
            piece = self._stream.step(self._tokenizer, token_id)
        if piece is None:
            self._pending.append(token_id)
        else:
            self._context, self._pending = [*self._pending, token_id], []
        return piece

    def _decode_pending(self) -> str:
        """Text of the ids the stream still holds (a character cut short decodes as U+FFFD)."""
        if not self._pending:
            return ""
        decode = self._tokenizer.decode
        prefix = decode(self._context, skip_special_tokens=self._skip_special)
        full = decode(self._context + self._pending, skip_special_tokens=self._skip_special)
        if full.startswith(prefix):
            return full[len(prefix) :]
        return decode(self._pending, skip_special_tokens=self._skip_special)

    def _advance(self, new_text: str, final: bool) -> tuple[str, bool]:
        """Append decoded text; emit what no stop string can claim any more."""
        window = self._recent + new_text  # the only text a stop completed now can cover
        emitted = len(self._recent) - self._held  # window[:emitted] is already out
        offset = self._decoded_len - len(window)  # absolute position of window[0]
        # A stop string must end inside new_text, and after the min_tokens text.
        min_end = max(len(self._recent), self._no_stop_len - offset) + 1
        match = _first_stop(window, self._stops, min_end) if new_text else None
        if match is not None:
            begin, end = match
            self._finished = self._stopped = True
            return self._emit(window[emitted : end if self._include_stop else begin]), True
        hold = 0 if final or self._include_stop else _stop_prefix_len(window, self._stops)
        self._recent = window[max(0, len(window) - self._lookback) :]
        self._held = hold
        return self._emit(window[emitted : len(window) - hold]), False

    def _emit(self, text: str) -> str:
        if text:
            self._pieces.append(text)
        return text


def _prompt_context(tokenizer: Tokenizer, prompt_ids: Sequence[int], skip: bool) -> list[int]:
    """The shortest prompt suffix of 4 to 24 tokens that decodes without U+FFFD (a whole
    character), or the whole prompt if shorter; [] when none qualifies. Priming the stream with
    a suffix that ends inside a character would make it emit prompt text."""
    lo, hi = _PROMPT_CONTEXT
    n = len(prompt_ids)
    for k in range(min(n, lo), min(n, hi) + 1):
        suffix = list(prompt_ids[n - k :])
        if _REPLACEMENT not in tokenizer.decode(suffix, skip_special_tokens=skip):
            return suffix
    return []


def _first_stop(text: str, stops: Sequence[str], min_end: int) -> tuple[int, int] | None:
    """(begin, end) of the stop string occurrence that completes first (earliest end, then the
    longest) among those ending at or after min_end; None if there is none."""
    best: tuple[int, int] | None = None
    for stop in stops:
        begin = text.find(stop, max(0, min_end - len(stop)))
        if begin < 0:
            continue
        end = begin + len(stop)
        if best is None or (end, begin) < (best[1], best[0]):
            best = (begin, end)
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = max((len(s) for s in stops), default=1)
    for k in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(len(s) > k and s.startswith(tail) for s in stops):
            return k
    return 0
