"""The cluster's simulated clock: many engines (replicas) on one time line, behind a router.

There is still no second scheduler: each replica is an EngineCore that schedules its own steps.
This driver only orders what happens, as a discrete-event loop:
- events: a request arrives (the router picks a replica); a prefill replica's request is handed
  to a decode replica (P/D); a KV transfer lands;
- steps: each busy replica's next step starts at its clock (when its previous step ended).
The earliest thing goes first, an event before a step starting at the same time (a request that
arrives as a step starts is in it, as `cluster.driver` does for one engine). A replica with
nothing to run (idle, or only waiting for KV or blocks) is set aside, and the next event that
touches it moves its clock forward to that event's time. With one replica this is exactly
`cluster.driver.drive`.

The router sees each replica as of its latest step, which may end a few milliseconds after the
arrival it routes: that step's results are applied when it is run, not when it ends.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cluster.disagg import KvTransferModel, TransferRecord
from cluster.driver import (
    RejectedRequest,
    drive,
    fewer_collections,
    request_params,
    request_prompt,
)
from cluster.replica import Replica
from cluster.routing import PromptKey, Router, least_loaded
from cluster.workload import RequestSpec, Workload
from engine.request import RequestRejected
from engine.timing_runner import SYNTHETIC_TOKEN_ID

_HANDOFF, _LAND = 0, 1  # event kinds


@dataclass
class ClusterRun:
    """What one run of the cluster produced besides the replicas' recorders."""

    rejected: list[RejectedRequest] = field(default_factory=list)  # never servable
    transfers: dict[int, TransferRecord] = field(default_factory=dict)  # P/D, by request index
    wall_s: float = 0.0  # wall seconds the loop took


