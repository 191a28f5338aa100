"""Acceptance rules: which draft tokens a verify pass keeps, and the one token it adds.

A verify pass over a request's draft tree gives one target row per position: row 0 at the root
(the request's last real token), row 1 + j at draft node j. Row r's distribution is the target's
next-token distribution given the path from the root to r. Walking down the tree from the root,
each step either accepts one child of the current node and moves to that child's row, or emits a
token of its own and stops; so a verdict appends len(path) + 1 tokens.

Greedy requests (`accept_greedy`): accept the child whose token is the row's argmax; the token
after the last accepted node is that row's argmax (the "bonus"). Each appended token is the argmax
of the target given the tokens before it: exactly what plain greedy decoding would produce.

Sampled requests (`accept_sampled`): every appended token must be distributed exactly as the
target's row p given the tokens before it. At one node, with p the row's distribution:

- Deterministic drafts (point-mass proposals x_1, x_2, ... tried in node order). Accept x_1 with
  probability p(x_1); on rejection set p(x_1) = 0, renormalise, and go on with x_2 on that p; when
  no candidate is left, sample from the last p. Each round is an exact chain-rule step:
  P(token = x_1) = p(x_1), and given "not x_1" the token is distributed as p without x_1,
  renormalised, which is what the remaining rounds produce (induction on the rounds; the last
  round is a plain draw). So the token's distribution is p.
- Draft-model drafts (x_i sampled i.i.d. from q, the draft distribution at this node). Accept x_i
  with probability min(1, p(x_i) / q(x_i)); on rejection replace p by the residual
  normalise(max(0, p - q)) and go on with x_{i+1}. One round emits x with probability
  q(x) min(1, p(x)/q(x)) = min(p, q)(x) and rejects with probability
  1 - sum(min(p, q)) = sum(max(0, p - q)); so if the later rounds produce the residual exactly,
  the token is distributed as min(p, q) + max(0, p - q) = p (Leviathan et al. 2023 for one
  candidate; SpecInfer's multi-step speculative sampling for siblings, which holds because
  x_{i+1} is drawn independently of the rejected rounds).

Either way, once child x is accepted the next token comes from x's row, the target given the path
through x: by the chain rule the appended sequence is distributed as plain sampling from the
target would produce it, and so is every prefix of it (the caller may cut a verdict at a stop
token or max_tokens). Degenerate inputs keep the rule well defined: a residual without mass (p <= q
everywhere, which only rounding allows) leaves p as it was, and q(x) = 0 accepts x iff p(x) > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.spec.types import Draft


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one request's draft tree."""

    path: tuple[int, ...]  # accepted draft node indices, root to leaf (the root's child first)
    token_ids: tuple[int, ...]  # tokens to append: the path's draft tokens, then one bonus or
    #   correction token; len(path) + 1
    rows: tuple[int, ...]  # per appended token, the verify row whose distribution produced it:
    #   0 = the root, 1 + j = draft node j; i.e. (0, 1 + path[0], ..., 1 + path[-1])


def accept_greedy(target_token_ids: Sequence[int], draft: Draft) -> Verdict:
    """The longest path of draft tokens that greedy decoding would produce, plus one token.

    target_token_ids: the argmax of each verify row, len 1 + draft.num_tokens (row 0 = the root,
    row 1 + j = node j). From the root, moves to the first child (in node order) whose token is
    the current row's target; stops at a node without one and appends that row's target.
    """
    if len(target_token_ids) != 1 + draft.num_tokens:
        raise ValueError(f"need {1 + draft.num_tokens} target tokens, got {len(target_token_ids)}")
    children = _children(draft)
    path: list[int] = []
    node = -1  # the root
    while True:
        target = target_token_ids[node + 1]
        match = [c for c in children[node + 1] if draft.token_ids[c] == target]
        if not match:
            return _verdict(draft, path, target)
        node = match[0]
        path.append(node)


def accept_sampled(probs: torch.Tensor, draft: Draft, generator: torch.Generator) -> Verdict:
    """Rejection sampling over the draft tree; the appended tokens are distributed exactly as
    sampling from the target one token at a time (see the module docstring).

    probs: (1 + N, V) float32, N = draft.num_tokens: the target's sampling
    distribution at each verify row (`sampler.sampling_probs`); rows sum to 1 and may hold
    zeros. draft.probs, when set: (N, V) on the same device, the distribution q each node's
    token was sampled from (siblings drawn independently). Every uniform draw comes from
    `generator` (a CPU generator), so a seeded request stays reproducible.
    """
    if probs.dim() != 2 or probs.shape[0] != 1 + draft.num_tokens:
        raise ValueError(f"probs must be (1 + {draft.num_tokens}, V), got {tuple(probs.shape)}")
    children = _children(draft)
    path: list[int] = []
    node = -1  # the root
    while True:
        p = probs[node + 1]  # (V,) the target at this node, unnormalised from here on
        total = _mass(p)
        for child in children[node + 1]:
            x = draft.token_ids[child]
            px = float(p[x]) / total
            if draft.probs is None:  # point mass at x: accept with p(x)
                accept = px
            else:  # x ~ q: accept with min(1, p(x) / q(x))
                q = draft.probs[child].to(torch.float64)  # (V,)
                qx = float(q[x])
                accept = 0.0 if px <= 0.0 else 1.0 if px >= qx else px / qx
            if _uniform(generator) < accept:
                path.append(child)
                node = child
                break
            if draft.probs is None:  # rejected: p <- p without x
                residual = p.index_fill(0, torch.tensor([x], device=p.device), 0.0)  # (V,)
            else:  # rejected: p <- max(0, p - q)
                residual = (p.to(torch.float64) / total - q).clamp_(min=0.0)  # (V,)
            if (residual_mass := _mass(residual)) > 0.0:  # else p <= q everywhere (rounding)
                p, total = residual, residual_mass
        else:  # a leaf, or every child rejected: the last token comes from what is left of p
            return _verdict(draft, path, _draw(p, generator))


def _children(draft: Draft) -> list[list[int]]:
    """children[1 + j] = the child nodes of node j in node order; children[0] = the root's."""
    children: list[list[int]] = [[] for _ in range(1 + draft.num_tokens)]
    for j, parent in enumerate(draft.parents):
        children[parent + 1].append(j)
    return children


def _verdict(draft: Draft, path: list[int], last_token: int) -> Verdict:
    tokens = (*(draft.token_ids[j] for j in path), last_token)
    return Verdict(tuple(path), tokens, (0, *(j + 1 for j in path)))


def _mass(p: torch.Tensor) -> float:
    """sum(p) of a (V,) vector, accumulated in float64."""
    return float(p.sum(dtype=torch.float64))


def _draw(p: torch.Tensor, generator: torch.Generator) -> int:
    """Token t with probability p[t] / sum(p): an inverse-CDF draw on the float64 cdf of p (V,).

    Zero-probability tokens own empty intervals, so they are never drawn; if rounding puts the
    target at or past the total, the last token with mass is taken (as `sampler._search`).
    """
    cdf = p.to(torch.float64).cumsum(dim=0)  # (V,)
    target = _uniform(generator) * float(cdf[-1])
    return min(int(torch.searchsorted(cdf, target, right=True)), int(cdf.argmax()))


def _uniform(generator: torch.Generator) -> float:
    """One u ~ U[0, 1) in float64: u < a happens with probability a."""
    return float(torch.rand((), dtype=torch.float64, generator=generator))
