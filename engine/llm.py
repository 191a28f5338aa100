"""Offline API: `LLM(model=...).generate(prompts, params)`, batched through the same engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from engine.config import DEFAULT_MODEL, EngineConfig
from engine.core import EngineCore
from engine.outputs import TokenLogprob
from engine.request import FinishReason, SamplingParams
from engine.stats import RequestMetrics

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int  # which of the prompt's n completions
    text: str = ""  # generated text (stop strings excluded)
    token_ids: list[int] = field(default_factory=list)  # generated token ids
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None  # per token, when asked for
    metrics: RequestMetrics | None = None  # latencies on both clocks, once finished


@dataclass
class GenerateOutput:
    """Everything generated for one prompt; `.text` etc. are those of the first completion."""

    prompt: str | None  # the prompt text, when given as text
    prompt_token_ids: list[int]  # the prompt as the model saw it
    outputs: list[CompletionOutput]  # n completions

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLM:
    """An engine for offline batched generation.

    Keyword arguments are engine options (`max_num_seqs`, `block_size`, `num_kv_blocks`,
    `max_num_batched_tokens`, `dtype`, ... : the fields of EngineConfig and its parts).
    """

    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any) -> None:
        self.engine = EngineCore.load(EngineConfig.from_kwargs(model=model, **engine_options))
        self.tokenizer = self.engine.info.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerateOutput]:
        """Generate for every prompt (a string or a list of token ids), all batched together.

        Returns one GenerateOutput per prompt, in order. Raises ValueError, before running
        anything, if a prompt can never be served (too long for max_model_len or the KV pool).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = (list(params) if isinstance(params, Sequence)
                       else [params or SamplingParams()] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")

        results: list[GenerateOutput] = []
        where: dict[str, CompletionOutput] = {}
        for prompt, sp in zip(prompts, params_list, strict=True):
            ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
            outputs = [CompletionOutput(index=i, logprobs=[] if sp.logprobs is not None else None)
                       for i in range(sp.n)]
            results.append(GenerateOutput(prompt if isinstance(prompt, str) else None, ids,
                                          outputs))
            for i, out in enumerate(outputs):
                request_id = str(next(self._ids))
                try:
                    self.engine.add_request(request_id, ids, sp.for_choice(i))
                except ValueError:
                    self.engine.abort_requests(list(where))
                    raise
                where[request_id] = out

        with tqdm(total=len(where), disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    out = where[delta.request_id]
                    out.text += delta.new_text
                    out.token_ids.extend(delta.new_token_ids)
                    if out.logprobs is not None and delta.new_logprobs:
                        out.logprobs.extend(delta.new_logprobs)
                    if delta.finish_reason is not None:
                        out.finish_reason = FinishReason(delta.finish_reason).value
                        out.metrics = delta.metrics
                        bar.update(1)
        return results
