"""The token-budget scheduler, driven with fake model outputs (no model, no torch)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

import native_build
from engine.config import SchedulerConfig, SpeculativeConfig
from engine.decode_walks import walks
from engine.outputs import ModelOutput, SchedulerOutput, TokenLogprob, TokenUpdate
from engine.request import FinishReason, Request, RequestStatus
from engine.scheduler import Scheduler
from engine.stats import SchedulerStats

MakeRequest = Callable[..., Request]
MakeScheduler = Callable[..., Scheduler]
FakeModelOutput = Callable[..., ModelOutput]
RunStep = Callable[..., tuple[SchedulerOutput, list[TokenUpdate]]]

EOS = 2  # the conftest fake model's EOS
SAMPLED = 7  # the conftest fake model's default token


def _shape(scheduler_output: SchedulerOutput) -> list[tuple[str, int, int]]:
    """Chunks as (request id, start_pos, num_tokens), the thing most tests assert on."""
    return [(c.request_id, c.start_pos, c.num_tokens) for c in scheduler_output.chunks]


def _prompt(num_tokens: int, base: int = 1000) -> tuple[int, ...]:
    return tuple(range(base, base + num_tokens))


@pytest.fixture(params=["C", "Python"])
def decode_walks(request: pytest.FixtureRequest) -> Iterator[str]:
    """The scheduler's decode-row walks in C (engine.decode_walks), or in Python (native code
    off) for the test's whole run."""
    if request.param == "Python":
        with native_build.disabled():
            assert walks() is None
            yield request.param
        return
    if walks() is None:
        pytest.skip("no C compiler here: the decode walks run in Python")
    yield request.param


# ---------------------------------------------------------------- add_request validation


def test_empty_scheduler_schedules_nothing(make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler()
    assert scheduler.schedule() == SchedulerOutput(chunks=())
    assert not scheduler.has_unfinished_requests()


def test_add_request_queues_fcfs(make_scheduler: MakeScheduler, make_request: MakeRequest) -> None:
    scheduler = make_scheduler()
    for request_id in ("a", "b", "c"):
        scheduler.add_request(make_request(request_id, 4))
    assert [r.request_id for r in scheduler.waiting] == ["a", "b", "c"]
    assert scheduler.num_waiting == 3
    assert scheduler.num_running == 0
    assert scheduler.has_unfinished_requests()


@pytest.mark.parametrize(
    ("num_prompt_tokens", "max_tokens", "message"),
    [
        (0, 16, "prompt is empty"),
        (256, None, "prompt has 256 tokens, max_model_len is 256"),
        (300, 1, "prompt has 300 tokens, max_model_len is 256"),
        (250, 7, "prompt has 250 tokens and max_tokens is 7, together more than max_model_len 256"),
    ],
)
def test_add_request_rejects_bad_lengths(
    make_scheduler: MakeScheduler,
    make_request: MakeRequest,
    num_prompt_tokens: int,
    max_tokens: int | None,
    message: str,
) -> None:
    scheduler = make_scheduler(max_model_len=256)
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(make_request("a", num_prompt_tokens, max_tokens))
    assert scheduler.num_waiting == 0
    assert scheduler.requests == {}


def test_add_request_accepts_exactly_max_model_len(
    make_scheduler: MakeScheduler, make_request: MakeRequest
) -> None:
    scheduler = make_scheduler(max_model_len=256)
    scheduler.add_request(make_request("a", 250, 6))
    scheduler.add_request(make_request("b", 255, None))
    assert scheduler.num_waiting == 2


def test_add_request_rejects_what_the_pool_can_never_hold(
    make_scheduler: MakeScheduler, make_request: MakeRequest
) -> None:
    scheduler = make_scheduler(num_kv_blocks=4, block_size=4, max_model_len=256)
    with pytest.raises(ValueError, match="up to 17 tokens need 5 KV blocks, the pool has 4"):
        scheduler.add_request(make_request("a", 10, 7))
    # max_tokens=None: bounded only by max_model_len (256 tokens = 64 blocks).
    with pytest.raises(ValueError, match="up to 256 tokens need 64 KV blocks, the pool has 4"):
        scheduler.add_request(make_request("b", 10, None))
    scheduler.add_request(make_request("c", 10, 6))  # 16 tokens = the whole pool: fine
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_add_request_rejects_duplicate_id(
    make_scheduler: MakeScheduler, make_request: MakeRequest
) -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4))
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        scheduler.add_request(make_request("a", 8))
    assert scheduler.num_waiting == 1
    assert scheduler.requests["a"].num_prompt_tokens == 4


