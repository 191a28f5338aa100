"""The drafter interface and the draft tree it returns."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.request import SamplingParams


@dataclass(frozen=True)
class Draft:
    """Proposed continuation of one request: a token tree in topological order.

    A chain of k tokens has parents (-1, 0, 1, ..., k - 2).
    """

    token_ids: tuple[int, ...]  # the draft nodes' tokens
    parents: tuple[int, ...]  # parent node index per node; -1 = the request's last token
    probs: Any = None  # torch.Tensor (num_nodes, vocab) float32: the draft distribution each
    #   node's token was sampled from (draft-model drafter on sampled requests), or None for a
    #   deterministic proposal (a point mass: the acceptance rule then uses p(x) alone)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.parents):
            raise ValueError("a draft needs one parent per token")
        for j, parent in enumerate(self.parents):
            if not -1 <= parent < j:
                raise ValueError(f"draft node {j}'s parent {parent} does not precede it")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_chain(self) -> bool:
        return all(parent == j - 1 for j, parent in enumerate(self.parents))

    def truncate(self, num_tokens: int) -> Draft:
        """The first num_tokens nodes: still a tree, since parents precede children."""
        if num_tokens >= self.num_tokens:
            return self
        probs = None if self.probs is None else self.probs[:num_tokens]
        return Draft(self.token_ids[:num_tokens], self.parents[:num_tokens], probs)

    @staticmethod
    def chain(token_ids: Sequence[int]) -> Draft:
        return Draft(tuple(token_ids), tuple(range(-1, len(token_ids) - 1)))


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter sees of one request."""

    request_id: str  # keys the drafter's per-request state (the draft model's KV cache)
    token_ids: Sequence[int]  # prompt + outputs, the newest sampled token last
    params: SamplingParams  # greedy requests get greedy drafts


class Drafter(Protocol):
    """Proposes drafts for requests about to decode. One engine thread calls it."""

    def propose(self, requests: Sequence[DraftRequest], max_num_tokens: int,
                ) -> Mapping[str, Draft]:
        """Up to max_num_tokens draft nodes per request; requests without a proposal are left
        out. A drafter that runs on the device launches its kernels inside the current step."""
        ...

    def free(self, request_ids: Iterable[str]) -> None:
        """Forget finished or preempted requests (unknown ids are ignored)."""
        ...
