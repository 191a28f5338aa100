"""Grammar masks of a step: computed on a worker thread while the model runs, applied by the
sampler to the rows that have a grammar (the others are never touched).

    runner.execute():  masks = worker.start(sampled chunks)     (returns at once)
                       logits = model forward                    (~50 ms; the worker fills masks)
                       sampler(logits, masks.result().select(rows))

The worker only reads the matchers; the engine thread advances them after sampling, when the
worker is done. llguidance releases the GIL while it computes a mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from engine.outputs import ScheduledChunk
from engine.structured.matcher import GrammarMatcher

_NEG_INF = float("-inf")


def mask_words(vocab_size: int) -> int:
    """int32 words in one row of a bitmask."""
    return (vocab_size + 31) // 32


def unpack(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(G, words) int32 bitmask -> (G, vocab_size) bool, True = allowed."""
    as_bytes = bits.numpy().view(np.uint8)  # (G, 4 words), little-endian: token order
    return torch.from_numpy(np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :vocab_size]
                            ).bool()


@dataclass(frozen=True)
class GrammarMasks:
    """Allowed tokens of some rows of a batch of logits."""

    rows: torch.Tensor  # (G,) int64: which rows have a grammar
    bits: torch.Tensor  # (G, words) int32 bitmask of each

    def apply(self, x: torch.Tensor, raw: torch.Tensor) -> None:
        """Set disallowed tokens of x's rows to -inf, in place. x: (R, V) float32 processed
        logits; raw: (R, V) the logits before processing. A row left with no token at all (the
        grammar allows only EOS while min_tokens forbids it) takes the grammar over the other
        rules: its raw logits, masked."""
        allowed = unpack(self.bits, x.shape[1])  # (G, V)
        sub = x[self.rows].masked_fill_(~allowed, _NEG_INF)  # (G, V) a copy
        dead = sub.amax(dim=1) == _NEG_INF  # (G,)
        if bool(dead.any()):
            fixed = raw[self.rows[dead]].to(torch.float32).masked_fill_(~allowed[dead], _NEG_INF)
            # nothing allowed even then (a broken matcher): leave the row unconstrained
            broken = fixed.amax(dim=1) == _NEG_INF
            fixed[broken] = raw[self.rows[dead][broken]].to(torch.float32)
            sub[dead] = fixed
        x[self.rows] = sub


@dataclass(frozen=True)
class StepMasks:
    """The masks of one step's sample rows (rows in the order the runner samples them)."""

    bits: torch.Tensor  # (M, words) int32: one row per constrained sample row
    index: np.ndarray  # (num_sample_rows,) int64: each sample row's row of `bits`, -1 = none

    def select(self, sample_rows: Sequence[int] | np.ndarray) -> GrammarMasks | None:
        """The masks of a subset of the sample rows, renumbered 0.. in the subset's order; None
        when none of them has a grammar."""
        index = self.index[np.asarray(sample_rows, dtype=np.int64)]
        constrained = np.flatnonzero(index >= 0)
        if not len(constrained):
            return None
        return GrammarMasks(torch.from_numpy(constrained),
                            self.bits[torch.from_numpy(index[constrained])])


class MaskWorker:
    """Fills a step's masks on one thread of its own."""

    def __init__(self, vocab_size: int) -> None:
        self.words = mask_words(vocab_size)
        self._pool: ThreadPoolExecutor | None = None  # started with the first grammar

    def start(self, sampled: Sequence[ScheduledChunk],
              grammars: Mapping[str, GrammarMatcher]) -> Future[StepMasks] | None:
        """Begin computing the masks of the sampled chunks' rows (1 + drafts each, in order);
        grammars: request id -> matcher, for the constrained requests only. None when no
        sampled chunk has a grammar."""
        if not any(c.request_id in grammars for c in sampled):
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="xyserve-grammar")
        return self._pool.submit(self.compute, list(sampled), dict(grammars))

    def compute(self, sampled: Sequence[ScheduledChunk],
                grammars: Mapping[str, GrammarMatcher]) -> StepMasks:
        num_rows = sum(1 + c.num_draft_tokens for c in sampled)
        index = np.full(num_rows, -1, dtype=np.int64)
        jobs: list[tuple[ScheduledChunk, GrammarMatcher, int]] = []
        row = num_masks = 0
        for chunk in sampled:
            width = 1 + chunk.num_draft_tokens
            matcher = grammars.get(chunk.request_id)
            if matcher is not None:
                index[row:row + width] = np.arange(num_masks, num_masks + width)
                jobs.append((chunk, matcher, num_masks))
                num_masks += width
            row += width
        bits = torch.empty((num_masks, self.words), dtype=torch.int32)
        for chunk, matcher, first in jobs:
            n = chunk.num_draft_tokens
            drafts = chunk.token_ids[len(chunk.token_ids) - n:] if n else ()
            matcher.fill_masks(drafts, chunk.draft_parents, bits[first:first + 1 + n])
        return StepMasks(bits, index)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