# ---------------------------------------------------------------- chunking and order


def test_long_prompt_is_chunked_across_steps(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32, block_size=16, num_kv_blocks=16)
    request = make_request("a", 100, 4)
    scheduler.add_request(request)
    expected = [  # (start_pos, num_tokens, num_blocks, sample)
        (0, 32, 2, False),
        (32, 32, 4, False),
        (64, 32, 6, False),
        (96, 4, 7, True),
    ]
    for start_pos, num_tokens, num_blocks, sample in expected:
        out, updates = run_step(scheduler)
        (chunk,) = out.chunks
        assert (chunk.start_pos, chunk.num_tokens, len(chunk.block_ids), chunk.sample) == (
            start_pos,
            num_tokens,
            num_blocks,
            sample,
        )
        assert chunk.token_ids == _prompt(100)[start_pos : start_pos + num_tokens]
        assert chunk.block_ids == tuple(range(num_blocks))
        assert request.num_computed_tokens == start_pos + num_tokens
        expected_updates = [TokenUpdate("a", (SAMPLED,), None, None)] if sample else []
        assert updates == expected_updates
    # Then a decode: one token, the one just sampled, at position 100.
    out, _ = run_step(scheduler)
    assert _shape(out) == [("a", 100, 1)]
    assert out.chunks[0].token_ids == (SAMPLED,)
    assert out.chunks[0].sample
    assert request.output_token_ids == [SAMPLED, SAMPLED]