class ClusterDriver:
    """Runs a workload through replicas behind a router (one shared simulated clock)."""

    def __init__(self, replicas: Sequence[Replica], router: Router,
                 kv_transfer: KvTransferModel | None = None) -> None:
        """replicas: mixed ones, or prefill ones and decode ones (then kv_transfer times the
        hand-offs). The router spreads arrivals over the mixed or prefill replicas; a handed-off
        request goes to the least loaded decode replica."""
        self.replicas = list(replicas)
        self.front = [r for r in self.replicas if r.role != "decode"]
        self.decode = [r for r in self.replicas if r.role == "decode"]
        if not self.front or (self.decode and kv_transfer is None):
            raise ValueError("a cluster needs mixed or prefill replicas, and decode replicas a "
                             "KV transfer model")
        self.router = router
        self.kv_transfer = kv_transfer
        self._busy: list[tuple[float, int]] = []  # (clock, replica index): replicas to step
        self._is_busy = [False] * len(self.replicas)
        self._events: list[tuple[float, int, int, tuple[int, int]]] = []  # (t, seq, kind, data)
        self._seq = 0

    def run(self, workload: Workload,
            on_step: Callable[[float], None] | None = None) -> ClusterRun:
        """Every request to its end; returns the rejected ones and the P/D transfers."""
        if len(self.replicas) == 1 and not self.decode:
            # One replica (`xyserve simulate` by default): the engine's own loop, step for step
            # what the events below make of it (tested), without their queues and heaps per
            # step and with the collector held back (~5% of a long trace's wall time).
            (replica,) = self.replicas
            rejected = drive(replica.core, workload, replica.recorder, on_step)
            return ClusterRun(rejected=rejected, wall_s=replica.recorder.wall_s)
        requests = workload.requests
        run = ClusterRun()
        prompts: dict[int, list[int]] = {}  # P/D: prompts until handed off
        block_size = self.front[0].core.info.block_size
        prefix_aware = self.router.config.policy == "prefix-aware"
        i, n = 0, len(requests)
        start_wall_s = time.perf_counter()
        with fewer_collections():
            while True:
                t_arrival = requests[i].arrival_s if i < n else math.inf
                t_event = self._events[0][0] if self._events else math.inf
                t_step = self._busy[0][0] if self._busy else math.inf
                if min(t_arrival, t_event, t_step) == math.inf:
                    break
                if t_event <= t_arrival and t_event <= t_step:
                    t, _, kind, data = heapq.heappop(self._events)
                    if kind == _HANDOFF:
                        self._hand_off(t, data, requests, prompts, run)
                    else:
                        self._land(t, data, run)
                elif t_arrival <= t_step:
                    self._arrive(i, requests[i], block_size, prefix_aware, prompts, run)
                    i += 1
                else:
                    self._step(heapq.heappop(self._busy)[1], requests, run)
                    if on_step is not None:
                        on_step(t_step)
        stuck = [r.name for r in self.replicas if r.core.has_unfinished_requests()]
        if stuck:  # every request either finishes or was rejected: anything else is a bug
            raise RuntimeError(f"replicas {', '.join(stuck)} hold requests that never ran")
        run.wall_s = time.perf_counter() - start_wall_s
        for replica in self.replicas:
            replica.recorder.wall_s = run.wall_s
        return run

    # ------------------------------------------------------------------------------ events

    def _arrive(self, i: int, spec: RequestSpec, block_size: int, prefix_aware: bool,
                prompts: dict[int, list[int]], run: ClusterRun) -> None:
        prompt, packed = request_prompt(i, spec)
        key = PromptKey.of(prompt, block_size) if prefix_aware else None
        replica = self.front[self.router.choose(self.front, key)]
        prefill_only = replica.role == "prefill"
        # a prefill replica runs the prompt to its first token; one token needs no decode
        output_len = 1 if prefill_only else spec.output_len
        try:
            replica.core.add_request(str(i), prompt, request_params(output_len),
                                     arrival_sim_s=spec.arrival_s, packed_prompt=packed)
        except RequestRejected as exc:
            run.rejected.append(RejectedRequest(i, str(exc)))
            return
        replica.recorder.record_arrival(i, replace(spec, output_len=output_len))
        if prefill_only and spec.output_len > 1:
            prompts[i] = prompt
        self._wake(replica, spec.arrival_s)

    def _hand_off(self, t: float, data: tuple[int, int], requests: Sequence[RequestSpec],
                  prompts: dict[int, list[int]], run: ClusterRun) -> None:
        """Request data[0] finished its prefill on replica data[1] at t: a decode replica takes
        it, with the prompt's KV to arrive (blocks first, then the transfer)."""
        i, prefill_index = data
        spec, prompt = requests[i], prompts.pop(i)
        decode = self.decode[least_loaded([r.outstanding_tokens() for r in self.decode])]
        try:
            decode.core.add_request(str(i), [*prompt, SYNTHETIC_TOKEN_ID],
                                    request_params(spec.output_len - 1), arrival_sim_s=t,
                                    num_external_tokens=len(prompt))
        except RequestRejected as exc:
            run.rejected.append(RejectedRequest(i, f"decode replica: {exc}"))
            return
        decode.recorder.record_arrival(i, RequestSpec(t, len(prompt) + 1, spec.output_len - 1))
        run.transfers[i] = TransferRecord(i, prefill_index, decode.index, len(prompt), t)
        self._wake(decode, t)

    def _land(self, t: float, data: tuple[int, int], run: ClusterRun) -> None:
        i, decode_index = data
        replica = self.replicas[decode_index]
        replica.core.finish_kv_transfer(str(i))
        run.transfers[i].land_s = t
        self._wake(replica, t)

    def _push_event(self, t: float, kind: int, data: tuple[int, int]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, data))

    # ------------------------------------------------------------------------------ steps

    def _wake(self, replica: Replica, t: float) -> None:
        """Something for `replica` at t: a replica set aside resumes at t (or later, if its
        last step ended later)."""
        if not self._is_busy[replica.index]:
            replica.core.advance_clock(t)
            self._is_busy[replica.index] = True
            heapq.heappush(self._busy, (replica.core.sim_now_s, replica.index))

    def _step(self, index: int, requests: Sequence[RequestSpec], run: ClusterRun) -> None:
        replica = self.replicas[index]
        core = replica.core
        start_s = core.sim_now_s
        outputs = core.step()
        replica.recorder.record_step(core, outputs)
        if replica.role == "prefill":
            for output in outputs:
                i = int(output.request_id)
                if output.finished and requests[i].output_len > 1:
                    self._push_event(core.sim_now_s, _HANDOFF, (i, index))
        elif replica.role == "decode":
            assert self.kv_transfer is not None
            for request_id in core.last_kv_transfer_ids:
                transfer = run.transfers[int(request_id)]
                transfer.start_s = start_s
                transfer.transfer_s = self.kv_transfer.seconds(transfer.num_tokens)
                self._push_event(start_s + transfer.transfer_s, _LAND, (transfer.index, index))
        stats = core.last_stats
        ran = stats is not None and stats.trace is not None
        if ran and core.has_unfinished_requests():
            heapq.heappush(self._busy, (core.sim_now_s, index))
        else:  # idle, or waiting on transfers or blocks: an event wakes it
            self._is_busy[index] = False
