"""Tree prompt lookup: several continuations of the suffix n-grams merged into one token tree.

Like lookahead decoding's n-gram pool, but drawn from the request's own tokens: every earlier
occurrence of a suffix n-gram (see `ngram.find_suffix_matches`) proposes the tokens that
followed it. The verify pass checks all of them at once, so when the latest match guesses
wrong an older one may still be accepted.

Branches. Matches are taken longest n first, then latest first within each n (so branch 0 is
exactly `NgramDrafter`'s chain); each proposes its next (up to) max_num_tokens tokens. A
continuation becomes a branch only if it adds a node to the trie built so far (it is not equal
to, nor a prefix of, an earlier branch's path), until num_branches branches are collected or
`scan_limit` matches were looked at (repetitive text has thousands of identical matches).
Shared prefixes are shared nodes; each node belongs to the first branch that created it.

Budget rule and node order. A node of branch rank r (0 = best) at depth d (1 = child of the
root) is ranked by (d + r, r): one step deeper costs as much as one rank worse, ties go to the
better branch. Nodes are listed in that order and the first max_num_tokens are kept. A node's
parent ranks strictly earlier (same branch one level up, or an earlier branch's node), so the
list is topological and every prefix of it, hence `Draft.truncate(n)`, is a tree: the n most
valuable nodes under this rule. The best branch is kept at least as deep as any other unless
it runs out of tokens (its depth-d node ranks before every other branch's node at depth >= d);
with a budget of 4 and three disjoint branches the depths are 3, 1, 0. Best-branch-first would
degenerate to the ngram chain whenever the latest match has max_num_tokens tokens after it,
which is nearly always, so the alternatives would never be verified.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.spec.ngram import PromptLookupDrafter, find_suffix_matches
from engine.spec.types import Draft


class _Trie:
    """Token trie under the request's last token; node i has a token, parent, depth, rank."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []  # -1 = the root (the request's last token)
        self.depths: list[int] = []  # 1 = child of the root
        self.ranks: list[int] = []  # the branch that created the node
        self._children: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def insert(self, path: Sequence[int], rank: int) -> bool:
        """Add path below the root; new nodes get `rank`. True if any node was new."""
        parent, added = -1, False
        for depth, token in enumerate(path, start=1):
            node = self._children.get((parent, token))
            if node is None:
                node = self._children[(parent, token)] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(depth)
                self.ranks.append(rank)
                added = True
            parent = node
        return added

    def to_draft(self, max_num_tokens: int) -> Draft:
        """The max_num_tokens best nodes, ordered by (depth + rank, rank) (module docstring)."""
        order = sorted(
            range(len(self.tokens)), key=lambda i: (self.depths[i] + self.ranks[i], self.ranks[i])
        )
        order = order[:max_num_tokens]
        new_index = {old: new for new, old in enumerate(order)}
        # every kept node's parent is kept and listed before it (it ranks strictly earlier)
        parents = tuple(-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in order)
        return Draft(tuple(self.tokens[i] for i in order), parents)


def build_tree(
    tokens: np.ndarray,
    ngram_min: int,
    ngram_max: int,
    num_branches: int,
    max_num_tokens: int,
    scan_limit: int,
) -> Draft | None:
    """The merged draft tree for one request's tokens, or None without a suffix match."""
    matches = find_suffix_matches(tokens, ngram_min, ngram_max)
    if not len(matches.ends):
        return None
    trie = _Trie()
    num_found = 0
    for scanned, end in enumerate(matches.best_first()):
        if scanned == scan_limit:
            break
        path = tokens[end + 1 : end + 1 + max_num_tokens].tolist()
        if trie.insert(path, rank=num_found):
            num_found += 1
            if num_found == num_branches:
                break
    return trie.to_draft(max_num_tokens)


class TreeDrafter(PromptLookupDrafter):
    """Prompt lookup drafter proposing a token tree of up to num_branches continuations.

    ngram_min..ngram_max bound the suffix n-gram lengths (longest first); num_branches caps the
    distinct continuations merged; scan_limit caps the matches examined per request and step
    (a host-time bound). Each draft has at most max_num_tokens nodes, best first (see the
    module docstring), probs None. With num_branches=1 it proposes NgramDrafter's chain.
    """

    def __init__(
        self, ngram_min: int, ngram_max: int, num_branches: int, *, scan_limit: int = 32
    ) -> None:
        super().__init__(ngram_min, ngram_max)
        if num_branches < 1:
            raise ValueError(f"num_branches must be at least 1, got {num_branches}")
        if scan_limit < num_branches:
            raise ValueError(f"scan_limit {scan_limit} must be at least num_branches")
        self.num_branches = num_branches
        self.scan_limit = scan_limit

    def draft_for(self, tokens: np.ndarray, max_num_tokens: int) -> Draft | None:
        return build_tree(tokens, self.ngram_min, self.ngram_max, self.num_branches,
                          max_num_tokens, self.scan_limit)