def test_running_before_waiting_and_decodes_before_new_prefill(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    # (prefills beside decodes may take the whole budget here; the default cap is tested below)
    scheduler = make_scheduler(max_num_batched_tokens=10, mixed_prefill_budget=10)
    scheduler.add_request(make_request("a", 25))
    assert _shape(run_step(scheduler)[0]) == [("a", 0, 10)]
    scheduler.add_request(make_request("b", 5))
    # a's prefill continues and takes the whole budget; b is not admitted.
    assert _shape(run_step(scheduler)[0]) == [("a", 10, 10)]
    assert scheduler.num_waiting == 1
    # a's last chunk leaves 5 tokens: b is admitted behind it.
    assert _shape(run_step(scheduler)[0]) == [("a", 20, 5), ("b", 0, 5)]
    assert _shape(run_step(scheduler)[0]) == [("a", 25, 1), ("b", 5, 1)]
    scheduler.add_request(make_request("c", 30))
    # Both decodes first, then c's prefill gets what is left of the budget.
    out, _ = run_step(scheduler)
    assert _shape(out) == [("a", 26, 1), ("b", 6, 1), ("c", 0, 8)]
    assert out.num_scheduled_tokens == 10


def test_mixed_prefill_budget_caps_prefill_only_beside_decodes(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32, mixed_prefill_budget=6)
    scheduler.add_request(make_request("a", 40))
    # Nobody decodes: the prompt takes the whole budget.
    assert _shape(run_step(scheduler)[0]) == [("a", 0, 32)]
    scheduler.add_request(make_request("b", 3))
    assert _shape(run_step(scheduler)[0]) == [("a", 32, 8), ("b", 0, 3)]
    scheduler.add_request(make_request("c", 20))
    scheduler.add_request(make_request("d", 20))
    # Two decodes: the prefills that follow (c, then d) share 6 tokens, not the 30 left.
    assert _shape(run_step(scheduler)[0]) == [("a", 40, 1), ("b", 3, 1), ("c", 0, 6)]
    out, _ = run_step(scheduler)
    assert _shape(out) == [("a", 41, 1), ("b", 4, 1), ("c", 6, 6)]
    assert out.num_scheduled_tokens == 8
    # A running prompt's next chunk counts against the cap as an admitted one does.
    scheduler.abort_requests(["a", "b"])
    assert _shape(run_step(scheduler)[0]) == [("c", 12, 8), ("d", 0, 20)]
    assert _shape(run_step(scheduler)[0]) == [("c", 20, 1), ("d", 20, 1)]


def test_prefill_beside_decodes_takes_half_the_budget_by_default(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32)
    scheduler.add_request(make_request("a", 4))
    assert _shape(run_step(scheduler)[0]) == [("a", 0, 4)]
    scheduler.add_request(make_request("b", 40))
    # one decode: b gets 16 tokens (half of 32), not the 31 left
    assert _shape(run_step(scheduler)[0]) == [("a", 4, 1), ("b", 0, 16)]
    assert scheduler.config.mixed_prefill_cap == 16
    assert make_scheduler(max_num_batched_tokens=1).config.mixed_prefill_cap == 1


def test_max_num_seqs_caps_running(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for request_id in ("a", "b", "c"):
        scheduler.add_request(make_request(request_id, 4, 2))
    out, _ = run_step(scheduler)
    assert _shape(out) == [("a", 0, 4), ("b", 0, 4)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    out, updates = run_step(scheduler)  # a and b sample their 2nd token and finish
    assert _shape(out) == [("a", 4, 1), ("b", 4, 1)]
    assert [u.finish_reason for u in updates] == [FinishReason.LENGTH, FinishReason.LENGTH]
    out, _ = run_step(scheduler)
    assert _shape(out) == [("c", 0, 4)]
    assert out.finished_ids == ("a", "b")


def test_admission_is_fcfs_no_skipping_ahead(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(num_kv_blocks=6, block_size=4)
    scheduler.add_request(make_request("a", 12, 10))  # 3 blocks now, up to 6
    scheduler.add_request(make_request("b", 16, 4))  # 4 blocks: does not fit beside a
    scheduler.add_request(make_request("c", 4, 4))  # 1 block: would fit, but b is first
    for step in range(10):
        out, updates = run_step(scheduler)
        assert _shape(out) == [("a", 0, 12)] if step == 0 else [("a", 11 + step, 1)]
        assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    assert updates[0].finish_reason == FinishReason.LENGTH  # a's 10th token
    out, _ = run_step(scheduler)
    assert _shape(out) == [("b", 0, 16), ("c", 0, 4)]


# ---------------------------------------------------------------- preemption


def test_preemption_takes_the_tail_which_resumes_with_outputs_kept(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(num_kv_blocks=4, block_size=4)
    a = make_request("a", 4, 8)
    b = make_request("b", 4, 8, prompt_token_ids=list(range(2000, 2004)))
    scheduler.add_request(a)
    scheduler.add_request(b)
    tokens = {"a": 11, "b": 22}
    # Steps 1-5: prompts then 4 decodes; both hold 2 blocks (positions 0..7), the pool is full.
    for _ in range(5):
        out, _ = run_step(scheduler, tokens)
        assert out.preempted_ids == ()
    assert scheduler.num_free_blocks == 0
    assert (a.num_output_tokens, b.num_output_tokens) == (5, 5)

    # Step 6: a's position 8 needs a 3rd block; b, the latest admitted, is preempted.
    out, _ = run_step(scheduler, tokens)
    assert _shape(out) == [("a", 8, 1)]
    assert out.preempted_ids == ("b",)
    assert b.status == RequestStatus.PREEMPTED
    assert (b.num_computed_tokens, b.block_ids, b.num_preemptions) == (0, (), 1)
    assert b.output_token_ids == [22] * 5
    assert list(scheduler.waiting) == [b]
    assert scheduler.num_preemptions == 1

    # Steps 7-8: b's 9-token recompute needs 3 blocks, only 1 is free; a finishes.
    for _ in range(2):
        out, updates = run_step(scheduler, tokens)
        assert [c.request_id for c in out.chunks] == ["a"]
    assert updates == [TokenUpdate("a", (11,), None, FinishReason.LENGTH)]

    # Step 9: b recomputes prompt + its 5 outputs in one chunk and samples its 6th token.
    out, updates = run_step(scheduler, tokens)
    assert _shape(out) == [("b", 0, 9)]
    assert out.chunks[0].token_ids == (2000, 2001, 2002, 2003, 22, 22, 22, 22, 22)
    assert out.chunks[0].sample
    assert out.finished_ids == ("a",)
    assert b.status == RequestStatus.RUNNING
    assert updates == [TokenUpdate("b", (22,), None, None)]
    for _ in range(2):
        out, updates = run_step(scheduler, tokens)
    assert updates == [TokenUpdate("b", (22,), None, FinishReason.LENGTH)]
    assert b.output_token_ids == [22] * 8
    assert scheduler.make_stats().num_preemptions == 1
    assert scheduler.num_free_blocks == 4


def test_request_that_cannot_grow_preempts_itself_when_it_is_the_tail(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(num_kv_blocks=5, block_size=4)
    a, b = make_request("a", 4, 8), make_request("b", 4, 8)
    scheduler.add_request(a)
    scheduler.add_request(b)
    for _ in range(5):
        run_step(scheduler)
    assert scheduler.num_free_blocks == 1
    # Step 6: a takes the last free block; b, itself the tail, is preempted and skipped.
    out, updates = run_step(scheduler)
    assert _shape(out) == [("a", 8, 1)]
    assert out.preempted_ids == ("b",)
    assert [u.request_id for u in updates] == ["a"]
    assert a.status == RequestStatus.RUNNING and len(a.block_ids) == 3
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == ()
    assert scheduler.num_free_blocks == 5 - 3


def test_preempted_requests_keep_admission_order_at_the_front(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    # 3 blocks of 4: three 4-token prompts fill the pool; at position 4 the tail is preempted.
    scheduler = make_scheduler(num_kv_blocks=3, block_size=4)
    for request_id in ("a", "b", "c", "d"):
        scheduler.add_request(make_request(request_id, 4, 4))
    assert _shape(run_step(scheduler)[0]) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 4)]
    out, _ = run_step(scheduler)
    # a takes c's block, then b preempts itself: c then b go back, b in front.
    assert _shape(out) == [("a", 4, 1)]
    assert out.preempted_ids == ("c", "b")
    assert [r.request_id for r in scheduler.waiting] == ["b", "c", "d"]
    assert scheduler.num_preemptions == 2


# ---------------------------------------------------------------- finishing from outside


def test_abort_frees_waiting_and_running_requests(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", 5), make_request("b", 4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    run_step(scheduler)
    assert (a.status, b.status) == (RequestStatus.RUNNING, RequestStatus.WAITING)
    assert scheduler.num_free_blocks == 62

    scheduler.abort_requests(["b"])
    assert b.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.num_waiting == 0
    scheduler.abort_requests("a")  # a single id works too
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert a.block_ids == ()
    assert scheduler.num_free_blocks == 64
    assert (scheduler.num_running, scheduler.requests) == (0, {})

    scheduler.abort_requests(["a", "unknown"])  # already finished / unknown: ignored
    out = scheduler.schedule()
    assert out == SchedulerOutput(chunks=(), finished_ids=("b", "a"))
    assert scheduler.schedule().finished_ids == ()  # reported once
    assert not scheduler.has_unfinished_requests()


def test_finish_requests_with_a_reason(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler()
    a, b = make_request("a", 4), make_request("b", 4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    run_step(scheduler)
    scheduler.finish_requests(["a"], FinishReason.STOP)  # e.g. a stop string was found
    scheduler.finish_requests(["b"], FinishReason.ERROR)
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert b.status == RequestStatus.FINISHED_ERROR
    assert scheduler.num_free_blocks == 64
    assert scheduler.schedule().finished_ids == ("a", "b")


def test_abort_of_a_preempted_request(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(num_kv_blocks=4, block_size=4)
    scheduler.add_request(make_request("a", 4, 8))
    b = make_request("b", 4, 8)
    scheduler.add_request(b)
    for _ in range(6):
        run_step(scheduler)
    assert b.status == RequestStatus.PREEMPTED
    scheduler.abort_requests(["b"])
    assert b.status == RequestStatus.FINISHED_ABORTED
    assert (scheduler.num_waiting, scheduler.num_running) == (0, 1)


def test_chunk_of_request_aborted_mid_step_is_skipped(
    make_scheduler: MakeScheduler, make_request: MakeRequest, fake_model_output: FakeModelOutput
) -> None:
    scheduler = make_scheduler()
    a, b = make_request("a", 4), make_request("b", 4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule()
    scheduler.abort_requests(["a"])  # the client left while the step ran
    updates = scheduler.update_from_output(out, fake_model_output(out))
    assert updates == [TokenUpdate("b", (SAMPLED,), None, None)]
    assert (a.num_computed_tokens, a.output_token_ids) == (0, [])
    assert b.num_computed_tokens == 4


# ---------------------------------------------------------------- stop conditions


def _generate(
    scheduler: Scheduler, run_step: RunStep, token_ids: list[int | tuple[int, ...]]
) -> list[TokenUpdate]:
    """Feed request "a" one entry of `token_ids` per step; all its updates, in order."""
    updates: list[TokenUpdate] = []
    for token_id in token_ids:
        updates += run_step(scheduler, {"a": token_id})[1]
    return updates


@pytest.mark.parametrize(
    ("kwargs", "token_ids", "expected_outputs", "reason"),
    [
        ({}, [5, EOS, 5], [5, EOS], FinishReason.STOP),
        ({"eos_token_id": None}, [EOS, EOS], [EOS, EOS], None),
        ({"ignore_eos": True, "max_tokens": 3}, [EOS] * 4, [EOS, EOS, EOS], FinishReason.LENGTH),
        ({"min_tokens": 3}, [EOS] * 4, [EOS, EOS, EOS], FinishReason.STOP),
        ({"stop_token_ids": (42,)}, [5, 42, 5], [5, 42], FinishReason.STOP),
        ({"stop_token_ids": (42,), "min_tokens": 2}, [42, 42, 5], [42, 42], FinishReason.STOP),
        ({"max_tokens": 3}, [5, 6, 8, 9], [5, 6, 8], FinishReason.LENGTH),
        ({"max_tokens": 1}, [EOS], [EOS], FinishReason.STOP),  # EOS outranks max_tokens
        ({"max_tokens": None}, [5] * 5, [5, 5, 5], FinishReason.LENGTH),  # max_model_len 12
        ({}, [(5, EOS, 9)], [5, EOS], FinishReason.STOP),  # tokens after a stop are dropped
        ({"max_tokens": 2}, [(5, 6, 8)], [5, 6], FinishReason.LENGTH),
    ],
)
def test_stop_conditions(
    make_scheduler: MakeScheduler,
    make_request: MakeRequest,
    run_step: RunStep,
    kwargs: dict[str, object],
    token_ids: list[int | tuple[int, ...]],
    expected_outputs: list[int],
    reason: FinishReason | None,
) -> None:
    scheduler = make_scheduler(max_model_len=12)
    request = make_request("a", 9, **{"max_tokens": 3, **kwargs})
    scheduler.add_request(request)
    updates = _generate(scheduler, run_step, token_ids)
    assert request.output_token_ids == expected_outputs
    assert [t for u in updates for t in u.new_token_ids] == expected_outputs
    assert updates[-1].finish_reason == reason
    assert all(u.finish_reason is None for u in updates[:-1])
    if reason is None:
        assert request.status == RequestStatus.RUNNING
    else:
        assert request.status == RequestStatus.for_reason(reason)
        assert scheduler.requests == {}
        assert scheduler.num_free_blocks == 64


def test_max_model_len_stops_generation(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(max_model_len=12)
    request = make_request("a", 9, None, ignore_eos=True)
    scheduler.add_request(request)
    updates = _generate(scheduler, run_step, [5, 5, 5, 5])
    assert [u.finish_reason for u in updates] == [None, None, FinishReason.LENGTH]
    assert request.num_tokens == 12
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_logprobs_follow_the_kept_tokens(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, logprobs=0))
    _, updates = run_step(scheduler, {"a": (5, EOS, 9)}, with_logprobs=True)
    assert updates == [
        TokenUpdate(
            "a",
            (5, EOS),
            (TokenLogprob(5, -0.5, 1), TokenLogprob(EOS, -1.5, 1)),
            FinishReason.STOP,
        )
    ]


# ---------------------------------------------------------------- stats


def test_make_stats(
    make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep
) -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("a", 5))  # 2 blocks of 4
    scheduler.add_request(make_request("b", 4))
    run_step(scheduler)
    assert scheduler.make_stats() == SchedulerStats(
        num_running_reqs=1,
        num_waiting_reqs=1,
        kv_cache_usage=2 / 64,
        num_preemptions=0,
        num_free_blocks=62,
    )
    assert scheduler.kv_cache_usage == 2 / 64


# ---------------------------------------------------------------- randomized invariants


def _check_chunks(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """Invariants of one schedule(), checked before the step's results are applied."""
    config = scheduler.config
    assert out.num_scheduled_tokens <= config.max_num_batched_tokens
    assert len(out.chunks) <= config.max_num_seqs
    chunk_ids = [c.request_id for c in out.chunks]
    assert len(set(chunk_ids)) == len(chunk_ids)
    # Batch order: decodes first, then the other chunks, each group in admission order
    # (newly admitted requests are the last admitted).
    admission = [r.request_id for r in scheduler.running]
    num_decodes = next((i for i, c in enumerate(out.chunks)
                        if not (c.sample and c.num_known_tokens == 1)), len(out.chunks))
    for group in (chunk_ids[:num_decodes], chunk_ids[num_decodes:]):
        assert group == sorted(group, key=admission.index)
    for chunk in out.chunks:
        request = scheduler.requests[chunk.request_id]
        assert chunk.num_tokens >= 1
        assert chunk.start_pos == request.num_computed_tokens
        assert list(chunk.token_ids) == request.all_token_ids[chunk.start_pos : chunk.context_len]
        assert chunk.block_ids == tuple(request.block_ids)
        assert scheduler.kv_cache.num_blocks_for(chunk.context_len) == len(chunk.block_ids)
        assert chunk.sample == (chunk.context_len == request.num_tokens)
    for request_id in out.preempted_ids:
        request = scheduler.requests[request_id]
        assert request.status == RequestStatus.PREEMPTED
        assert request_id not in chunk_ids


def _check_state(scheduler: Scheduler) -> None:
    """Invariants that hold between steps."""
    kv = scheduler.kv_cache
    running_ids = [r.request_id for r in scheduler.running]
    waiting_ids = [r.request_id for r in scheduler.waiting]
    assert len(running_ids) <= scheduler.config.max_num_seqs
    assert sorted(running_ids + waiting_ids) == sorted(scheduler.requests)
    for request in scheduler.running:
        assert request.status == RequestStatus.RUNNING
        assert len(request.block_ids) == kv.num_blocks_for(request.num_computed_tokens)
        assert request.num_tokens <= scheduler.max_model_len
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert (request.block_ids, request.num_computed_tokens) == ((), 0)
    owned = [b for r in scheduler.running for b in r.block_ids]
    assert len(set(owned)) == len(owned), "a block is owned twice"
    assert set(owned) <= set(range(kv.num_blocks))
    assert len(owned) == kv.num_blocks - kv.num_free_blocks
    assert all(kv.pool.ref_count(b) == 1 for b in owned)


@pytest.mark.parametrize("seed", range(100))
@pytest.mark.usefixtures("decode_walks")
def test_random_workload_keeps_invariants_and_finishes(
    seed: int, make_scheduler: MakeScheduler, make_request: MakeRequest
) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    max_model_len = rng.randint(8, 96)
    num_kv_blocks = rng.randint(2, 2 * -(-max_model_len // block_size))
    max_num_batched_tokens = rng.randint(1, 48)
    max_num_seqs = rng.randint(1, min(max_num_batched_tokens, 8))
    scheduler = make_scheduler(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        num_kv_blocks=num_kv_blocks,
        block_size=block_size,
        max_model_len=max_model_len,
    )
    num_requests = rng.randint(1, 30)
    num_arrived = 0
    accepted: list[Request] = []
    finish_reasons: dict[str, FinishReason] = {}

    def arrive() -> None:
        nonlocal num_arrived
        num_prompt_tokens = rng.randint(1, max_model_len - 1)
        max_tokens = rng.choice([None, rng.randint(1, max_model_len - num_prompt_tokens)])
        request = make_request(
            str(num_arrived),
            num_prompt_tokens,
            max_tokens,
            min_tokens=rng.choice([0, 0, 1]),
            stop_token_ids=(42,),
            ignore_eos=rng.random() < 0.2,
        )
        num_arrived += 1
        max_seq_len = max_model_len if max_tokens is None else num_prompt_tokens + max_tokens
        fits = scheduler.kv_cache.num_blocks_for(max_seq_len) <= num_kv_blocks
        try:
            scheduler.add_request(request)
        except ValueError:
            assert not fits
            return
        assert fits
        accepted.append(request)

    def abort_one() -> None:
        request_id = rng.choice(sorted(scheduler.requests))
        scheduler.abort_requests([request_id])
        finish_reasons[request_id] = FinishReason.ABORT

    for _ in range(20_000):
        while num_arrived < num_requests and rng.random() < 0.3:
            arrive()
        if scheduler.requests and rng.random() < 0.02:
            abort_one()
        out = scheduler.schedule()
        _check_chunks(scheduler, out)
        if scheduler.requests and rng.random() < 0.02:
            abort_one()  # between schedule() and update_from_output()
        sampled: dict[str, tuple[int, ...]] = {}
        for chunk in out.chunks:
            if chunk.sample:
                # Mostly ordinary tokens, sometimes EOS or the stop token, now and then two.
                choices = [EOS] * 2 + [42] + list(range(10, 40))
                num_sampled = 2 if rng.random() < 0.1 else 1
                sampled[chunk.request_id] = tuple(rng.choice(choices) for _ in range(num_sampled))
        updates = scheduler.update_from_output(out, ModelOutput(sampled_token_ids=sampled))
        for update in updates:
            if update.finish_reason is not None:
                assert update.request_id not in scheduler.requests
                finish_reasons[update.request_id] = update.finish_reason
        _check_state(scheduler)
        if num_arrived == num_requests and not scheduler.has_unfinished_requests():
            break
    else:
        pytest.fail(f"requests left unfinished: {sorted(scheduler.requests)}")

    assert scheduler.num_free_blocks == num_kv_blocks
    assert scheduler.kv_cache_usage == 0.0
    assert sorted(finish_reasons) == sorted(r.request_id for r in accepted)
    for request in accepted:
        assert request.is_finished
        assert request.status == RequestStatus.for_reason(finish_reasons[request.request_id])
        assert request.num_tokens <= max_model_len
        max_tokens = request.sampling_params.max_tokens
        assert max_tokens is None or request.num_output_tokens <= max_tokens


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.usefixtures("decode_walks")
def test_one_walk_decode_pass_equals_the_two_walk_pass(
    seed: int, make_request: MakeRequest
) -> None:
    """Without speculative decoding the first pass sorts and schedules running requests in one
    walk (Scheduler._schedule_decodes); the speculative path's two walks, given no drafts,
    must pick the same chunks and preempt the same requests, step by step (tight KV pools and
    budgets, so preemptions and budget cut-offs happen)."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    max_model_len = rng.randint(8, 64)
    config = SchedulerConfig(max_num_batched_tokens=rng.randint(1, 24),
                             max_num_seqs=rng.randint(1, 8), max_model_len=max_model_len,
                             mixed_prefill_budget=rng.choice([None, 3]))
    num_kv_blocks = rng.randint(2, -(-max_model_len // block_size) + 4)
    one_walk = Scheduler(config, num_kv_blocks, block_size, max_model_len)
    two_walks = Scheduler(config, num_kv_blocks, block_size, max_model_len,
                          speculative=SpeculativeConfig(speculative="ngram"))
    assert two_walks.speculative is not None and one_walk.speculative is None
    for i in range(rng.randint(1, 20)):
        num_prompt_tokens = rng.randint(1, max_model_len - 1)
        max_tokens = rng.randint(1, max_model_len - num_prompt_tokens)
        for scheduler in (one_walk, two_walks):
            with contextlib.suppress(ValueError):  # never fits: refused by both
                scheduler.add_request(make_request(str(i), num_prompt_tokens, max_tokens))
    while one_walk.has_unfinished_requests():
        out_one, out_two = one_walk.schedule(), two_walks.schedule()
        assert out_one.chunks == out_two.chunks
        assert out_one.preempted_ids == out_two.preempted_ids
        sampled = {c.request_id: (7,) for c in out_one.chunks if c.sample}
        for scheduler, out in ((one_walk, out_one), (two_walks, out_two)):
            scheduler.update_from_output(out, ModelOutput(sampled_token_ids=sampled))
    assert not two_walks.has_unfinished_requests()


def _request_state(scheduler: Scheduler) -> list[tuple[object, ...]]:
    return [(r.request_id, r.status, r.num_computed_tokens, tuple(r.output_token_ids),
             r.block_ids) for r in scheduler.requests.values()]


@pytest.mark.parametrize("seed", range(100))  # (77 and 81 preempt a decode in the 2nd pass)
@pytest.mark.usefixtures("decode_walks")
def test_decode_rows_update_as_the_general_walk(seed: int, make_request: MakeRequest) -> None:
    """SchedulerOutput.num_decodes: its leading chunks are decodes (one known token, the last,
    sampled, no drafts), and update_rows_from_output's walk over them (Scheduler.
    _update_decodes) leaves every request, block and row as the general walk does, given the
    same output with num_decodes=0 (tight pools: preemptions; prefix caching: blocks fill;
    aborts between schedule and update; KV from elsewhere; EOS, stop tokens, two tokens now
    and then)."""
    rng, stop_rng = random.Random(seed), random.Random(-1 - seed)
    block_size = rng.choice([1, 2, 4])
    max_model_len = rng.randint(8, 64)
    config = SchedulerConfig(max_num_batched_tokens=rng.randint(1, 24),
                             max_num_seqs=rng.randint(1, 8), max_model_len=max_model_len)
    num_blocks_per_request = -(-max_model_len // block_size)  # every request fits alone
    num_kv_blocks = rng.randint(num_blocks_per_request, num_blocks_per_request + 4)
    caching = rng.random() < 0.5
    fast, general = (Scheduler(config, num_kv_blocks, block_size, max_model_len,
                               enable_prefix_caching=caching) for _ in range(2))
    for i in range(rng.randint(4, 20)):
        num_prompt_tokens = rng.randint(1, max_model_len - 2)
        max_tokens = rng.randint(2, max_model_len - num_prompt_tokens)
        prompt = [1000 + rng.randint(0, 3) for _ in range(num_prompt_tokens)]  # shared blocks
        ignore_eos = rng.random() < 0.5
        # without EOS and stop tokens a request runs to its length: no stop rule to check
        # before it (Request.first_stop_output_len), the C walk's own rows (drawn apart: the
        # seeds' other draws as they were)
        stop_token_ids = () if ignore_eos and stop_rng.random() < 0.5 else (42,)
        # some prompts' KV from another engine: they join `running` late, perhaps still
        # prefilling ahead of decodes (whose chunks a preemption then takes out again)
        num_external_tokens = rng.choice([0, rng.randint(0, num_prompt_tokens - 1)])
        for scheduler in (fast, general):
            request = make_request(str(i), num_prompt_tokens, max_tokens,
                                   prompt_token_ids=list(prompt),
                                   stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
            request.num_external_tokens = num_external_tokens
            scheduler.add_request(request)
    num_decode_rows = 0
    while fast.has_unfinished_requests():
        out = fast.schedule()
        assert general.schedule() == out
        for chunk in out.chunks[:out.num_decodes]:
            request = fast.requests[chunk.request_id]
            assert chunk.num_tokens == 1 and chunk.sample and not chunk.draft_parents
            assert chunk.context_len == request.num_tokens
        num_decode_rows += out.num_decodes
        if fast.requests and rng.random() < 0.05:  # aborted between schedule and update
            request_id = rng.choice(sorted(fast.requests))
            for scheduler in (fast, general):
                scheduler.abort_requests(request_id)
        sampled = {c.request_id: tuple(rng.choice([EOS, 42, 7, 8, 9])
                                       for _ in range(2 if rng.random() < 0.1 else 1))
                   for c in out.chunks if c.sample}
        model_output = ModelOutput(sampled_token_ids=sampled)
        finished_only = rng.random() < 0.5
        rows = fast.update_rows_from_output(out, model_output, finished_only)
        assert rows == general.update_rows_from_output(
            replace(out, num_decodes=0), model_output, finished_only)
        assert _request_state(fast) == _request_state(general)
        assert fast.kv_cache.pool.free_block_ids() == general.kv_cache.pool.free_block_ids()
        assert ([fast.kv_cache.pool.block_hash(b) for b in range(num_kv_blocks)]
                == [general.kv_cache.pool.block_hash(b) for b in range(num_kv_blocks)])
        for request_id in [r for r in fast.receiving if rng.random() < 0.3]:
            for scheduler in (fast, general):
                scheduler.finish_kv_transfer(request_id)
    assert not general.has_unfinished_requests() and num_decode_rows


@pytest.mark.usefixtures("decode_walks")
def test_decode_row_without_its_sampled_token_raises(make_scheduler: MakeScheduler,
                                                     make_request: MakeRequest) -> None:
    """A decode row whose token the model output lacks is a runner bug: the walk raises
    KeyError (from C as from Python) instead of skipping the row."""
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, 8, ignore_eos=True))
    out = scheduler.schedule()  # the prompt
    scheduler.update_from_output(out, ModelOutput(sampled_token_ids={"a": (SAMPLED,)}))
    out = scheduler.schedule()
    assert out.num_decodes == 1
    with pytest.raises(KeyError, match="'a'"):
        scheduler.update_from_output(out, ModelOutput(sampled_token_ids={}))
