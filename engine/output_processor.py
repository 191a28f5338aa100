"""The output side of a step: the scheduler's token updates -> what clients see.

Per request it keeps a RequestState (detokenizer, timeline on both clocks). Per step it turns
the token updates into RequestOutputs (text deltas; tokens after a stop string dropped), notes
latencies on the wall clock and the simulated NPU clock, and builds the step's IterationStats.
It never touches the scheduler: the ids whose text hit a stop string come back in the
StepResult, and the engine core finishes them, once per step.

Without a tokenizer (a timing-only engine) there is no text: deltas carry token ids only, and
stop strings cannot be asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.frozen import build_frozen
from engine.outputs import (
    ModelOutput,
    RequestOutput,
    SchedulerOutput,
    TokenLogprob,
    TokenUpdateRow,
    decode_rows,
)
from engine.request import FinishReason, SamplingParams
from engine.request_state import RequestState
from engine.stats import FinishedRequestStats, IterationStats, SpecDecodingStats
from engine.token_runs import TokenRuns


@dataclass(frozen=True)
class StepResult:
    """What one step gave the clients."""

    outputs: list[RequestOutput]  # a delta for every request that changed, in chunk order
    stopped_ids: list[str]  # requests whose text hit a stop string while still running in the
    #   scheduler: the core finishes them (their outputs already say "stop")
    stats: IterationStats  # the step's statistics


class OutputProcessor:
    """Detokenizing, stop strings, both clocks' latencies and per-step stats.

    Not thread-safe: the engine thread alone calls it.
    """

    def __init__(self, tokenizer: Any | None, num_speculative_tokens: int,
                 deltas: bool = True) -> None:
        """tokenizer: a Hugging Face tokenizer, or None for token ids without text.
        num_speculative_tokens: the most draft nodes a verify has (its per-position counters);
        0: speculative decoding is off, so no chunk carries drafts (no spec stats to collect).
        deltas: output every request that changed; False: only the finished ones (a simulation
        reads latencies from the stats and results from the finished outputs, not deltas)."""
        self.tokenizer = tokenizer
        self.num_speculative_tokens = num_speculative_tokens
        self.deltas = deltas
        # No text and no deltas (a simulation): a request that goes on only has its tokens'
        # latencies noted, without an update from the scheduler or an output (process).
        self.quiet = tokenizer is None and not deltas
        self._states: dict[str, RequestState] = {}  # unfinished requests
        # A quiet processor without speculative decoding (each decode one token) leaves what
        # steady decode steps would write per request unwritten (engine.token_runs).
        self._runs = TokenRuns() if self.quiet and not num_speculative_tokens else None
        self._aborted: list[FinishedRequestStats] = []  # aborted since the last step

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams, arrival_s: float, arrival_sim_s: float,
                    max_tokens: int = 0) -> None:
        """Start tracking a request the scheduler accepted (stop strings need a tokenizer).
        max_tokens: the most it may generate (params.max_tokens resolved), for the stats."""
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        self._states[request_id] = RequestState(detokenizer, len(prompt_token_ids), arrival_s,
                                                arrival_sim_s, max_tokens, params.n)

    def abort_requests(self, request_ids: Iterable[str], now_s: float, now_sim_s: float) -> None:
        """Forget requests finished outside a step (aborted); they count in the next stats."""
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is not None:
                if self._runs is not None:
                    self._runs.settle(request_id, state)
                self._aborted.append(state.finished(FinishReason.ABORT.value, now_s, now_sim_s))

    def idle_step(self) -> IterationStats:
        """The stats of a step that ran nothing (aborts since the last step only)."""
        return _StepStats(self._take_aborted()).build(0.0, 0.0, None)

    def failed_step(self, scheduler_output: SchedulerOutput, start_s: float, now_s: float,
                    now_sim_s: float) -> StepResult:
        """A step whose model run raised: every request in it ends with an error."""
        stats = _StepStats(self._take_aborted())
        outputs = [self._output(c.request_id, (), None, FinishReason.ERROR, now_s, now_sim_s,
                                stats)[0]
                   for c in scheduler_output.chunks]
        return StepResult(outputs, [], stats.build(now_s - start_s, 0.0, None))

    def process(self, scheduler_output: SchedulerOutput, model_output: ModelOutput,
                updates: Sequence[TokenUpdateRow], start_s: float, now_s: float,
                now_sim_s: float, step_sim_s: float) -> StepResult:
        """One step's outputs, at wall time now_s and simulated time now_sim_s (after the step).

        updates: the scheduler's, in chunk order (TokenUpdates or their plain tuples). A quiet
        processor (`quiet`) needs only the finished requests' (`Scheduler.
        update_rows_from_output(..., finished_only=True)`): a sampling chunk without an update
        went on with its sampled tokens, uncut (only a stop cuts them, and a stop finishes).
        start_s: wall time the step started (a request first scheduled then leaves the queue).
        Raises ValueError when an update matches no chunk in that order.

        A quiet processor without speculative decoding takes a step whose decode rows
        (SchedulerOutput.num_decodes) all got a token in the previous step together, writing
        nothing per request (engine.token_runs); the others row by row.
        """
        stats = _StepStats(self._take_aborted())
        stats.num_preempted = len(scheduler_output.preempted_ids)
        speculative = self.num_speculative_tokens
        if speculative:  # else no chunk carries drafts
            stats.spec = _spec_stats(scheduler_output, model_output.sampled_token_ids,
                                     speculative)
        start_sim_s = now_sim_s - step_sim_s
        states, quiet, sampled = self._states, self.quiet, model_output.sampled_token_ids
        itls_s, itls_sim_s = stats.itls_s, stats.itls_sim_s
        outputs: list[RequestOutput] = []
        stopped_ids: list[str] = []
        num_prompt_tokens = num_quiet_tokens = 0
        rows = iter(updates)
        row = next(rows, None)
        chunks = scheduler_output.chunks
        runs = self._runs
        continued: set[str] = set()  # decode rows in the runs that go on (runs)
        started: list[str] = []  # requests that got tokens in the general walk (runs)
        num_decodes = scheduler_output.num_decodes if runs is not None else 0
        if num_decodes:
            request_ids, after_decodes = decode_rows(chunks, num_decodes)
            if runs.ids.issuperset(request_ids):
                continued, row = self._steady_decodes(request_ids, row, rows, now_s, now_sim_s,
                                                      stats, outputs, stopped_ids)
                num_quiet_tokens = len(continued)
                chunks = after_decodes
        # One walk over the chunks, taking each one's update on the way (this runs once per
        # row per step).
        for chunk in chunks:
            request_id = chunk.request_id
            state = states[request_id]
            if runs is not None:
                runs.settle(request_id, state)
            if state.first_scheduled_s is None:
                state.first_scheduled_s, state.first_scheduled_sim_s = start_s, start_sim_s
            # A decode (or verify) computes one known token that the model itself generated.
            # (chunk.num_known_tokens, inline; drafts only with speculative decoding)
            num_known_tokens = len(chunk.token_ids)
            if speculative:
                num_known_tokens -= len(chunk.draft_parents)
            if num_known_tokens != 1 or chunk.start_pos < state.num_prompt_tokens:
                num_prompt_tokens += num_known_tokens
            if row is not None and row[0] == request_id:
                _, token_ids, logprobs, finish_reason = row
                row = next(rows, None)
            elif quiet and chunk.sample:
                token_ids = sampled[request_id]  # it went on (see `updates`)
                if state.first_token_s is not None:
                    # Most rows of every simulated step: only the inter-token latencies are
                    # noted (`_StepStats.record_tokens` inline, without the calls and the tuple
                    # it returns); no text means no stop strings, so nothing stops.
                    num_new_tokens = len(token_ids)
                    num_quiet_tokens += num_new_tokens
                    state.num_output_tokens += num_new_tokens
                    itls_s.append(now_s - state.last_token_s)
                    itls_sim_s.append(now_sim_s - state.last_token_sim_s)
                    state.last_token_s, state.last_token_sim_s = now_s, now_sim_s
                    if runs is not None:
                        started.append(request_id)
                    continue
                logprobs, finish_reason = None, None
            else:
                continue  # nothing new (a prefill chunk short of the last known token)
            self._emit(request_id, token_ids, logprobs, finish_reason, now_s, now_sim_s, stats,
                       outputs, stopped_ids)
            if runs is not None and token_ids and request_id in states:
                started.append(request_id)
        if row is not None:
            raise ValueError(f"update of {row[0]!r} matches no chunk in chunk order")
        if runs is not None:
            runs.end_step(states, continued, started, now_s, now_sim_s)
        stats.num_prompt_tokens = num_prompt_tokens
        stats.num_generation_tokens += num_quiet_tokens
        return StepResult(outputs, stopped_ids,
                          stats.build(now_s - start_s, step_sim_s, model_output.trace))

    def _steady_decodes(self, request_ids: list[str], row: TokenUpdateRow | None,
                        rows: Iterator[TokenUpdateRow], now_s: float, now_sim_s: float,
                        stats: _StepStats, outputs: list[RequestOutput],
                        stopped_ids: list[str]) -> tuple[set[str], TokenUpdateRow | None]:
        """`process`' decode rows (`request_ids`) of a quiet processor's step when every one of
        them got a token in the previous step and gets one now (a decode samples one): nothing
        to write per row (engine.token_runs), one latency for all. The finished ones (their
        updates, `row` then `rows`, come first, in chunk order) are output as the general walk
        would, their ITLs that same value. Returns the rows that go on (in the runs) and the
        first update not taken."""
        continued = set(request_ids)
        last_index = -1
        while row is not None and row[0] in continued:
            index = request_ids.index(row[0])
            if index < last_index:
                break  # out of chunk order: process refuses it, as the general walk does
            last_index = index
            request_id, token_ids, logprobs, finish_reason = row
            row = next(rows, None)
            continued.discard(request_id)
            self._emit(request_id, token_ids, logprobs, finish_reason, now_s, now_sim_s, stats,
                       outputs, stopped_ids)
        assert self._runs is not None
        last_s, last_sim_s = self._runs.last_clock
        stats.itls_s += [now_s - last_s] * len(continued)
        stats.itls_sim_s += [now_sim_s - last_sim_s] * len(continued)
        return continued, row

    def _emit(self, request_id: str, token_ids: tuple[int, ...],
              logprobs: tuple[TokenLogprob, ...] | None, finish_reason: FinishReason | None,
              now_s: float, now_sim_s: float, stats: _StepStats, outputs: list[RequestOutput],
              stopped_ids: list[str]) -> None:
        """`_output`'s output appended to `outputs`, and the request to `stopped_ids` if a stop
        string ended it."""
        output, stopped = self._output(request_id, token_ids, logprobs, finish_reason, now_s,
                                       now_sim_s, stats)
        if output is not None:
            outputs.append(output)
        if stopped:
            stopped_ids.append(request_id)

    def _take_aborted(self) -> list[FinishedRequestStats]:
        aborted, self._aborted = self._aborted, []
        return aborted

    def _output(self, request_id: str, token_ids: tuple[int, ...],
                logprobs: tuple[TokenLogprob, ...] | None, finish_reason: FinishReason | None,
                now_s: float, now_sim_s: float, stats: _StepStats,
                ) -> tuple[RequestOutput | None, bool]:
        """One update's (a TokenUpdate's fields): the delta, or None when only finished
        requests are output and this one goes on; whether a stop string ended a request the
        scheduler still runs."""
        state = self._states[request_id]
        if self._runs is not None:
            self._runs.settle(request_id, state)
        text, stopped = "", False
        detok = state.detokenizer
        if detok is not None:
            # A STOP from the scheduler means EOS or a stop token id: its text is not output.
            token_ids, text, stopped = _detokenize(detok, token_ids,
                                                   finish_reason == FinishReason.STOP)
        if logprobs is not None:
            logprobs = logprobs[:len(token_ids)]
        if token_ids:
            stats.record_tokens(state, len(token_ids), now_s, now_sim_s)
        still_running = stopped and finish_reason is None
        if stopped:
            finish_reason = FinishReason.STOP
        elif finish_reason is not None and detok is not None:
            text += detok.flush()
        metrics = None
        if finish_reason is not None:
            del self._states[request_id]
            finished = state.finished(finish_reason.value, now_s, now_sim_s)
            metrics = finished.metrics
            stats.finished.append(finished)
        elif not self.deltas:
            return None, still_running
        output = RequestOutput(
            request_id=request_id, new_token_ids=token_ids, new_text=text,
            new_logprobs=logprobs, finish_reason=finish_reason,
            num_prompt_tokens=state.num_prompt_tokens,
            num_output_tokens=state.num_output_tokens, metrics=metrics)
        return output, still_running


def _detokenize(detok: IncrementalDetokenizer, token_ids: tuple[int, ...],
                stop_terminated: bool) -> tuple[tuple[int, ...], str, bool]:
    """(tokens kept, new text, stopped): several tokens at once (an accepted verify) go in one
    by one, and the ones after a stop string are dropped, as if they had come one per step."""
    if len(token_ids) <= 1:
        return (token_ids, *detok.update(token_ids, stop_terminated=stop_terminated))
    pieces = []
    for i, token_id in enumerate(token_ids):
        last = i + 1 == len(token_ids)
        piece, stopped = detok.update((token_id,), stop_terminated=stop_terminated and last)
        pieces.append(piece)
        if stopped:
            return token_ids[:i + 1], "".join(pieces), True
    return token_ids, "".join(pieces), False


def _spec_stats(scheduler_output: SchedulerOutput, sampled: Mapping[str, tuple[int, ...]],
                num_speculative_tokens: int) -> SpecDecodingStats | None:
    """The step's verify chunks summed (accepted = tokens sampled after a verify, less the
    bonus; counted before stop conditions cut anything, as vLLM does)."""
    num_drafts = num_draft_tokens = num_accepted = 0
    per_pos = [0] * num_speculative_tokens
    for chunk in scheduler_output.chunks:
        if not chunk.draft_parents or chunk.request_id not in sampled:
            continue
        accepted = len(sampled[chunk.request_id]) - 1
        num_drafts += 1
        num_draft_tokens += chunk.num_draft_tokens
        num_accepted += accepted
        for i in range(min(accepted, num_speculative_tokens)):
            per_pos[i] += 1
    if not num_drafts:
        return None
    return SpecDecodingStats(num_drafts, num_draft_tokens, num_accepted, tuple(per_pos))


@dataclass
class _StepStats:
    """Collects one step's IterationStats."""

    finished: list[FinishedRequestStats]  # requests finished this step (and aborted before)
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preempted: int = 0
    ttfts_s: list[float] = field(default_factory=list)
    ttfts_sim_s: list[float] = field(default_factory=list)
    itls_s: list[float] = field(default_factory=list)
    itls_sim_s: list[float] = field(default_factory=list)
    spec: SpecDecodingStats | None = None

    def record_tokens(self, state: RequestState, num_tokens: int, now_s: float,
                      now_sim_s: float) -> None:
        """`num_tokens` new tokens of `state`'s request at (now_s, now_sim_s)."""
        latency_s, latency_sim_s, first = state.record_tokens(num_tokens, now_s, now_sim_s)
        self.num_generation_tokens += num_tokens
        (self.ttfts_s if first else self.itls_s).append(latency_s)
        (self.ttfts_sim_s if first else self.itls_sim_s).append(latency_sim_s)

    def build(self, step_s: float, step_sim_s: float, trace: Any) -> IterationStats:
        return build_frozen(  # (once per step: see engine.frozen)
            IterationStats, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_preempted_reqs=self.num_preempted, step_s=step_s, step_sim_s=step_sim_s,
            ttfts_s=tuple(self.ttfts_s), ttfts_sim_s=tuple(self.ttfts_sim_s),
            inter_token_latencies_s=tuple(self.itls_s),
            inter_token_latencies_sim_s=tuple(self.itls_sim_s),
            finished=tuple(self.finished), trace=trace, spec=self.spec, grammar=None)
