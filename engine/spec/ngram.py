"""Prompt lookup decoding (vLLM's `[ngram]` method): draft what followed the suffix last time.

For each request, for n from ngram_max down to ngram_min, find the latest earlier occurrence of
the request's last n tokens inside its own tokens (prompt + outputs) and propose the tokens that
followed it, as a chain. The first n with a match wins; the suffix itself is not a match (an
occurrence must end before the last token, so at least one token follows it), but an occurrence
may overlap the suffix (in `a b a b a` the suffix `a b a` occurs at 0..2, followed by `b a`).

Host cost: this runs between device steps for every decoding request, so the search is one
vectorized scan per request (`tokens == last token`, then one gather of the ngram_max tokens
before each hit) over a numpy copy of the tokens that `TokenHistory` keeps per request and
extends by the new tokens only, so a step converts a handful of ints, not the whole sequence.
About 5-40 us per request of 4k tokens (more when the last token is common), 0.2-0.4 ms for a
request's first call (the copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.spec.types import Draft, DraftRequest

_MIN_CAPACITY = 256  # first buffer size; doubled as the sequence grows (amortized O(1) append)


class TokenHistory:
    """Per-request int64 copies of `DraftRequest.token_ids`, extended between calls.

    Contract: a request's tokens only grow between calls (prompt + outputs; rejected drafts are
    never appended), and an id is freed before it is reused. As a cheap spot check, a call whose
    tokens are shorter than the copy, or differ at the copy's last position, rebuilds the copy.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}  # request id -> buffer (capacity >= length)
        self._lengths: dict[str, int] = {}  # request id -> tokens held at the buffer's start

    def __len__(self) -> int:
        """How many requests have a copy held."""
        return len(self._buffers)

    def tokens(self, request: DraftRequest) -> np.ndarray:
        """The request's tokens as an int64 array view (valid until the next call for it)."""
        token_ids = request.token_ids
        new_len = len(token_ids)
        rid = request.request_id
        buf = self._buffers.get(rid)
        old_len = self._lengths.get(rid, 0)
        if (
            buf is None
            or new_len < old_len
            or (old_len and int(token_ids[old_len - 1]) != int(buf[old_len - 1]))
        ):
            buf, old_len = None, 0  # unknown or inconsistent: rebuild
        if buf is None or new_len > len(buf):
            grown = np.empty(max(_MIN_CAPACITY, 2 * new_len), dtype=np.int64)
            if buf is not None:
                grown[:old_len] = buf[:old_len]
            buf = self._buffers[rid] = grown
        if new_len > old_len:
            # slicing: list, tuple, array.array and ndarray all convert in C
            buf[old_len:new_len] = token_ids[old_len:new_len]
        self._lengths[rid] = new_len
        return buf[:new_len]

    def free(self, request_ids: Iterable[str]) -> None:
        """Drop the copies of these requests (unknown ids are ignored)."""
        for rid in request_ids:
            self._buffers.pop(rid, None)
            self._lengths.pop(rid, None)


@dataclass(frozen=True)
class SuffixMatches:
    """Earlier occurrences of a sequence's suffix n-grams, one entry per occurrence.

    `ends[i]` is the position of the occurrence's last token (so the continuation starts at
    `ends[i] + 1`), ascending; `levels[i]` is the longest n in [ngram_min, ngram_max] whose
    suffix n-gram ends there. An occurrence of the n-gram is also one of every shorter suffix
    n-gram, so each position is listed once, at its longest n.
    """

    ends: np.ndarray  # int64 (num_matches,), ascending
    levels: np.ndarray  # int64 (num_matches,), each in [ngram_min, ngram_max]

    def best_first(self) -> Iterable[int]:
        """Match end positions, longest n first, then latest first within each n."""
        for level in range(int(self.levels.max(initial=0)), 0, -1):
            yield from self.ends[self.levels == level][::-1].tolist()


