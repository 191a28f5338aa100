"""The model runner's own record of a request: what it was told once (`NewRequestData`) and the
tokens it has sampled since. The scheduler's `Request` is never handed to the runner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.outputs import NewRequestData
from engine.request import SamplingParams


@dataclass
class RunnerRequest:
    """One request as the runner sees it, kept from its first step until it finishes."""

    request_id: str  # whose
    prompt_token_ids: Sequence[int]  # the prompt
    sampling_params: SamplingParams  # how to sample
    output_token_ids: list[int] = field(default_factory=list)  # every token sampled for it, in
    #   order (the scheduler may stop it earlier: it is then finished and forgotten)

    @staticmethod
    def of(new: NewRequestData) -> RunnerRequest:
        return RunnerRequest(new.request_id, new.prompt_token_ids, new.sampling_params)
