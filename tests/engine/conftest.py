"""Factories for scheduler and KV-cache tests: requests, schedulers and fake model outputs.

No model and no torch: a "model step" is a dict giving each sampled chunk a token.
Tests reach these through fixtures (`make_request`, `make_scheduler`, `fake_model_output`,
`run_step`), so no test imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest

from engine.config import SchedulerConfig
from engine.outputs import ModelOutput, SchedulerOutput, TokenLogprob, TokenUpdate
from engine.request import Request, SamplingParams
from engine.scheduler import Scheduler

EOS_TOKEN_ID = 2  # the fake model's EOS
DEFAULT_SAMPLED_TOKEN_ID = 7  # what the fake model samples unless told otherwise
PROMPT_TOKEN_BASE = 1000  # prompt token k is PROMPT_TOKEN_BASE + k (never EOS, never sampled)

TokensSpec = Mapping[str, int | Sequence[int]]  # request id -> one token or a run of tokens


# What the fixtures hand out (tests spell these as `Callable[..., X]`: they import nothing here).
MakeRequest = Callable[..., Request]
MakeScheduler = Callable[..., Scheduler]
FakeModelOutput = Callable[..., ModelOutput]
RunStep = Callable[..., tuple[SchedulerOutput, list[TokenUpdate]]]


def _make_request(
    request_id: str,
    num_prompt_tokens: int,
    max_tokens: int | None = 16,
    *,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    stop_token_ids: tuple[int, ...] = (),
    logprobs: int | None = None,
    eos_token_id: int | None = EOS_TOKEN_ID,
    prompt_token_ids: list[int] | None = None,
) -> Request:
    if prompt_token_ids is None:
        prompt_token_ids = [PROMPT_TOKEN_BASE + k for k in range(num_prompt_tokens)]
    assert len(prompt_token_ids) == num_prompt_tokens
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        stop_token_ids=stop_token_ids,
        logprobs=logprobs,
    )
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=params,
        arrival_time=0.0,
        eos_token_id=eos_token_id,
    )


def _make_scheduler(
    *,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    num_kv_blocks: int = 64,
    block_size: int = 4,
    max_model_len: int = 256,
    policy: str = "token_budget",
    enable_prefix_caching: bool = False,
    mixed_prefill_budget: int | None = None,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        policy=policy,  # type: ignore[arg-type]
        mixed_prefill_budget=mixed_prefill_budget,
    )
    return Scheduler(config, num_kv_blocks, block_size, max_model_len,
                     enable_prefix_caching=enable_prefix_caching)


def _fake_model_output(
    scheduler_output: SchedulerOutput,
    tokens: TokensSpec | None = None,
    *,
    default_token_id: int = DEFAULT_SAMPLED_TOKEN_ID,
    with_logprobs: bool = False,
) -> ModelOutput:
    """Give every chunk with `sample=True` `tokens[id]` (default: one `default_token_id`).

    With `with_logprobs`, token k of a request gets logprob `-k - 0.5` (distinct, checkable).
    """
    tokens = tokens or {}
    sampled: dict[str, tuple[int, ...]] = {}
    for chunk in scheduler_output.chunks:
        if not chunk.sample:
            continue
        spec = tokens.get(chunk.request_id, default_token_id)
        sampled[chunk.request_id] = (spec,) if isinstance(spec, int) else tuple(spec)
    logprobs: dict[str, tuple[TokenLogprob, ...]] = {}
    if with_logprobs:
        for request_id, token_ids in sampled.items():
            logprobs[request_id] = tuple(
                TokenLogprob(token_id=t, logprob=-k - 0.5, rank=1) for k, t in enumerate(token_ids)
            )
    return ModelOutput(sampled_token_ids=sampled, logprobs=logprobs)


def _run_step(
    scheduler: Scheduler,
    tokens: TokensSpec | None = None,
    *,
    default_token_id: int = DEFAULT_SAMPLED_TOKEN_ID,
    with_logprobs: bool = False,
) -> tuple[SchedulerOutput, list[TokenUpdate]]:
    """schedule() -> fake model -> update_from_output(); returns both halves."""
    scheduler_output = scheduler.schedule()
    model_output = _fake_model_output(
        scheduler_output, tokens, default_token_id=default_token_id, with_logprobs=with_logprobs
    )
    return scheduler_output, scheduler.update_from_output(scheduler_output, model_output)


@pytest.fixture
def make_request() -> MakeRequest:
    return _make_request


@pytest.fixture
def make_scheduler() -> MakeScheduler:
    return _make_scheduler


@pytest.fixture
def fake_model_output() -> FakeModelOutput:
    return _fake_model_output


@pytest.fixture
def run_step() -> RunStep:
    return _run_step


@pytest.fixture
def eos_token_id() -> int:
    return EOS_TOKEN_ID
