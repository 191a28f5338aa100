"""EngineCore: the synchronous engine loop body, one way through the layers.

    step():  scheduler.schedule()                     -> SchedulerOutput
             runner.execute(scheduler_output)         -> ModelOutput (+ the step's NPU time)
             scheduler.update_rows_from_output(...)   -> TokenUpdates (as plain tuples)
             output_processor.process(...)            -> RequestOutputs, stop-string hits
             scheduler.finish_requests(stop-string hits)

The runner is anything with `execute(scheduler_output) -> ModelOutput`: the compute runner
(engine.runner: weights, KV tensors, real tokens; `EngineCore.load`) or the timing-only runner
(engine.timing_runner: shapes and the NPU cost model only, for `xyserve simulate`). Either way
the scheduler, KV-cache manager, prefix cache, lowering and cost model are the same code.

Two clocks: wall time (time.monotonic) and the simulated NPU clock `sim_now_s`, which advances by
each step's simulated time. When the engine is idle the simulated clock jumps forward to the
next arrival: to the wall-clock arrival (measured from the engine's start) for a served request,
or to the simulated arrival time a simulation gives.

Not thread-safe; the async front end calls it from one engine thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from engine.config import EngineConfig
from engine.output_processor import OutputProcessor, StepResult
from engine.outputs import EngineInfo, ModelOutput, RequestOutput, SchedulerOutput
from engine.request import FinishReason, Request, RequestRejected, SamplingParams
from engine.scheduler import Scheduler
from engine.stats import IterationStats, SchedulerStats
from engine.structured.compiler import GrammarCompiler  # pure; llguidance loads on first use
from engine.token_ids import first_outside, pack

logger = logging.getLogger("xyserve")



class Runner(Protocol):
    """What the engine core drives: one step's scheduled chunks in, sampled tokens and the
    step's simulated NPU time (`ModelOutput.trace.sim_s`) out."""

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput: ...


