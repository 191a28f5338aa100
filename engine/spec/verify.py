"""The runner's side of a verify: logits of a chunk's draft rows -> accepted tokens.

A verify chunk of 1 + N tokens yields 1 + N rows of logits: row 0 (the root, the request's last
known token) predicts the token after it, row 1 + j predicts the token after draft node j. Each
row is processed exactly as a plain decode of the same sequence would be: logit bias, the
min_tokens mask and penalties see the request's outputs followed by the draft tokens on the path
to that node, so speculation never changes what a token's distribution is. Then greedy rows take
the argmax and sampled rows their final distribution, and `engine.spec.rejection` decides what
is accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from engine.outputs import ScheduledChunk, TokenLogprob
from engine.runner_state import RunnerRequest
from engine.sampler import Sampler, SamplingRow, process_logits, sampling_probs, token_logprobs
from engine.spec.rejection import Verdict, accept_greedy, accept_sampled
from engine.spec.types import Draft, JoinedTokens
from engine.structured.masks import GrammarMasks
from engine.token_tree import node_paths


@dataclass(frozen=True)
class VerifyResult:
    """What one verify chunk produced."""

    token_ids: tuple[int, ...]  # accepted draft tokens, then the bonus / correction token
    logprobs: tuple[TokenLogprob, ...] | None  # one per token, when the request asks
    path: tuple[int, ...]  # accepted draft node indices, root's child first


def chunk_draft(chunk: ScheduledChunk, probs: torch.Tensor | None) -> Draft:
    """The draft a verify chunk carries (its last num_draft_tokens tokens)."""
    n = chunk.num_draft_tokens
    return Draft(chunk.token_ids[-n:], chunk.draft_parents,
                 None if probs is None else probs[:n])


def verify(sampler: Sampler, logits: torch.Tensor, chunks: Sequence[ScheduledChunk],
           requests: Mapping[str, RunnerRequest], eos_token_ids: tuple[int, ...],
           draft_probs: Mapping[str, torch.Tensor],
           masks: GrammarMasks | None = None) -> list[VerifyResult]:
    """Accept or reject the drafts of `chunks` (verify chunks, in batch order).

    logits: (sum(1 + N_c), V), chunk c's 1 + N_c rows contiguous, root row first.
    draft_probs: request id -> (>= N_c, V) draft distribution for drafts sampled from one.
    masks: grammar masks of the rows of constrained requests (row 1 + j: after the path to
    draft node j). A draft token its grammar forbids has probability 0 in its parent's row, so
    it is never accepted, greedy or sampled; the bonus token is drawn from a masked row too.
    """
    rows: list[SamplingRow] = []
    drafts: list[Draft] = []
    for c in chunks:
        req = requests[c.request_id]
        draft = chunk_draft(c, draft_probs.get(c.request_id))
        drafts.append(draft)
        # row 0 continues the outputs; row 1 + j continues them with the path to node j
        # (joined, not copied: only penalties read the outputs, and only a few rows have them)
        histories = [()] + [tuple(draft.token_ids[i] for i in path)
                            for path in node_paths(draft.parents)]
        for history in histories:
            rows.append(SamplingRow(request_id=c.request_id, params=req.sampling_params,
                                    prompt_token_ids=req.prompt_token_ids,
                                    output_token_ids=JoinedTokens(req.output_token_ids, history),
                                    eos_token_ids=eos_token_ids))
    x = process_logits(logits, rows, masks)  # (R, V) float32
    verdicts: list[Verdict] = []
    chosen = torch.zeros(len(rows), dtype=torch.long)  # (R,) the token each used row emitted
    start = 0
    for draft in drafts:
        num_rows = 1 + draft.num_tokens
        block, params = x[start:start + num_rows], rows[start].params
        if params.greedy:
            verdict = accept_greedy(block.argmax(dim=-1).tolist(), draft)
        else:
            probs = sampling_probs(block, rows[start:start + num_rows])
            verdict = accept_sampled(probs, draft, sampler.generator_for(rows[start]))
        for row, token_id in zip(verdict.rows, verdict.token_ids, strict=True):
            chosen[start + row] = token_id
        verdicts.append(verdict)
        start += num_rows
    logprobs = token_logprobs(logits, rows, chosen)  # row -> TokenLogprob (rows asking only)
    results = []
    start = 0
    for draft, verdict in zip(drafts, verdicts, strict=True):
        lps = None
        if start in logprobs:
            lps = tuple(logprobs[start + row] for row in verdict.rows)
        results.append(VerifyResult(verdict.token_ids, lps, verdict.path))
        start += 1 + draft.num_tokens
    return results
