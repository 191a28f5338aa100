"""The model runner's grammars: one matcher per constrained request, the step's masks, drafts
kept within the grammar. A runner without constrained requests pays one empty-dict check a step.

Per step (engine.runner.ModelRunner.execute):

    future = grammars.start_masks(sampled chunks)   before the forward; the worker fills masks
    ... forward ...
    masks = grammars.masks(future)                  the sampler applies them to their rows
    grammars.advance(sampled token ids)             matchers move past the accepted tokens
    drafts = grammars.prune(drafts)                 proposals cut where they leave the grammar
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from engine.outputs import ScheduledChunk
from engine.spec.types import Draft
from engine.structured.masks import MaskWorker, StepMasks
from engine.structured.matcher import GrammarMatcher


class RunnerGrammars:
    """Matchers of the runner's constrained requests, and the worker that fills their masks."""

    def __init__(self, vocab_size: int) -> None:
        self._matchers: dict[str, GrammarMatcher] = {}  # request id -> its matcher
        self._worker = MaskWorker(vocab_size)

    def add(self, request_id: str, compiled: Any) -> None:
        """A new request; compiled: its engine.structured CompiledGrammar (None = free text)."""
        if compiled is not None:
            self._matchers[request_id] = compiled.new_matcher()

    def free(self, request_ids: Iterable[str]) -> None:
        if self._matchers:
            for request_id in request_ids:
                self._matchers.pop(request_id, None)

    def start_masks(self, sampled: list[ScheduledChunk]) -> Future[StepMasks] | None:
        """Start filling the masks of the sampled chunks' rows (None: no grammar among them)."""
        if not self._matchers:
            return None
        return self._worker.start(sampled, self._matchers)

    @staticmethod
    def masks(future: Future[StepMasks] | None) -> StepMasks | None:
        return None if future is None else future.result()

    def advance(self, token_ids: Mapping[str, tuple[int, ...]]) -> None:
        """Move each constrained request's matcher past the tokens it was given this step."""
        if self._matchers:
            for request_id, new_ids in token_ids.items():
                matcher = self._matchers.get(request_id)
                if matcher is not None:
                    matcher.consume(new_ids)

    def prune(self, drafts: dict[str, Draft]) -> dict[str, Draft]:
        """Drafts of constrained requests without the nodes that leave the grammar (verifying
        them would be wasted: their parent's mask rejects them anyway)."""
        if not self._matchers:
            return drafts
        pruned = {}
        for request_id, draft in drafts.items():
            matcher = self._matchers.get(request_id)
            if matcher is not None:
                draft = keep_valid(draft, matcher)
            if draft.num_tokens:
                pruned[request_id] = draft
        return pruned


def keep_valid(draft: Draft, matcher: GrammarMatcher) -> Draft:
    """The draft's nodes whose path stays in the grammar (a subtree: a node's parent is kept
    whenever it is), renumbered; draft probabilities follow their nodes."""
    if draft.is_chain:
        return draft.truncate(matcher.num_valid(draft.token_ids))
    valid = matcher.valid_nodes(draft.token_ids, draft.parents)
    if all(valid):
        return draft
    kept = [j for j, ok in enumerate(valid) if ok]
    new_index = {old: new for new, old in enumerate(kept)}
    parents = tuple(-1 if draft.parents[j] < 0 else new_index[draft.parents[j]] for j in kept)
    probs = draft.probs
    if probs is not None:
        probs = probs[torch.tensor(kept, dtype=torch.long)]
    return Draft(tuple(draft.token_ids[j] for j in kept), parents, probs)
