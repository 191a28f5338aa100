"""The simulated-clock driver: a workload's requests into one engine, step by step.

The engine is the one that serves (EngineCore: scheduler, KV-cache manager, prefix cache,
lowering, cost model), over the timing-only runner. The driver only owns arrivals: before each
step it adds every request whose arrival time the simulated clock has reached (an idle engine
jumps its clock to the next arrival), then steps the engine once, and hands what the step did
to a Recorder. There is no second scheduler and no step loop of its own beyond that.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from cluster.recorder import Recorder
from cluster.workload import RequestSpec, Workload, synthetic_prompt, synthetic_prompt_packed
from engine.core import EngineCore
from engine.request import RequestRejected, SamplingParams

# Every simulated request generates exactly its output length: EOS never ends it early.
_BASE_PARAMS = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)


@dataclass(frozen=True)
class RejectedRequest:
    """A request the engine can never serve (it is skipped and counted)."""

    index: int  # its position in the workload
    reason: str  # the engine's message


def drive(core: EngineCore, workload: Workload, recorder: Recorder,
          on_step: Callable[[float], None] | None = None) -> list[RejectedRequest]:
    """Run `workload` through `core` to the last request's end; returns the rejected requests.

    on_step(sim_now_s) is called after every step (a progress bar in simulated time).
    """
    requests = workload.requests
    rejected: list[RejectedRequest] = []
    i, n = 0, len(requests)
    start_wall_s = time.perf_counter()
    with fewer_collections():
        while i < n or core.has_unfinished_requests():
            if not core.has_unfinished_requests():  # idle: the next arrival comes at its time
                i = _add(core, requests, i, recorder, rejected)
            while i < n and requests[i].arrival_s <= core.sim_now_s:
                i = _add(core, requests, i, recorder, rejected)
            if not core.has_unfinished_requests():
                continue  # everything added so far was rejected
            outputs = core.step()
            recorder.record_step(core, outputs)
            if on_step is not None:
                on_step(core.sim_now_s)
    recorder.wall_s = time.perf_counter() - start_wall_s
    return rejected


# Allocations between young-generation collections while a simulation runs (Python's default is
# 700). Every step allocates chunks, tuples and records by the hundred, and each full collection
# walks every request and record of the run: on the whole Azure conversation trace the collector
# took ~2.7 s of ~70, most of it in ten full collections (a gen-2 pass every 700 x 10 x 10
# allocations). The engine makes no reference cycles per step, so collecting less often only
# delays what little there is to collect.
_SIMULATION_GC_THRESHOLD = (50_000, 20, 20)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """The garbage collector's thresholds raised to _SIMULATION_GC_THRESHOLD, then restored."""
    before = gc.get_threshold()
    gc.set_threshold(*_SIMULATION_GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _add(core: EngineCore, requests: tuple[RequestSpec, ...], i: int, recorder: Recorder,
         rejected: list[RejectedRequest]) -> int:
    """Add request i (at its arrival on the simulated clock); returns i + 1."""
    spec = requests[i]
    prompt, packed = request_prompt(i, spec)
    try:
        core.add_request(str(i), prompt, request_params(spec.output_len),
                         arrival_sim_s=spec.arrival_s, packed_prompt=packed)
    except RequestRejected as exc:
        rejected.append(RejectedRequest(i, str(exc)))
    else:
        recorder.record_arrival(i, spec)
    return i + 1


def request_prompt(i: int, spec: RequestSpec) -> tuple[list[int], bytes | None]:
    """Request i's prompt: the workload's, or a synthetic one (with its packing, which
    EngineCore.add_request would otherwise make: engine.token_ids.pack)."""
    if spec.prompt_token_ids is not None:
        return list(spec.prompt_token_ids), None
    return synthetic_prompt(i, spec.prompt_len), synthetic_prompt_packed(i, spec.prompt_len)


@functools.cache  # validating SamplingParams costs tens of us; they are immutable, so shared
def request_params(output_len: int) -> SamplingParams:
    """A simulated request's sampling: exactly output_len tokens (EOS never ends it early)."""
    return replace(_BASE_PARAMS, max_tokens=output_len)
