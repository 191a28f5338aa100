"""EngineCore: the synchronous engine loop body.

    step():  scheduler.schedule() -> runner.execute() -> scheduler.update_from_output()
             -> detokenize, stop strings -> list[RequestOutput]

Not thread-safe; the async front end calls it from one engine thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import cache

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.models.loader import LoadedModel, load_model
from engine.outputs import RequestOutput, TokenUpdate
from engine.request import FinishReason, Request, SamplingParams
from engine.runner import ModelRunner, kv_block_bytes
from engine.scheduler import Scheduler
from npu_sim.hardware import DEFAULT_CHIP, get_chip

logger = logging.getLogger("xyserve")


class EngineCore:
    """Owns the scheduler, the model runner and each request's detokenizer."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        loaded = loaded or load_model(config.model)
        self.model_name = loaded.name
        self.model_path = loaded.path  # the local HF directory the weights came from
        self.tokenizer = loaded.tokenizer
        self.arch = arch = loaded.arch
        self.dtype = resolve_dtype(config.dtype)
        self.max_model_len = config.scheduler.max_model_len or arch.max_position_embeddings
        if self.max_model_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {arch.max_position_embeddings}")
        block_size = config.cache.block_size
        self.num_kv_blocks = config.cache.num_kv_blocks or max(
            1, config.cache.kv_cache_memory_bytes // kv_block_bytes(arch, block_size, self.dtype))
        self.runner = ModelRunner(loaded, self.dtype, get_chip(DEFAULT_CHIP), self.num_kv_blocks,
                                  block_size, seed=config.seed, strict=config.strict_kernels)
        self.scheduler = Scheduler(config.scheduler, self.num_kv_blocks, block_size,
                                   self.max_model_len)
        self._tracked: dict[str, _Tracked] = {}  # unfinished requests' output-side state
        logger.info("engine ready: %s, %s, KV cache %d blocks x %d tokens = %d tokens",
                    loaded.name, str(self.dtype).removeprefix("torch."), self.num_kv_blocks,
                    block_size, self.num_kv_blocks * block_size)

    # ------------------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError (nothing queued) if it can never be served."""
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        eos = self.arch.eos_token_ids
        if len(eos) > 1 and not params.ignore_eos:
            # Every EOS id of the model stops generation; the first is the request's own.
            extra = tuple(t for t in eos[1:] if t not in params.stop_token_ids)
            params = replace(params, stop_token_ids=params.stop_token_ids + extra)
        request = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                          sampling_params=params,
                          arrival_time=time.monotonic() if arrival_time is None else arrival_time,
                          eos_token_id=eos[0] if eos else None)
        self.scheduler.add_request(request)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        self._tracked[request_id] = _Tracked(detok, num_prompt_tokens=len(prompt_token_ids))

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish these requests now (unknown or finished ids are ignored); frees their blocks."""
        self.scheduler.finish_requests(request_ids, FinishReason.ABORT)
        for request_id in request_ids:
            self._tracked.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns a delta for every request that changed."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            # Nothing to run, but the runner still hears of finished requests.
            self.runner.sampler.free(scheduler_output.finished_ids)
            return []
        try:
            model_output = self.runner.execute(scheduler_output, self.scheduler.requests)
        except Exception:
            # A fault in the model fails the requests of this step only; the engine goes on.
            logger.exception("step failed; failing its %d requests", len(scheduler_output.chunks))
            failed = [c.request_id for c in scheduler_output.chunks]
            self.scheduler.finish_requests(failed, FinishReason.ERROR)
            return [self._to_output(TokenUpdate(r, (), None, FinishReason.ERROR)) for r in failed]
        updates = self.scheduler.update_from_output(scheduler_output, model_output)
        return [self._to_output(u) for u in updates]

    def _to_output(self, update: TokenUpdate) -> RequestOutput:
        request_id = update.request_id
        tracked = self._tracked[request_id]
        tracked.num_output_tokens += len(update.new_token_ids)
        detok = tracked.detokenizer
        # A STOP from the scheduler means EOS or a stop token id: its text is not output.
        text, stopped = detok.update(update.new_token_ids,
                                     stop_terminated=update.finish_reason == FinishReason.STOP)
        finish_reason = update.finish_reason
        if stopped:
            finish_reason = FinishReason.STOP
            if update.finish_reason is None:  # still running in the scheduler: end it
                self.scheduler.finish_requests([request_id], FinishReason.STOP)
        elif finish_reason is not None:
            text += detok.flush()
        if finish_reason is not None:
            del self._tracked[request_id]
        return RequestOutput(
            request_id=request_id, new_token_ids=update.new_token_ids, new_text=text,
            new_logprobs=update.new_logprobs, finish_reason=finish_reason,
            num_prompt_tokens=tracked.num_prompt_tokens,
            num_output_tokens=tracked.num_output_tokens)


@dataclass
class _Tracked:
    """What the engine keeps of a request on the output side, beside the scheduler's record."""

    detokenizer: IncrementalDetokenizer  # text deltas and stop strings
    num_prompt_tokens: int  # prompt length
    num_output_tokens: int = 0  # tokens generated so far


@cache
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name; auto = bf16 where the CPU computes it natively."""
    if name == "auto":
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
