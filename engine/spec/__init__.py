"""Speculative decoding: drafters propose tokens, the target model verifies them in one pass.

The verify stage (the V of XY-Serve's P/D/V): a request whose drafts are scheduled computes a
chunk of 1 + k tokens (its last sampled token, the "root", then the k draft nodes) in the same
token budget and the same attention launch as prefill chunks and decodes. Drafts form a tree:
`Draft.parents[j]` is the node that node j continues (-1 = the root), parents precede children,
and a chain is the tree whose node j continues node j - 1. Node j sits at position
root_position + depth(j); its K/V is written to the slot after the previous node's (so tree
siblings never share a slot) and the accepted path is moved into place after verification.

Modules: `types` (Draft, Drafter), `ngram` and `tree` (prompt lookup), `draft_model` (a small
model on the same device), `factory` (the drafter a config names), `adaptive` (how many drafts
pay: the scheduler's side), `verify` (the runner's side: rows of logits -> verdicts) and
`rejection` (the acceptance rules).
"""

from engine.spec.types import Draft, Drafter, DraftRequest

__all__ = ["Draft", "DraftRequest", "Drafter"]
