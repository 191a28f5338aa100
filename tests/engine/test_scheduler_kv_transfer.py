"""KV from another engine (P/D disaggregation): a request whose prompt was computed elsewhere is
admitted when its blocks can be allocated, waits while its KV moves, then decodes. Fake model
outputs, no torch."""

from __future__ import annotations

from collections.abc import Callable

from engine.outputs import ModelOutput, SchedulerOutput, TokenUpdate
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler

MakeRequest = Callable[..., Request]
MakeScheduler = Callable[..., Scheduler]
RunStep = Callable[..., tuple[SchedulerOutput, list[TokenUpdate]]]


def handed_off(make_request: MakeRequest, request_id: str, prompt_len: int,
               max_tokens: int = 4) -> Request:
    """What a decode engine is given: the prompt plus the prefill's first token, the prompt's
    KV computed elsewhere."""
    request = make_request(request_id, prompt_len + 1, max_tokens, ignore_eos=True)
    request.num_external_tokens = prompt_len
    return request


def test_admitted_request_holds_its_blocks_and_waits_for_the_transfer(
        make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=4, num_kv_blocks=16)
    scheduler.add_request(handed_off(make_request, "d", prompt_len=10))
    out, updates = run_step(scheduler)
    assert out.kv_transfer_ids == ("d",) and out.chunks == () and updates == []
    request = scheduler.requests["d"]
    assert request.status == RequestStatus.RECEIVING_KV
    assert len(request.block_ids) == 3  # 10 tokens of KV in blocks of 4
    assert scheduler.num_free_blocks == 13 and scheduler.num_running == 0
    # nothing runs while the KV is in flight
    out, _ = run_step(scheduler)
    assert out.chunks == () and out.kv_transfer_ids == ()

    scheduler.finish_kv_transfer("d")
    out, updates = run_step(scheduler)
    # one decode of the handed-off token at position 10, no prefill
    assert [(c.request_id, c.start_pos, c.num_tokens, c.sample) for c in out.chunks] == [
        ("d", 10, 1, True)]
    assert [u.new_token_ids for u in updates] == [(7,)]
    assert request.num_computed_tokens == 11


def test_admission_waits_for_blocks_fcfs(make_scheduler: MakeScheduler,
                                         make_request: MakeRequest, run_step: RunStep) -> None:
    # 8 blocks of 4: a running request holds 5 of them, a hand-off needing 4 must wait
    scheduler = make_scheduler(block_size=4, num_kv_blocks=8, max_num_batched_tokens=64)
    scheduler.add_request(make_request("r", 18, max_tokens=2, ignore_eos=True))
    run_step(scheduler)  # prefill: 18 tokens, 5 blocks
    scheduler.add_request(handed_off(make_request, "d", prompt_len=14))
    scheduler.add_request(make_request("later", 2, max_tokens=1))
    out, _ = run_step(scheduler)  # r decodes; d needs 4 blocks, 3 are free
    assert out.kv_transfer_ids == () and scheduler.requests["d"].status == RequestStatus.WAITING
    assert [c.request_id for c in out.chunks] == ["r"]  # nobody jumps ahead of d
    assert "r" not in scheduler.requests  # its second token ended it
    out, _ = run_step(scheduler)  # r finished last step: its blocks are free now
    assert out.kv_transfer_ids == ("d",)
    assert [c.request_id for c in out.chunks] == ["later"]


def test_receiving_counts_against_max_num_seqs(make_scheduler: MakeScheduler,
                                               make_request: MakeRequest,
                                               run_step: RunStep) -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(handed_off(make_request, f"d{i}", prompt_len=5))
    out, _ = run_step(scheduler)
    assert out.kv_transfer_ids == ("d0", "d1") and scheduler.num_waiting == 1


def test_abort_while_receiving_frees_blocks(make_scheduler: MakeScheduler,
                                            make_request: MakeRequest, run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=4, num_kv_blocks=16)
    scheduler.add_request(handed_off(make_request, "d", prompt_len=10))
    run_step(scheduler)
    scheduler.abort_requests("d")
    assert scheduler.num_free_blocks == 16 and not scheduler.has_unfinished_requests()
    scheduler.finish_kv_transfer("d")  # a transfer landing late changes nothing
    assert scheduler.schedule().chunks == ()


def test_preempted_after_landing_recomputes_everything(
        make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=4, num_kv_blocks=5, max_num_batched_tokens=64)
    scheduler.add_request(make_request("x", 4, max_tokens=6, ignore_eos=True))
    run_step(scheduler)  # x: 1 block
    scheduler.add_request(handed_off(make_request, "d", prompt_len=11, max_tokens=8))
    run_step(scheduler)  # x decodes (2nd block), d receives into 3: the pool is full
    scheduler.finish_kv_transfer("d")
    request = scheduler.requests["d"]
    run_step(scheduler)  # d decodes at 11 (12 tokens, 3 blocks), x at 5
    out, _ = run_step(scheduler)  # d at 12 needs a 4th block: the latest admitted (d) goes
    assert out.preempted_ids == ("d",)
    assert request.num_external_tokens == 0 and request.status == RequestStatus.PREEMPTED
    while "d" not in {c.request_id for c in out.chunks}:
        out, _ = run_step(scheduler)
    (chunk,) = [c for c in out.chunks if c.request_id == "d"]
    assert chunk.start_pos == 0  # its KV was dropped: prompt and outputs computed here


def test_model_output_is_not_needed_for_receiving(make_scheduler: MakeScheduler,
                                                  make_request: MakeRequest) -> None:
    scheduler = make_scheduler()
    scheduler.add_request(handed_off(make_request, "d", prompt_len=6))
    out = scheduler.schedule()
    assert scheduler.update_from_output(out, ModelOutput(sampled_token_ids={})) == []
    assert out.new_requests[0].request_id == "d"  # the runner hears of it once
