"""How many draft tokens still pay: the scheduler's speculation policy, pure Python.

A step of B decoding requests costs about T0 + B t: a fixed part (reading the weights) and a part
per token; a draft token costs one more t whether or not it is accepted, and an accepted one is
worth a request's share of a step, (T0 + B t) / B. With c = t / T0 (SpeculativeConfig's
spec_token_cost), a draft token pays while its acceptance probability is at least
B c / (1 + B c): small batches (memory-bound, t << T0) speculate freely, large batches (compute
bound) only when acceptance is high, so the whole batch stops speculating when it would lose. In
a chain with per-position acceptance rate a, draft position i (1-based) is reached and accepted
with probability ~a**i: it is verified while a**i is above that threshold. A request whose rate
falls below it stops speculating (0 drafts); its estimate drifts back toward the prior on every
step without drafts, so it tries again (with one draft) after a while, and a workload that
changes character is noticed.

The rate is a moving average of accepted / tested positions per verify: with m drafts accepted
out of n scheduled, positions 1 .. min(m + 1, n) were tested and m of them passed (positions past
the first rejection say nothing).
"""

from __future__ import annotations

import math

from engine.config import SpeculativeConfig
from engine.request import SPEC_ACCEPTANCE_PRIOR, Request
from engine.spec.types import Draft

EMA_WEIGHT = 0.3  # weight of the newest verify in the acceptance moving average
RECOVERY_RATE = 0.01  # per step without drafts, the estimate moves this fraction to the prior
#   (from 0.1 back over a 0.2 threshold in ~18 steps: one probe draft per ~20 decodes)


def acceptance_threshold(batch_size: int, token_cost: float) -> float:
    """The acceptance probability a draft token needs to pay, with batch_size decoding."""
    cost = max(batch_size, 1) * token_cost
    return cost / (1.0 + cost)


def num_drafts_worth(acceptance: float, min_acceptance: float, max_num_drafts: int) -> int:
    """The most draft positions i <= max_num_drafts with acceptance**i >= min_acceptance."""
    if max_num_drafts <= 0 or acceptance < min_acceptance or acceptance <= 0.0:
        return 0
    if acceptance >= 1.0 or min_acceptance <= 0.0:
        return max_num_drafts
    return min(max_num_drafts, int(math.log(min_acceptance) / math.log(acceptance) + 1e-9))


def drafts_worth(request: Request, config: SpeculativeConfig, batch_size: int,
                 max_num_drafts: int) -> int:
    """How many draft positions (at most max_num_drafts) `request`'s measured acceptance pays
    for with batch_size requests decoding: what the runner asks a drafter for and the scheduler
    verifies."""
    threshold = acceptance_threshold(batch_size, config.spec_token_cost)
    return num_drafts_worth(request.spec_acceptance, threshold, max_num_drafts)


def record_verify(request: Request, num_drafts: int, num_accepted: int) -> None:
    """Fold one verify's outcome (num_accepted of num_drafts along the accepted path) into the
    request's acceptance estimate."""
    tested = min(num_accepted + 1, num_drafts)
    if tested <= 0:
        return
    rate = num_accepted / tested
    request.spec_acceptance += EMA_WEIGHT * (rate - request.spec_acceptance)


def record_no_drafts(request: Request) -> None:
    """A decode step without drafts: let the estimate recover toward the prior."""
    request.spec_acceptance += RECOVERY_RATE * (SPEC_ACCEPTANCE_PRIOR - request.spec_acceptance)


def drafts_to_verify(request: Request, draft: Draft | None, config: SpeculativeConfig,
                     max_model_len: int, room: int, batch_size: int) -> Draft | None:
    """The part of `draft` worth verifying this step: as many nodes as the request's measured
    acceptance pays for with batch_size requests decoding, within `room` budget tokens, and no
    more than max_tokens and max_model_len leave room for (the accepted drafts plus the bonus
    token must fit)."""
    if draft is None:
        record_no_drafts(request)  # (the runner proposes nothing while drafts do not pay)
        return None
    limit = max_model_len - request.num_tokens - 1
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None:
        limit = min(limit, max_tokens - request.num_output_tokens - 1)
    worth = drafts_worth(request, config, batch_size,
                         min(draft.num_tokens, config.num_speculative_tokens))
    num_drafts = min(worth, limit, room)
    if num_drafts <= 0:
        record_no_drafts(request)
        return None
    return draft.truncate(num_drafts)
