"""The drafter interface and the draft tree it returns."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, overload

from engine import token_tree
from engine.request import SamplingParams


@dataclass(frozen=True)
class Draft:
    """Proposed continuation of one request: a token tree (engine.token_tree)."""

    token_ids: tuple[int, ...]  # the draft nodes' tokens
    parents: tuple[int, ...]  # parent node index per node; -1 = the request's last token
    probs: Any = None  # torch.Tensor (num_nodes, vocab) float32: the draft distribution each
    #   node's token was sampled from (draft-model drafter on sampled requests), or None for a
    #   deterministic proposal (a point mass: the acceptance rule then uses p(x) alone)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.parents):
            raise ValueError("a draft needs one parent per token")
        token_tree.check_parents(self.parents)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_chain(self) -> bool:
        return token_tree.is_chain(self.parents)

    def truncate(self, num_tokens: int) -> Draft:
        """The first num_tokens nodes: still a tree, since parents precede children."""
        if num_tokens >= self.num_tokens:
            return self
        probs = None if self.probs is None else self.probs[:num_tokens]
        return Draft(self.token_ids[:num_tokens], self.parents[:num_tokens], probs)

    @staticmethod
    def chain(token_ids: Sequence[int]) -> Draft:
        return Draft(tuple(token_ids), token_tree.chain_parents(len(token_ids)))


class JoinedTokens(Sequence[int]):
    """Token lists read as one sequence without copying them (prompt + outputs + the tokens
    sampled this step): drafters are handed every decoding request's whole sequence each step,
    and the n-gram drafters only read what they have not seen yet. The parts must not change
    while it is read."""

    def __init__(self, *parts: Sequence[int]) -> None:
        self._parts = parts
        self._len = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self._parts)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step != 1:
                return list(self)[index]
            out: list[int] = []
            offset = 0
            for part in self._parts:  # each part's overlap with [start, stop)
                lo, hi = max(start - offset, 0), min(stop - offset, len(part))
                if lo < hi:
                    out.extend(part[lo:hi])
                offset += len(part)
            return out
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("token index out of range")
        for part in self._parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise AssertionError("unreachable")


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
