"""EngineCore: the synchronous engine loop body.

    step():  scheduler.schedule() -> runner.execute() -> scheduler.update_from_output()
             -> detokenize, stop strings, latencies on both clocks -> list[RequestOutput]

Not thread-safe; the async front end calls it from one engine thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import torch

from engine.config import AUTO_FP32_MAX_PARAMS, EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.models.loader import LoadedModel, load_model
from engine.outputs import RequestOutput, ScheduledChunk, SchedulerOutput, TokenUpdate
from engine.request import FinishReason, Request, SamplingParams
from engine.request_state import RequestState
from engine.runner import ModelRunner, kv_block_bytes
from engine.scheduler import Scheduler
from engine.spec.factory import build_drafter
from engine.stats import FinishedRequestStats, IterationStats, SpecDecodingStats
from npu_sim.hardware import load_chip
from npu_sim.kernels import native
from npu_sim.trace import StepTrace, write_perfetto

logger = logging.getLogger("xyserve")


class EngineCore:
    """Owns the scheduler, the model runner and each request's output-side state.

    Two clocks: wall time (time.monotonic) and the simulated NPU clock `sim_now_s`, which
    advances by each step's simulated time and, when the engine is idle, jumps forward to the
    next arrival (measured from the engine's start), so simulated latencies are what the NPU
    would take from each request's arrival.
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        loaded = loaded or load_model(config.model)
        self.model_name = loaded.name
        self.model_path = loaded.path  # the local HF directory the weights came from
        self.tokenizer = loaded.tokenizer
        self.arch = arch = loaded.arch
        self.dtype = resolve_dtype(config.dtype, sum(t.numel() for t in loaded.weights.values()))
        self.max_model_len = config.scheduler.max_model_len or arch.max_position_embeddings
        if self.max_model_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {arch.max_position_embeddings}")
        block_size = config.cache.block_size
        self.num_kv_blocks = config.cache.num_kv_blocks or max(
            1, config.cache.kv_cache_memory_bytes // kv_block_bytes(arch, block_size, self.dtype))
        self.chip = load_chip(config.npu)
        spec = config.speculative_config
        self.runner = ModelRunner(loaded, self.dtype, self.chip, self.num_kv_blocks, block_size,
                                  seed=config.seed, strict=config.strict_kernels,
                                  npu_dtype=config.npu_dtype, speculative=spec)
        if spec.enabled:
            self.runner.attach_drafter(build_drafter(
                spec, self.runner.device, self.dtype, block_size, self.num_kv_blocks,
                arch.vocab_size, config.seed))
        self.scheduler = Scheduler(config.scheduler, self.num_kv_blocks, block_size,
                                   self.max_model_len,
                                   enable_prefix_caching=config.cache.enable_prefix_caching,
                                   speculative=spec)
        self._states: dict[str, RequestState] = {}  # unfinished requests' output-side state
        self._finished_outside: list[FinishedRequestStats] = []  # aborted between steps
        self._wall_origin_s = time.monotonic()
        self.sim_now_s = 0.0  # the simulated NPU clock, in seconds since the engine started
        self.num_steps = 0  # non-empty steps run
        self.last_stats: IterationStats | None = None  # the latest step's, for stat loggers
        logger.info("engine ready: %s, %s on CPU, simulated %s (%s), KV cache %d blocks x %d "
                    "tokens = %d tokens", loaded.name, str(self.dtype).removeprefix("torch."),
                    self.chip.name, config.npu_dtype, self.num_kv_blocks, block_size,
                    self.num_kv_blocks * block_size)

    # ------------------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError (nothing queued) if it can never be served.

        arrival_time: wall clock (time.monotonic) when it was accepted; default now.
        """
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        eos = self.arch.eos_token_ids
        if len(eos) > 1 and not params.ignore_eos:
            # Every EOS id of the model stops generation; the first is the request's own.
            extra = tuple(t for t in eos[1:] if t not in params.stop_token_ids)
            params = replace(params, stop_token_ids=params.stop_token_ids + extra)
        arrival_s = time.monotonic() if arrival_time is None else arrival_time
        request = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                          sampling_params=params, arrival_time=arrival_s,
                          eos_token_id=eos[0] if eos else None)
        idle = not self.scheduler.has_unfinished_requests()
        self.scheduler.add_request(request)
        if idle:  # nothing ran meanwhile: the simulated clock jumps to this arrival
            self.sim_now_s = max(self.sim_now_s, arrival_s - self._wall_origin_s)
        self._states[request_id] = RequestState(
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
            num_prompt_tokens=len(prompt_token_ids), arrival_s=arrival_s,
            arrival_sim_s=self.sim_now_s)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish these requests now (unknown or finished ids are ignored); frees their blocks."""
        self.scheduler.finish_requests(request_ids, FinishReason.ABORT)
        now_s = time.monotonic()
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is not None:
                self._finished_outside.append(FinishedRequestStats(
                    FinishReason.ABORT.value, state.metrics(now_s, self.sim_now_s)))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns a delta for every request that changed.

        `last_stats` then holds the step's IterationStats.
        """
        start_s = time.monotonic()
        scheduler_output = self.scheduler.schedule()
        stats = _StatsBuilder(self._finished_outside)
        self._finished_outside = []
        if scheduler_output.is_empty:
            # Nothing to run, but the runner still hears of finished requests.
            self.runner.sampler.free(scheduler_output.finished_ids)
            self.last_stats = stats.build(0.0, 0.0, None)
            return []
        for chunk in scheduler_output.chunks:
            state = self._states[chunk.request_id]
            if state.first_scheduled_s is None:
                state.first_scheduled_s = start_s
            if not _is_decode(chunk, state.num_prompt_tokens):
                stats.num_prompt_tokens += chunk.num_known_tokens
        stats.num_preempted = len(scheduler_output.preempted_ids)
        try:
            model_output = self.runner.execute(scheduler_output, self.scheduler.requests)
        except Exception:
            # A fault in the model fails the requests of this step only; the engine goes on.
            logger.exception("step failed; failing its %d requests", len(scheduler_output.chunks))
            failed = [c.request_id for c in scheduler_output.chunks]
            self.scheduler.finish_requests(failed, FinishReason.ERROR)
            now_s = time.monotonic()
            outputs = [self._to_output(TokenUpdate(r, (), None, FinishReason.ERROR), now_s, stats)
                       for r in failed]
            self.last_stats = stats.build(now_s - start_s, 0.0, None)
            return outputs
        trace = model_output.trace
        step_sim_s = trace.sim_s if trace is not None else 0.0
        self.sim_now_s += step_sim_s
        self.num_steps += 1
        self._write_npu_trace(trace)
        stats.spec = _spec_stats(scheduler_output, model_output.sampled_token_ids,
                                 self.config.speculative_config.num_speculative_tokens)
        updates = self.scheduler.update_from_output(scheduler_output, model_output)
        now_s = time.monotonic()
        outputs = [self._to_output(u, now_s, stats) for u in updates]
        self.last_stats = stats.build(now_s - start_s, step_sim_s, trace)
        return outputs

    def _to_output(self, update: TokenUpdate, now_s: float,
                   stats: _StatsBuilder) -> RequestOutput:
        request_id = update.request_id
        state = self._states[request_id]
        # A STOP from the scheduler means EOS or a stop token id: its text is not output.
        token_ids, text, stopped = _detokenize(state.detokenizer, update.new_token_ids,
                                               update.finish_reason == FinishReason.STOP)
        logprobs = update.new_logprobs
        if logprobs is not None:
            logprobs = logprobs[:len(token_ids)]
        if token_ids:
            stats.record_tokens(len(token_ids), *state.record_tokens(len(token_ids), now_s,
                                                                     self.sim_now_s))
        detok = state.detokenizer
        finish_reason = update.finish_reason
        if stopped:
            finish_reason = FinishReason.STOP
            if update.finish_reason is None:  # still running in the scheduler: end it
                self.scheduler.finish_requests([request_id], FinishReason.STOP)
        elif finish_reason is not None:
            text += detok.flush()
        metrics = None
        if finish_reason is not None:
            del self._states[request_id]
            metrics = state.metrics(now_s, self.sim_now_s)
            stats.finished.append(FinishedRequestStats(finish_reason.value, metrics))
        return RequestOutput(
            request_id=request_id, new_token_ids=token_ids, new_text=text,
            new_logprobs=logprobs, finish_reason=finish_reason,
            num_prompt_tokens=state.num_prompt_tokens,
            num_output_tokens=state.num_output_tokens, metrics=metrics)

    def _write_npu_trace(self, trace: StepTrace | None) -> None:
        trace_dir = self.config.npu_trace_dir
        if trace is None or trace_dir is None or self.num_steps > NUM_NPU_TRACE_STEPS:
            return
        path = write_perfetto(trace, Path(trace_dir) / f"step-{self.num_steps:04d}.json")
        logger.info("NPU timeline of step %d written to %s", self.num_steps, path)


NUM_NPU_TRACE_STEPS = 16  # --npu-trace writes the timelines of the first this many steps


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


def _is_decode(chunk: ScheduledChunk, num_prompt_tokens: int) -> bool:
    """A decode (or verify) computes one known token that the model itself generated."""
    return chunk.num_known_tokens == 1 and chunk.start_pos >= num_prompt_tokens


def _spec_stats(scheduler_output: SchedulerOutput, sampled: Mapping[str, tuple[int, ...]],
                num_speculative_tokens: int) -> SpecDecodingStats | None:
    """The step's verify chunks summed (accepted = tokens sampled after a verify, less the
    bonus; counted before stop conditions cut anything, as vLLM does)."""
    num_drafts = num_draft_tokens = num_accepted = 0
    per_pos = [0] * num_speculative_tokens
    for chunk in scheduler_output.chunks:
        if not chunk.num_draft_tokens or chunk.request_id not in sampled:
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
class _StatsBuilder:
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

    def record_tokens(self, num_tokens: int, latency_s: float, latency_sim_s: float,
                      first: bool) -> None:
        self.num_generation_tokens += num_tokens
        (self.ttfts_s if first else self.itls_s).append(latency_s)
        (self.ttfts_sim_s if first else self.itls_sim_s).append(latency_sim_s)

    def build(self, step_s: float, step_sim_s: float, trace: StepTrace | None) -> IterationStats:
        return IterationStats(
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_preempted_reqs=self.num_preempted, step_s=step_s, step_sim_s=step_sim_s,
            ttfts_s=tuple(self.ttfts_s), ttfts_sim_s=tuple(self.ttfts_sim_s),
            inter_token_latencies_s=tuple(self.itls_s),
            inter_token_latencies_sim_s=tuple(self.itls_sim_s),
            finished=tuple(self.finished), trace=trace, spec=self.spec)


@cache
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, num_params: int) -> torch.dtype:
    """The torch dtype for a config dtype name and a model of num_params parameters.

    auto: float32 for a model of up to AUTO_FP32_MAX_PARAMS where the fp32 C kernels run (on
    the default model both faster than bf16 on ATen, 380 vs 297 decode tok/s at batch 16, and
    exact against transformers' fp32; the fast path then keeps up to three copies of each fp32
    weight); else bf16 where the CPU computes it natively; else float32.
    """
    if name == "auto":
        if num_params <= AUTO_FP32_MAX_PARAMS and native.lib() is not None:
            return torch.float32
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
