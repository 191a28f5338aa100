"""The prefill-first baseline: whole prompts, prefill-only steps, decodes starve meanwhile."""

from __future__ import annotations


def _shape(scheduler_output) -> list[tuple[str, int, int]]:
    return [(c.request_id, c.start_pos, c.num_tokens) for c in scheduler_output.chunks]


def test_prefill_steps_hold_no_decodes_and_prompts_are_never_split(
        make_scheduler, make_request, run_step) -> None:
    sched = make_scheduler(policy="prefill_first", max_num_batched_tokens=32)
    sched.add_request(make_request("a", 10, max_tokens=5, ignore_eos=True))
    out, _ = run_step(sched)
    assert _shape(out) == [("a", 0, 10)]
    out, _ = run_step(sched)
    assert _shape(out) == [("a", 10, 1)]  # nothing waiting: decode
    sched.add_request(make_request("b", 20, max_tokens=5, ignore_eos=True))
    sched.add_request(make_request("c", 20, max_tokens=5, ignore_eos=True))
    out, _ = run_step(sched)
    assert _shape(out) == [("b", 0, 20)]  # c does not fit the rest of the budget; a waits
    out, _ = run_step(sched)
    assert _shape(out) == [("c", 0, 20)]  # a still waits: prefill first
    out, _ = run_step(sched)
    assert _shape(out) == [("a", 11, 1), ("b", 20, 1), ("c", 20, 1)]


def test_a_prompt_longer_than_the_budget_runs_whole(make_scheduler, make_request,
                                                    run_step) -> None:
    sched = make_scheduler(policy="prefill_first", max_num_batched_tokens=16)
    sched.add_request(make_request("long", 50, max_tokens=2, ignore_eos=True))
    sched.add_request(make_request("short", 4, max_tokens=2, ignore_eos=True))
    out, _ = run_step(sched)
    assert _shape(out) == [("long", 0, 50)]  # alone: never chunked, over the budget
    out, _ = run_step(sched)
    assert _shape(out) == [("short", 0, 4)]


def test_token_budget_policy_chunks_the_same_workload(make_scheduler, make_request,
                                                      run_step) -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("long", 50, max_tokens=2, ignore_eos=True))
    out, _ = run_step(sched)
    assert _shape(out) == [("long", 0, 16)]
