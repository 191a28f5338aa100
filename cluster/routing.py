"""Routers: which replica of a cluster takes an arriving request, as production routers decide.

- `round-robin`: replicas in turn (vLLM production-stack's and SGLang router's simplest policy).
- `least-loaded`: the replica with the fewest outstanding tokens (prompt tokens not yet computed
  plus tokens still to generate, of every request it holds): Splitwise-sim's token JSQ, what
  "least outstanding requests" becomes when requests differ in size.
- `prefix-aware`: the replica whose KV cache holds the longest prefix of the prompt, among the
  replicas whose load is within a bound of the least loaded (SGLang's cache-aware router: cache
  affinity while the load is balanced, the shortest queue otherwise; its default `cache_threshold`
  0.5 and `balance_rel_threshold` ~1.1 are our defaults, its `balance_abs_threshold` of 32
  requests is expressed in tokens here). The simulation reads each replica's actual prefix cache
  (SGLang's router keeps an approximate copy of it).

A router sees replicas through `ReplicaView` (two questions: its load, its cached prefix), so the
tests hand it constructed states and the cluster hands it engines.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from engine.kv_cache import BlockHash, hash_blocks

RouterPolicy = Literal["round-robin", "least-loaded", "prefix-aware"]
ROUTER_POLICIES: tuple[RouterPolicy, ...] = ("round-robin", "least-loaded", "prefix-aware")


class ReplicaView(Protocol):
    """What a router may ask of a replica."""

    def outstanding_tokens(self) -> int:
        """Prompt tokens not yet computed plus tokens still to generate, over its requests."""
        ...

    def cached_prefix_tokens(self, prompt: PromptKey) -> int:
        """Tokens at the start of `prompt` whose KV its prefix cache holds (whole blocks)."""
        ...


@dataclass(frozen=True)
class PromptKey:
    """A prompt as routers see it: its length and the chained hashes of its full blocks (the
    same hashes the KV cache keys its blocks by, so a lookup is exact)."""

    num_tokens: int  # prompt length
    block_size: int  # tokens per block the hashes cover
    block_hashes: tuple[BlockHash, ...]  # one per full block, chained from the first

    @staticmethod
    def of(token_ids: Sequence[int], block_size: int) -> PromptKey:
        return PromptKey(len(token_ids), block_size,
                         tuple(hash_blocks(None, token_ids, block_size)))


@dataclass(frozen=True)
class RouterConfig:
    """Which policy routes arrivals, and the prefix-aware policy's bounds."""

    policy: RouterPolicy = "round-robin"
    # prefix-aware: a replica may take a request for its cache only while its load is at most
    # balance_rel x the least load + balance_abs_tokens (SGLang: both thresholds must be
    # exceeded before it falls back to the shortest queue)
    balance_rel: float = 1.1
    balance_abs_tokens: int = 8192  # ~ SGLang's 32 requests of a few hundred tokens
    cache_threshold: float = 0.5  # prefix-aware: the cached share of the prompt that counts as
    #   a hit; below it the request goes to the least loaded replica (SGLang's default)

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"router must be one of {', '.join(ROUTER_POLICIES)}, got "
                             f"{self.policy!r}")
        if self.balance_rel < 1.0 or self.balance_abs_tokens < 0:
            raise ValueError("prefix-aware bounds: balance_rel >= 1 and balance_abs_tokens >= 0")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")


class Router:
    """Chooses a replica index for each request; stateful only for round-robin's turn."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._turn = itertools.count()

    def choose(self, replicas: Sequence[ReplicaView], prompt: PromptKey | None = None) -> int:
        """The index of the replica that takes the request (`prompt` is needed by
        prefix-aware only)."""
        if len(replicas) == 1:
            return 0
        policy = self.config.policy
        if policy == "round-robin":
            return next(self._turn) % len(replicas)
        loads = [r.outstanding_tokens() for r in replicas]
        if policy == "least-loaded" or prompt is None:
            return least_loaded(loads)
        return self._prefix_aware(replicas, loads, prompt)

    def _prefix_aware(self, replicas: Sequence[ReplicaView], loads: list[int],
                      prompt: PromptKey) -> int:
        bound = min(loads) * self.config.balance_rel + self.config.balance_abs_tokens
        best, best_key = -1, (0, 0)
        for i, (replica, load) in enumerate(zip(replicas, loads, strict=True)):
            if load > bound:
                continue  # too busy to take work for its cache
            key = (replica.cached_prefix_tokens(prompt), -load)  # longest prefix, then lighter
            if key[0] > 0 and (best < 0 or key > best_key):
                best, best_key = i, key
        if best >= 0 and best_key[0] >= self.config.cache_threshold * prompt.num_tokens:
            return best
        return least_loaded(loads)


def least_loaded(loads: Sequence[int]) -> int:
    """The index of the smallest load (the first of equals)."""
    return min(range(len(loads)), key=loads.__getitem__)
