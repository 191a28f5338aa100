"""The output processor without a tokenizer: its quiet path (no deltas, what a simulation runs)
notes the same latencies and finishes the same requests as the path that outputs every delta,
given every update or only the finished requests' (what the engine's step passes it), and its
walk over the decode rows (SchedulerOutput.num_decodes) the same as its general walk."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from engine.output_processor import OutputProcessor
from engine.outputs import ModelOutput
from engine.request import Request
from engine.scheduler import Scheduler

MakeRequest = Callable[..., Request]
MakeScheduler = Callable[..., Scheduler]


@pytest.mark.parametrize("num_kv_blocks", [48, 12])  # 12: preemptions (a run then ends)
@pytest.mark.parametrize("seed", range(10))
def test_quiet_processing_matches_deltas(make_scheduler: MakeScheduler,
                                         make_request: MakeRequest, seed: int,
                                         num_kv_blocks: int) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(max_num_batched_tokens=16, num_kv_blocks=num_kv_blocks)
    twin = make_scheduler(max_num_batched_tokens=16, num_kv_blocks=num_kv_blocks)  # finished
    #   rows only
    loud = OutputProcessor(None, 0, deltas=True)
    quiet = OutputProcessor(None, 0, deltas=False)
    quiet_finished = OutputProcessor(None, 0, deltas=False)  # given the twin's rows
    quiet_general = OutputProcessor(None, 0, deltas=False)  # given num_decodes=0: no fast walk
    processors = (loud, quiet, quiet_finished, quiet_general)
    num_arrived, now_s, num_decode_rows = 0, 0.0, 0
    for _ in range(400):
        if num_arrived < 24 and rng.random() < 0.3:
            prompt_len, max_tokens = rng.randint(1, 20), rng.randint(1, 12)
            for s in (scheduler, twin):
                request = make_request(str(num_arrived), prompt_len, max_tokens)
                s.add_request(request)
            for processor in processors:
                processor.add_request(request.request_id, request.prompt_token_ids,
                                      request.sampling_params, now_s, now_s * 10,
                                      request.sampling_params.max_tokens or 0)
            num_arrived += 1
        if scheduler.requests and rng.random() < 0.03:  # aborted between steps
            request_id = rng.choice(sorted(scheduler.requests))
            for s in (scheduler, twin):
                s.abort_requests(request_id)
            for processor in processors:
                processor.abort_requests([request_id], now_s, now_s * 10)
        out = scheduler.schedule()
        assert twin.schedule() == out
        if out.is_empty:
            now_s += 0.5
            continue
        # Mostly one token, sometimes EOS, now and then two (as after a verify; never for a
        # decode row, which samples one: ModelOutput).
        sampled = {c.request_id: tuple(rng.choice([2, 5, 6, 7]) for _ in range(
                       2 if i >= out.num_decodes and rng.random() < 0.2 else 1))
                   for i, c in enumerate(out.chunks) if c.sample}
        model_output = ModelOutput(sampled_token_ids=sampled)
        rows = scheduler.update_rows_from_output(out, model_output)
        finished_rows = twin.update_rows_from_output(out, model_output, finished_only=True)
        assert finished_rows == [row for row in rows if row[3] is not None]
        step_s, now_s = now_s, now_s + rng.choice([0.25, 0.5, 1.0])
        results = [processor.process(scheduled, model_output, updates, step_s, now_s,
                                     now_s * 10, (now_s - step_s) * 10)
                   for processor, scheduled, updates in (
                       (loud, out, rows), (quiet, out, rows), (quiet_finished, out, finished_rows),
                       (quiet_general, replace(out, num_decodes=0), finished_rows))]
        loud_result = results[0]
        for quiet_result in results[1:]:
            assert quiet_result.outputs == [o for o in loud_result.outputs if o.finished]
            assert quiet_result.stats == loud_result.stats
            assert quiet_result.stopped_ids == loud_result.stopped_ids == []
        num_decode_rows += out.num_decodes
    assert num_arrived == 24 and not scheduler.requests and not twin.requests
    assert num_decode_rows


def _add_two(scheduler: Scheduler, processor: OutputProcessor,
             make_request: MakeRequest) -> None:
    """Requests "a" and "b" (4 prompt tokens, 3 to generate) to both."""
    for request_id in ("a", "b"):
        request = make_request(request_id, 4, 3)
        scheduler.add_request(request)
        processor.add_request(request_id, request.prompt_token_ids, request.sampling_params,
                              0.0, 0.0)


def test_update_out_of_chunk_order_is_refused(make_scheduler: MakeScheduler,
                                              make_request: MakeRequest) -> None:
    scheduler = make_scheduler()
    processor = OutputProcessor(None, 0, deltas=True)
    _add_two(scheduler, processor, make_request)
    out = scheduler.schedule()
    model_output = ModelOutput(sampled_token_ids={"a": (5,), "b": (6,)})
    rows = scheduler.update_rows_from_output(out, model_output)
    with pytest.raises(ValueError, match="matches no chunk"):
        processor.process(out, model_output, rows[::-1], 0.0, 1.0, 1.0, 1.0)


def test_quiet_decode_updates_out_of_chunk_order_are_refused(make_scheduler: MakeScheduler,
                                                             make_request: MakeRequest) -> None:
    """The quiet processor's decode rows, taken together (engine.token_runs), refuse them too."""
    scheduler = make_scheduler()
    processor = OutputProcessor(None, 0, deltas=False)
    _add_two(scheduler, processor, make_request)
    for step in range(3):  # prefill, then decodes; both finish at the third token
        out = scheduler.schedule()
        model_output = ModelOutput(sampled_token_ids={"a": (5,), "b": (6,)})
        rows = scheduler.update_rows_from_output(out, model_output, finished_only=True)
        if step < 2:
            processor.process(out, model_output, rows, 0.0, step + 1.0, step + 1.0, 1.0)
    assert out.num_decodes == 2 and [row[0] for row in rows] == ["a", "b"]
    with pytest.raises(ValueError, match="matches no chunk"):
        processor.process(out, model_output, rows[::-1], 0.0, 3.0, 3.0, 1.0)