class EngineCore:
    """Owns the scheduler, a runner and the output processor, and both clocks."""

    def __init__(self, config: EngineConfig, runner: Runner, info: EngineInfo,
                 deltas: bool = True) -> None:
        """An engine over `runner`, whose KV pool and model `info` describes. deltas: step()
        returns a delta for every request that changed; False: only the finished requests'
        (what a simulation reads; the stats still see every token).

        Use `EngineCore.load(config)` for the compute engine of `config.model`.
        """
        if info.max_model_len > info.arch.max_position_embeddings:
            raise ValueError(f"max_model_len {info.max_model_len} exceeds the model's "
                             f"max_position_embeddings {info.arch.max_position_embeddings}")
        self.config = config
        self.info = info
        self.runner = runner
        spec = config.speculative_config
        self.scheduler = Scheduler(config.scheduler, info.num_kv_blocks, info.block_size,
                                   info.max_model_len,
                                   enable_prefix_caching=config.cache.enable_prefix_caching,
                                   speculative=spec)
        self.output_processor = OutputProcessor(
            info.tokenizer, spec.num_speculative_tokens if spec.enabled else 0, deltas)
        self._wall_origin_s = time.monotonic()
        self.sim_now_s = 0.0  # the simulated NPU clock, in seconds since the engine started
        self.num_steps = 0  # non-empty steps run
        self.last_stats: IterationStats | None = None  # the latest step's, for stat loggers
        # requests whose blocks the latest step allocated for KV from another engine (P/D):
        # the caller moves the KV, then calls finish_kv_transfer
        self.last_kv_transfer_ids: tuple[str, ...] = ()
        self._npu_timeline: Any = None  # --npu-trace's timeline.json (npu_sim.trace)
        self._grammars: GrammarCompiler | None = None  # structured outputs' (with a tokenizer)
        if info.tokenizer is not None:
            self._grammars = GrammarCompiler(info.tokenizer, info.arch.vocab_size,
                                             info.arch.eos_token_ids)

    @classmethod
    def load(cls, config: EngineConfig, loaded: Any = None) -> EngineCore:
        """The compute engine: `config.model` loaded from local files (or `loaded`, an
        engine.models.loader.LoadedModel), real tokens from the compute runner."""
        from engine.runner import build_model_runner  # torch and transformers: only here

        runner, info = build_model_runner(config, loaded)
        return cls(config, runner, info)

    # ------------------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None,
                    arrival_sim_s: float | None = None, num_external_tokens: int = 0,
                    packed_prompt: bytes | None = None) -> None:
        """Queue a request. Raises RequestRejected (a ValueError; nothing queued) if it can never
        be served: token ids outside the vocabulary, lengths beyond max_model_len or the KV pool
        (engine.admission.check_fits); ValueError for an id already in use.

        arrival_time: wall clock (time.monotonic) when it was accepted; default now.
        arrival_sim_s: its arrival on the simulated clock, given by a simulation that owns that
            clock (at most `sim_now_s` unless the engine is idle); default: now on the
            simulated clock, after an idle engine's jump to the wall-clock arrival.
        num_external_tokens: leading tokens whose KV another engine computed (P/D
            disaggregation); the request waits for them to land (finish_kv_transfer) once
            admitted. Must leave at least one token to compute here.
        packed_prompt: `engine.token_ids.pack(prompt_token_ids)`, where the caller has it (a
            simulation packs its synthetic prompts from a shared filler); packed here else.
        """
        # (0 = nothing external, always valid: an empty prompt is the admission check's to
        # refuse, naming the prompt)
        if num_external_tokens != 0 and not 0 < num_external_tokens < len(prompt_token_ids):
            raise ValueError(f"num_external_tokens must be in [0, {len(prompt_token_ids)}), got "
                             f"{num_external_tokens}")
        arch = self.info.arch
        # packed once: the vocabulary check and the prefix cache's hashes read it
        if packed_prompt is None:
            packed_prompt = pack(prompt_token_ids)
        _check_token_ids(arch.vocab_size, {"prompt": packed_prompt}, prompt=prompt_token_ids,
                         logit_bias=params.logit_bias, stop_token_ids=params.stop_token_ids)
        if params.stop and self.info.tokenizer is None:
            raise RequestRejected("stop strings need a tokenizer; this engine has none",
                                  param="stop")
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammar_compiler().compile(params.structured_outputs)
        eos = arch.eos_token_ids
        if len(eos) > 1 and not params.ignore_eos:
            # Every EOS id of the model stops generation; the first is the request's own.
            extra = tuple(t for t in eos[1:] if t not in params.stop_token_ids)
            params = replace(params, stop_token_ids=params.stop_token_ids + extra)
        arrival_s = time.monotonic() if arrival_time is None else arrival_time
        request = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                          sampling_params=params, arrival_time=arrival_s,
                          eos_token_id=eos[0] if eos else None, grammar=grammar,
                          num_external_tokens=num_external_tokens)
        idle = not self.scheduler.has_unfinished_requests()
        self.scheduler.add_request(request, packed_prompt)
        if arrival_sim_s is None:  # served: it arrives on the simulated clock as it is now
            if idle:  # nothing ran meanwhile: the simulated clock jumps to this arrival
                self.sim_now_s = max(self.sim_now_s, arrival_s - self._wall_origin_s)
            arrival_sim_s = self.sim_now_s
        elif idle:
            self.sim_now_s = max(self.sim_now_s, arrival_sim_s)
        max_tokens = self.info.max_model_len - len(prompt_token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        self.output_processor.add_request(request_id, prompt_token_ids, params, arrival_s,
                                          arrival_sim_s, max_tokens)

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured outputs for this engine's tokenizer (thread-safe; call
        `.warm_up()` on it to build its tokenizer tables in the background). Raises
        RequestRejected for an engine without a tokenizer."""
        if self._grammars is None:
            raise RequestRejected("structured outputs need a tokenizer; this engine has none",
                                  param="structured_outputs")
        return self._grammars

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish these requests now (unknown or finished ids are ignored); frees their blocks."""
        self.scheduler.finish_requests(request_ids, FinishReason.ABORT)
        self.output_processor.abort_requests(request_ids, time.monotonic(), self.sim_now_s)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def finish_kv_transfer(self, request_id: str) -> None:
        """The KV of a request added with num_external_tokens has landed: it runs from there."""
        self.scheduler.finish_kv_transfer(request_id)

    def advance_clock(self, sim_s: float) -> None:
        """Jump the simulated clock forward to sim_s (never back): what a simulation does for an
        engine that had nothing to run (idle, or only waiting for KV) until sim_s."""
        self.sim_now_s = max(self.sim_now_s, sim_s)

    def unfinished_requests(self) -> list[tuple[str, int, int]]:
        """(request id, prompt tokens, output tokens) of every unfinished request."""
        return [(r.request_id, r.num_prompt_tokens, r.num_output_tokens)
                for r in self.scheduler.requests.values()]

    def make_stats(self) -> SchedulerStats:
        """The scheduler's queues and KV cache right now."""
        return self.scheduler.make_stats()

    # ---------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns a delta for every request that changed.

        `last_stats` then holds the step's IterationStats.
        """
        start_s = time.monotonic()
        scheduler_output = self.scheduler.schedule()
        self.last_kv_transfer_ids = scheduler_output.kv_transfer_ids
        if scheduler_output.is_empty:
            self.runner.execute(scheduler_output)  # it still hears of finished requests
            self.last_stats = self._with_grammar_stats(self.output_processor.idle_step())
            return []
        try:
            model_output = self.runner.execute(scheduler_output)
        except Exception:
            # A fault in the model fails the requests of this step only; the engine goes on.
            logger.exception("step failed; failing its %d requests", len(scheduler_output.chunks))
            result = self.output_processor.failed_step(scheduler_output, start_s,
                                                       time.monotonic(), self.sim_now_s)
            self.scheduler.finish_requests([c.request_id for c in scheduler_output.chunks],
                                           FinishReason.ERROR)
            return self._finish_step(result)
        trace = model_output.trace
        step_sim_s = trace.sim_s if trace is not None else 0.0
        self.sim_now_s += step_sim_s
        self.num_steps += 1
        self._write_npu_trace(trace, self.sim_now_s - step_sim_s)
        # A quiet output processor reads the sampled tokens of requests that go on itself.
        updates = self.scheduler.update_rows_from_output(
            scheduler_output, model_output, finished_only=self.output_processor.quiet)
        result = self.output_processor.process(scheduler_output, model_output, updates, start_s,
                                               time.monotonic(), self.sim_now_s, step_sim_s)
        return self._finish_step(result)

    def _finish_step(self, result: StepResult) -> list[RequestOutput]:
        if result.stopped_ids:  # a stop string matched in the text: the scheduler ends them
            self.scheduler.finish_requests(result.stopped_ids, FinishReason.STOP)
        self.last_stats = self._with_grammar_stats(result.stats)
        return result.outputs

    def _with_grammar_stats(self, stats: IterationStats) -> IterationStats:
        grammar = self._grammars.take_stats() if self._grammars is not None else None
        return stats if grammar is None else replace(stats, grammar=grammar)

    def _write_npu_trace(self, trace: Any, start_sim_s: float) -> None:
        """--npu-trace: the step's own timeline file, and the step appended to timeline.json
        (all traced steps on the simulated clock, each at its start)."""
        trace_dir = self.config.npu_trace_dir
        last = self.config.npu_trace_steps
        if trace is None or trace_dir is None or self.num_steps > last:
            return
        from npu_sim.trace import StepsTimeline, write_perfetto

        if self._npu_timeline is None:
            self._npu_timeline = StepsTimeline(Path(trace_dir) / "timeline.json")
            logger.info("NPU timelines of the first %d steps go to %s (timeline.json: all of "
                        "them on the simulated clock)", last, trace_dir)
        path = write_perfetto(trace, Path(trace_dir) / f"step-{self.num_steps:04d}.json")
        self._npu_timeline.add(trace, start_sim_s, f"step {self.num_steps}")
        if self.num_steps == last:
            self._npu_timeline.close()
        logger.debug("NPU timeline of step %d written to %s", self.num_steps, path)


def _check_token_ids(vocab_size: int, packed: Mapping[str, bytes | None],
                     **fields: Iterable[int]) -> None:
    """Raise RequestRejected naming the first field with a token id outside the vocabulary.
    packed: `engine.token_ids.pack` of fields, by name, where the caller has it."""
    for name, ids in fields.items():
        if not ids:  # (most requests: no logit bias, no stop ids)
            continue
        bad = first_outside(ids if isinstance(ids, list | tuple) else list(ids), vocab_size,
                            packed.get(name))
        if bad is not None:
            raise RequestRejected(f"{name}: token id {bad} is outside the vocabulary "
                                  f"[0, {vocab_size})", param=name)
