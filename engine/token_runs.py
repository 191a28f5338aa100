"""The quiet output processor's tokens not yet written down: runs of one token per step.

A simulated step's decodes are most of its rows, and each would note one inter-token latency and
count one token per request. A request that got a token in the previous step and gets its one
token now has the latency `now - previous step's clock`, one value for all of them; so a step
whose decode rows all got a token in the previous step notes that value once per row and writes
nothing per request. What it did not write is kept as runs: a request in `TokenRuns.ids` got
one token in every step from its `RequestState.run_start_step` through `last_step` (the latest
step processed), uncounted in its state, its latest token at `last_clock`. `settle` writes a run
into the state before anything reads it (a request in any other row, a finish, an abort).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine.request_state import RequestState


class TokenRuns:
    """Requests whose tokens since `RequestState.run_start_step` are not in their state yet."""

    def __init__(self) -> None:
        self.ids: set[str] = set()  # every one got one token per step up to last_step
        self.last_step = 0  # steps processed so far (the latest one's number)
        self.last_clock = (0.0, 0.0)  # (wall, simulated) clock after that step

    def settle(self, request_id: str, state: RequestState) -> None:
        """Write the run of `request_id` (if any) into its `state`: its tokens counted, its
        latest token's times set; it leaves the runs."""
        ids = self.ids
        if request_id in ids:
            ids.discard(request_id)
            state.num_output_tokens += self.last_step - state.run_start_step + 1
            state.last_token_s, state.last_token_sim_s = self.last_clock

    def end_step(self, states: Mapping[str, RequestState], continued: set[str],
                 started: Iterable[str], now_s: float, now_sim_s: float) -> None:
        """Close a processed step at (now_s, now_sim_s): `continued` requests (in the runs,
        one token each this step, unwritten) go on; `started` ones (their tokens up to this
        step written) start runs; the other runs end with the previous step (settled)."""
        for request_id in self.ids - continued:
            self.settle(request_id, states[request_id])
        self.last_step += 1
        for request_id in started:
            states[request_id].run_start_step = self.last_step + 1
            continued.add(request_id)
        self.ids = continued
        self.last_clock = (now_s, now_sim_s)