_NO_MATCHES = SuffixMatches(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


def find_suffix_matches(tokens: np.ndarray, ngram_min: int, ngram_max: int) -> SuffixMatches:
    """All earlier occurrences of `tokens`' last n tokens, n in [ngram_min, ngram_max].

    An occurrence ends before the last position (the suffix itself does not count) and may
    overlap the suffix. Cost: one comparison over the sequence, then one (ngram_max x hits)
    gather and two calls per n; about 10 + 2 * ngram_max numpy calls, whose per-call overhead
    (about 1 us) dominates for thousands of tokens.
    """
    length = len(tokens)
    if length < 2:
        return _NO_MATCHES
    ends = (tokens[:-1] == tokens[-1]).nonzero()[0]  # every occurrence of the 1-gram
    if not len(ends):
        return _NO_MATCHES
    # An occurrence ending at e <= length - 2 is at most e + 1 <= length - 1 long, so looking
    # back `width` tokens never needs a suffix position below 0.
    back = np.arange(min(ngram_max, length - 1))
    starts = ends - back[:, None]  # (width, hits): row j holds the positions j before each end
    same = tokens[starts] == tokens[length - 1 - back][:, None]
    same &= starts >= 0  # a negative start wrapped around: no match
    # the run of matches backwards from each end; row by row, as contiguous rows are much
    # faster than an accumulate along the short axis
    run = same[0]  # all True (the 1-gram); a view, overwritten below, same is not reused
    levels = run.astype(np.int64)
    for row in same[1:]:
        run &= row
        levels += run
    keep = levels >= ngram_min
    return SuffixMatches(ends[keep], levels[keep])


def ngram_proposal(
    tokens: np.ndarray, ngram_min: int, ngram_max: int, max_num_tokens: int
) -> list[int] | None:
    """The up to max_num_tokens tokens after the latest occurrence of the longest matching
    suffix n-gram, or None without a match."""
    matches = find_suffix_matches(tokens, ngram_min, ngram_max)
    if not len(matches.ends):
        return None
    # ends ascend and argmax takes the first maximum: over the reversed levels, the latest one
    latest = len(matches.levels) - 1 - int(matches.levels[::-1].argmax())
    end = int(matches.ends[latest])
    return tokens[end + 1 : end + 1 + max_num_tokens].tolist()


class PromptLookupDrafter:
    """What the prompt-lookup drafters share: each request's token copy (kept between calls,
    until `free`) and the loop over requests; subclasses say what one request's draft is."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._history = TokenHistory()

    @property
    def num_requests(self) -> int:
        """Requests whose token copy is held (until `free`)."""
        return len(self._history)

    def propose(self, requests: Sequence[DraftRequest], max_num_tokens: int,
                ) -> Mapping[str, Draft]:
        """A draft per request with a suffix match; requests without one are left out."""
        drafts: dict[str, Draft] = {}
        if max_num_tokens <= 0:
            return drafts
        for request in requests:
            draft = self.draft_for(self._history.tokens(request), max_num_tokens)
            if draft is not None:
                drafts[request.request_id] = draft
        return drafts

    def draft_for(self, tokens: np.ndarray, max_num_tokens: int) -> Draft | None:
        """One request's draft from its tokens (int64, the newest last), or None."""
        raise NotImplementedError

    def free(self, request_ids: Iterable[str]) -> None:
        """Forget finished or preempted requests (unknown ids are ignored)."""
        self._history.free(request_ids)


class NgramDrafter(PromptLookupDrafter):
    """Prompt lookup drafter: a chain of up to max_num_tokens tokens per matching request.

    ngram_min..ngram_max bound the suffix n-gram lengths tried (longest first). Requests
    without a match get no entry. Keeps a numpy copy of each request's tokens until `free`.
    """

    def draft_for(self, tokens: np.ndarray, max_num_tokens: int) -> Draft | None:
        proposal = ngram_proposal(tokens, self.ngram_min, self.ngram_max, max_num_tokens)
        return Draft.chain(proposal) if proposal else None
