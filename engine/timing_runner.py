"""The timing-only runner: what `xyserve simulate` drives instead of the compute runner.

It holds no weights and no KV tensors, only a model's shape and a timing-only npu_sim Device:
each step's chunks are lowered exactly as the compute runner lowers them (engine.lowering, one
StepPlan replayed for every layer) and costed by the same cost model, so a step takes the same
simulated time whichever runner ran it. Nothing is computed, so tokens are synthetic: every
sampled row yields SYNTHETIC_TOKEN_ID, and a request ends at its max_tokens (simulated requests
ignore EOS). Speculative decoding has no real drafts to verify either: the runner proposes the
draft nodes the scheduler asks for and accepts each position of a verify with probability
`acceptance_rate` (independently, up to the first rejection: the chain model behind
engine.spec.adaptive), from a seeded generator. A step without drafts, none of whose attention
tiles is split (nearly every step of a simulation), is lowered from its chunks' lengths read
once, its launches shared with other steps kept by (tokens, sampled rows), and a step of
decodes only timed without building its attention kernel (`TimingRunner._time_unsplit`): the
same trace, bit for bit.

Any model shape works (engine.arch_presets, or a config.json read without weights), including
one card's share of a tensor-parallel group once the lowering shards it.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from engine.arch import ModelArch
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.head_prefetch import HeadPrefetcher
from engine.lowering import (
    DEFAULT_POLICY,
    AttentionPolicy,
    LoweringPolicy,
    lower_step,
    lower_step_counts,
    shared_launch_counts,
    step_launches,
)
from engine.lowering_tiles import kv_span_blocks
from engine.lowering_tp import kv_pool_blocks, shard_arch
from engine.lowering_unsplit import lower_decodes, lower_unsplit
from engine.outputs import (
    EngineInfo,
    ModelOutput,
    ScheduledChunk,
    SchedulerOutput,
    decode_rows,
    start_positions,
    token_counts,
)
from engine.spec.types import Draft
from npu_sim.cost_attention import UnsplitShape
from npu_sim.device import Device
from npu_sim.hardware import load_chip
from npu_sim.step_sums import Launches, SharedLaunches, StepTemplate
from npu_sim.tasks import AttentionKernel
from npu_sim.trace import StepTrace

logger = logging.getLogger("xyserve")

SYNTHETIC_TOKEN_ID = 1  # what every sampled row yields (any id below the vocabulary would do)
# Device memory kept back from the KV pool for activations, workspaces and the runtime: vLLM's
# default gpu_memory_utilization is 0.9, so 10% of HBM.
DEFAULT_KV_RESERVE_FRACTION = 0.1
# (tokens, sampled rows) pairs whose shared launches are kept (and heads by tokens, tails by
# sampled rows), as engine.lowering keeps them
_SHARED_LAUNCHES_LIMIT = 1 << 14


def build_timing_engine(config: EngineConfig, arch: ModelArch, model_name: str,
                        acceptance_rate: float = 0.7,
                        kv_reserve_fraction: float = DEFAULT_KV_RESERVE_FRACTION,
                        tensor_parallel_size: int = 1,
                        lowering: LoweringPolicy = DEFAULT_POLICY) -> EngineCore:
    """An EngineCore over a TimingRunner for `arch` on `config.npu` (one card, or each card of a
    tensor-parallel group of `tensor_parallel_size`): the engine that serves, timing only,
    its steps lowered under `lowering` (XY-Serve's by default; engine.lowering.BASELINE_POLICY
    for the baseline's bucket-padded GEMMs and split attention). The
    KV pool is `config.cache.num_kv_blocks` when given, else what one card's HBM holds after its
    share of the weights and the reserve (engine.lowering_tp.kv_pool_blocks). Raises
    ValueError for a model, chip or sharding it cannot simulate."""
    chip = load_chip(config.npu)
    max_model_len = config.scheduler.max_model_len or arch.max_position_embeddings
    if max_model_len > arch.max_position_embeddings:
        # Nothing is computed, so positions past the trained context cost what the shapes say;
        # a trace's long requests can then be replayed as they came.
        logger.warning("simulating %s beyond its trained context: max_model_len %d > %d",
                       model_name, max_model_len, arch.max_position_embeddings)
        arch = replace(arch, max_position_embeddings=max_model_len)
    block_size = config.cache.block_size
    shard_arch(arch, tensor_parallel_size)  # heads and MLP must divide (ValueError)
    num_kv_blocks = config.cache.num_kv_blocks or kv_pool_blocks(
        arch, chip, block_size, tensor_parallel_size, memory_fraction=1.0 - kv_reserve_fraction,
        layer_weights=lowering.weights)
    device = Device(chip, compute=False, dtype=config.npu_dtype, stack=config.npu_stack,
                    timeline=config.npu_trace_dir is not None)
    runner = TimingRunner(arch, device, block_size, acceptance_rate, config.seed,
                          tensor_parallel_size, lowering, config.npu_trace_steps)
    info = EngineInfo(
        model_name=model_name, model_path=None, arch=arch, tokenizer=None,
        max_model_len=max_model_len,
        num_kv_blocks=num_kv_blocks, block_size=block_size, dtype="none", chip=chip.name)
    logger.info("timing-only engine: %s on %s x%d (%s), KV cache %d blocks x %d tokens, "
                "lowering %s, stack %s", model_name, chip.name, tensor_parallel_size,
                config.npu_dtype, num_kv_blocks, block_size, policy_name(lowering),
                config.npu_stack)
    return EngineCore(config, runner, info, deltas=False)


def policy_name(policy: LoweringPolicy) -> str:
    """`virtual+meta` (XY-Serve's), `bucket+split` (the baseline) or a mix: GEMM + attention."""
    return f"{policy.gemm.value}+{policy.attention.value}"


class TimingRunner:
    """Runner (engine.core.Runner) that only times steps. Not thread-safe."""

    def __init__(self, arch: ModelArch, device: Device, block_size: int,
                 acceptance_rate: float = 0.7, seed: int = 0,
                 tensor_parallel_size: int = 1, policy: LoweringPolicy = DEFAULT_POLICY,
                 num_traced_steps: int = 16) -> None:
        """device: a timing-only Device (compute=False). acceptance_rate: probability that each
        draft position of a verify is accepted, given the previous one was. num_traced_steps:
        the first steps timed launch by launch for timelines (when the device keeps them).
        tensor_parallel_size: the step is one card's of a TP group (engine.lowering_tp), whose
        cards run in lockstep, so a card's time is the step's. policy: how steps are lowered
        (engine.lowering.LoweringPolicy), XY-Serve's by default."""
        if device.compute:
            raise ValueError("the timing-only runner needs a timing-only Device (compute=False)")
        if not 0.0 <= acceptance_rate <= 1.0:
            raise ValueError(f"acceptance_rate must be in [0, 1], got {acceptance_rate}")
        self.arch = arch
        self.device = device
        self.block_size = block_size
        self.acceptance_rate = acceptance_rate
        self.tp = tensor_parallel_size
        self.policy = policy
        self._rng = random.Random(seed)
        self.num_launches = 0  # kernel launches timed, ever (a layer's kernels count per layer)
        # Steps timed launch by launch, keeping their timelines: the first ones, when the
        # device keeps timelines (the engine writes them for --npu-trace).
        self.num_timelines = num_traced_steps if device.timeline else 0
        # Steps without drafts are lowered from their lengths (`_time_unsplit`); the launches
        # they share with other steps kept by (tokens, sampled rows), made of a head kept by
        # tokens and a tail kept by sampled rows (each a function of those alone:
        # engine.lowering.shared_launch_counts).
        self._card = shard_arch(arch, tensor_parallel_size)
        card = self._card
        # what a step is lowered and priced from its lengths with (Device.time_unsplit)
        self._unsplit_shape = UnsplitShape(card.num_heads // card.num_kv_heads,
                                           card.num_kv_heads, card.head_dim, block_size,
                                           kv_span_blocks(block_size))
        self._shared_launches: dict[tuple[int, int], SharedLaunches] = {}
        self._heads: dict[int, Launches] = {}
        self._tails: dict[int, Launches] = {}
        self._prefetch: HeadPrefetcher | None = None  # heads built ahead (prefetch_heads)
        self.num_adopted_heads = 0  # token counts whose head template the worker built

    def prefetch_heads(self, counts: Sequence[int]) -> None:
        """Have a forked worker build the head templates of these token counts, in this order,
        while steps run (engine.head_prefetch): a step of a count not met before adopts its
        head's template where it has arrived, instead of lowering and summing that head itself.
        Until `stop_prefetch`. A no-op without fork (Windows), and where steps are not timed
        from their lengths (the split-attention baseline's heads depend on the chunks)."""
        self.stop_prefetch()
        if (self.policy.attention is AttentionPolicy.META and self.device.cost_model.memo_rows
                and "fork" in multiprocessing.get_all_start_methods()):
            self._prefetch = HeadPrefetcher(self._head_template, counts)

    def stop_prefetch(self) -> None:
        """Stop the worker prefetch_heads started, if any (steps build their heads again)."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def _head_template(self, num_tokens: int) -> StepTemplate:
        """The head template of a step of `num_tokens` tokens, without its kernels (what the
        prefetch worker sends: `_time_unsplit` adopts it)."""
        shared = shared_launch_counts(num_tokens, 1, self.arch, self.device.chip,
                                      self.block_size, self.arch.num_layers, self.policy,
                                      tp=self.tp)
        return replace(self.device.head_template(shared.head), launches=())

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        """Time the step's chunks; one synthetic token per sampled chunk, plus the accepted
        drafts of a verify; the drafts the scheduler asked for."""
        chunks = scheduler_output.chunks
        if not chunks:
            return ModelOutput(sampled_token_ids={})
        # Per row of every step, so comprehensions (Python 3.11 reads a ScheduledChunk's slot in
        # one specialised instruction: faster than operator.attrgetter mapped in C); verifies
        # (chunks with drafts) only with speculative decoding. A chunk without drafts draws
        # nothing from the generator: its one token, directly; a verify then draws its accepted
        # drafts, in chunk order (its key keeps its place).
        token = (SYNTHETIC_TOKEN_ID,)
        num_decodes = scheduler_output.num_decodes
        decodes_only = num_decodes == len(chunks)  # a token each, sampled
        # (the decode rows' ids: the scheduler's column; decode rows carry no drafts)
        decode_ids, others = decode_rows(chunks, num_decodes)
        sampled = dict.fromkeys(decode_ids, token)
        if decodes_only:  # (most steps: no chunk has drafts, each samples)
            drafts, verifying = False, []
        else:
            sampled.update({c.request_id: token for c in others if c.sample})  # (one a request)
            drafts = any([c.draft_parents for c in others])
            verifying = [c for c in others if c.draft_parents and c.sample] if drafts else []
        num_sampled = len(sampled) + sum([c.num_draft_tokens for c in verifying])
        if self.num_timelines:  # launch by launch: the trace keeps the timeline (--npu-trace)
            self.num_timelines -= 1
            plan = lower_step(chunks, num_sampled, self.arch, self.device.chip, self.block_size,
                              self.policy, tp=self.tp)
            self.device.begin_step()
            for kernel in step_launches(plan, self.arch.num_layers):
                self.device.launch(kernel)
            trace = self.device.end_step(num_requests=len(chunks))
        else:
            trace = None if drafts else self._time_unsplit(chunks, num_sampled, decodes_only)
            if trace is None:
                shared, attention = self._lower_general(chunks, num_sampled)
                trace = self.device.time_launches(shared, attention, num_requests=len(chunks))
        self.num_launches += trace.num_launches
        for chunk in verifying:
            sampled[chunk.request_id] = token * (1 + self._num_accepted(chunk))
        drafts = {request_id: Draft.chain(token * num_drafts)
                  for request_id, num_drafts in scheduler_output.num_drafts_to_propose.items()
                  if request_id in sampled}
        return ModelOutput(sampled_token_ids=sampled, trace=trace, drafts=drafts)

    def _time_unsplit(self, chunks: tuple[ScheduledChunk, ...], num_sampled: int,
                      decodes_only: bool = False) -> StepTrace | None:
        """The trace of a step without drafts, the general path's (`lower_step_counts`,
        `Device.time_launches`) bit for bit, or None where that path is to time it: split KV,
        a chunk of no token, a lowering or cost model that prices no launch from its lengths.
        Its chunks' start positions and token counts are read once, and the step lowered,
        priced and summed from them in C (Device.time_unsplit), without an attention kernel;
        where that declines (no C library, a tile to split), its kernel is lowered from them in
        Python (engine.lowering_unsplit.lower_unsplit), a step of decodes only (most steps of a
        simulation) timed from its context lengths without one (lower_decodes,
        Device.time_decodes). The launches it shares with other steps, which depend only on
        its tokens and sampled rows, kept from the first such step: lowered from those counts
        (engine.lowering.shared_launch_counts), or, where earlier steps had its tokens and its
        sampled rows, made of the head of the former's and the tail of the latter's.
        decodes_only: the scheduler said every chunk is a decode (SchedulerOutput.num_decodes),
        so none is read for its length."""
        if (self.policy.attention is not AttentionPolicy.META
                or not self.device.cost_model.memo_rows):
            return None
        num_tokens = None if decodes_only else token_counts(chunks)
        num_tokens_all = len(chunks) if num_tokens is None else sum(num_tokens)
        key = (num_tokens_all, num_sampled)
        shared = self._shared_launches.get(key)
        if shared is None:
            head, tail = self._heads.get(num_tokens_all), self._tails.get(num_sampled)
            if head is None and tail is not None and self._prefetch is not None:
                template = self._prefetch.take(num_tokens_all)  # (built ahead, if it arrived)
                if template is not None:
                    head = self.device.adopt_head_template(template)
                    _keep(self._heads, num_tokens_all, head)
                    self.num_adopted_heads += 1
            if head is None or tail is None:  # a new token count or sampled-row count
                shared = shared_launch_counts(num_tokens_all, num_sampled, self.arch,
                                              self.device.chip, self.block_size,
                                              self.arch.num_layers, self.policy, tp=self.tp)
                _keep(self._heads, num_tokens_all, shared.head)
                _keep(self._tails, num_sampled, shared.tail)
            else:
                shared = SharedLaunches(head, tail)
            _keep(self._shared_launches, key, shared)
        start_pos = np.array(start_positions(chunks), np.int64)
        decodes = num_tokens is None or num_tokens.count(1) == len(chunks)  # a token each
        trace = self.device.time_unsplit(
            shared, start_pos, None if decodes else np.array(num_tokens, np.int64),
            self._unsplit_shape, num_requests=len(chunks))
        if trace is not None:  # (else no C library, or a tile to split: lowered in Python)
            return trace
        chip = self.device.chip
        if decodes:
            batch = lower_decodes(start_pos, self._card, chip, self.block_size)
            if batch is None:
                return None
            return self.device.time_decodes(shared, batch, num_requests=len(chunks))
        assert num_tokens is not None
        kernel = lower_unsplit(chunks, start_pos, num_tokens, self._card, chip,
                               self.block_size)
        if kernel is None:
            return None
        return self.device.time_launches(shared, (kernel,), num_requests=len(chunks))

    def _lower_general(self, chunks: tuple[ScheduledChunk, ...],
                       num_sampled: int) -> tuple[SharedLaunches, tuple[AttentionKernel, ...]]:
        """The step's launches, lowered the general way (engine.lowering.lower_step_counts)."""
        return lower_step_counts(chunks, num_sampled, self.arch, self.device.chip,
                                 self.block_size, self.arch.num_layers, self.policy, tp=self.tp)

    def _num_accepted(self, chunk: ScheduledChunk) -> int:
        """Draft positions accepted, in order, until the first rejection (a chain)."""
        accepted = 0
        while accepted < chunk.num_draft_tokens and self._rng.random() < self.acceptance_rate:
            accepted += 1
        return accepted


def _keep(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """cache[key] = value, the cache emptied first when full (_SHARED_LAUNCHES_LIMIT)."""
    if len(cache) >= _SHARED_LAUNCHES_LIMIT:
        cache.clear()
    cache[key] = value
