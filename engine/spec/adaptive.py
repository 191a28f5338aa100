"""How many draft tokens still pay: the scheduler's speculation policy, pure Python.

A draft token costs one verify token of the step's budget (compute on the device) whether or not
it is accepted. In a chain with per-position acceptance rate a, draft position i (1-based) is
reached and accepted with probability ~a**i, so it is worth its verify token only while
a**i >= min_acceptance: the fraction of a token a verify token must earn back. A request whose
rate falls below min_acceptance stops speculating (0 drafts); its estimate drifts back toward
the prior on every step without drafts, so it tries again (with one draft) after a while, and
a workload that changes character is noticed.

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


def num_drafts_worth(acceptance: float, min_acceptance: float, max_num_drafts: int) -> int:
    """The most draft positions i <= max_num_drafts with acceptance**i >= min_acceptance."""
    if max_num_drafts <= 0 or acceptance < min_acceptance or acceptance <= 0.0:
        return 0
    if acceptance >= 1.0 or min_acceptance <= 0.0:
        return max_num_drafts
    return min(max_num_drafts, int(math.log(min_acceptance) / math.log(acceptance) + 1e-9))


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
                     max_model_len: int, room: int) -> Draft | None:
    """The part of `draft` worth verifying this step: as many nodes as the request's measured
    acceptance pays for, within `room` budget tokens, and no more than max_tokens and
    max_model_len leave room for (the accepted drafts plus the bonus token must fit)."""
    if draft is None:
        record_no_drafts(request)  # (the runner proposes nothing while drafts do not pay)
        return None
    limit = max_model_len - request.num_tokens - 1
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None:
        limit = min(limit, max_tokens - request.num_output_tokens - 1)
    worth = num_drafts_worth(request.spec_acceptance, config.spec_min_acceptance,
                             min(draft.num_tokens, config.num_speculative_tokens))
    num_drafts = min(worth, limit, room)
    if num_drafts <= 0:
        record_no_drafts(request)
        return None
    return draft.truncate(num_drafts)
