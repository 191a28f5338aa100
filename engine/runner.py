"""ModelRunner: the compute runner. Turns a SchedulerOutput into sampled tokens by way of the
simulated NPU, computing real numbers (weights and KV tensors on the CPU).

Per step: note the requests scheduled for the first time (the runner keeps its own record of
each: prompt, sampling parameters, the tokens it sampled), gather the batch's token ids,
positions and cache slots (once, shared by all layers), lower the batch into a StepPlan (once,
replayed for every layer), run the model's launches on the device, sample from the logits of the
rows that end a sequence's known tokens, and propose the drafts the scheduler asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from engine import allocator, platform
from engine.config import EngineConfig
from engine.cpus import usable_cores
from engine.lowering import LoweringPolicy, StepPlan, lower_step, step_launch_counts
from engine.models.llama import LlamaModel, StepInputs
from engine.models.loader import LoadedModel, load_model
from engine.outputs import (
    EngineInfo,
    ModelOutput,
    ScheduledChunk,
    SchedulerOutput,
    TokenLogprob,
)
from engine.runner_state import RunnerRequest
from engine.sampler import Sampler, SamplingRow
from engine.spec.types import Draft, Drafter, DraftRequest, JoinedTokens
from engine.spec.verify import verify
from engine.structured.masks import StepMasks
from engine.structured.runner_grammars import RunnerGrammars
from engine.token_tree import node_depths
from npu_sim.device import Device
from npu_sim.hardware import load_chip
from npu_sim.trace import StepTrace

logger = logging.getLogger("xyserve")


def build_model_runner(config: EngineConfig, loaded: LoadedModel | None = None,
                       ) -> tuple[ModelRunner, EngineInfo]:
    """The compute runner of `config` (loading `config.model` unless `loaded` is given) and what
    the engine serves with it. Raises ModelLoadError / ValueError for a model it cannot run."""
    torch.set_num_threads(config.threads or usable_cores())  # before the probes
    loaded = loaded or load_model(config.model)
    allocator.keep_freed_tensor_memory()
    device = Device(load_chip(config.npu), strict=config.strict_kernels, dtype=config.npu_dtype,
                    stack=config.npu_stack, timeline=config.npu_trace_dir is not None)
    fast = platform.choose_fast_path(config, loaded.arch, _ships_blocks(loaded))
    num_kv_blocks = platform.num_kv_blocks(config.cache, loaded.arch, fast.kv_cache_dtype)
    block_size = config.cache.block_size
    runner = ModelRunner(loaded, fast, device, num_kv_blocks, block_size, config.seed,
                         config.npu_weights)
    spec = config.speculative_config
    if spec.enabled:
        from engine.spec.factory import build_drafter

        runner.attach_drafter(build_drafter(spec, device, fast.dtype, block_size, num_kv_blocks,
                                            loaded.arch.vocab_size, config.seed))
    # What loading freed (unfused originals, plain copies the fast path never reads) goes back to
    # the OS; the checkpoint's mapped file goes with `loaded`, which the runner does not keep.
    allocator.release_freed_memory()
    dtype_name = str(fast.dtype).removeprefix("torch.")
    logger.info("engine ready: %s, %s activations, %s weights (%s), %s KV cache, on CPU; "
                "simulated %s (%s, %s weights, LM head %s, %s stack); KV cache %d blocks x %d "
                "tokens = %d tokens",
                loaded.name, dtype_name, "+".join(sorted(runner.model.weight_formats)),
                fast.reason, str(fast.kv_cache_dtype).removeprefix("torch."), device.chip.name,
                config.npu_dtype, runner.lowering.weights, runner.lowering.lm_head_weights,
                config.npu_stack, num_kv_blocks, block_size, num_kv_blocks * block_size)
    info = EngineInfo(
        model_name=loaded.name, model_path=str(loaded.path), arch=loaded.arch,
        tokenizer=loaded.tokenizer,
        max_model_len=config.scheduler.max_model_len or loaded.arch.max_position_embeddings,
        num_kv_blocks=num_kv_blocks, block_size=block_size, dtype=dtype_name,
        chip=device.chip.name,
        kv_cache_dtype=str(fast.kv_cache_dtype).removeprefix("torch."))
    return runner, info


def _ships_blocks(loaded: LoadedModel) -> bool:
    if loaded.gguf_path is None:
        return False
    from engine.models.gguf_weights import ships_blocks

    return ships_blocks(loaded.gguf_path)


class ModelRunner:
    """Owns the model weights, the paged KV cache tensors, the device and the sampler."""

    def __init__(self, loaded: LoadedModel, fast: platform.FastPath, device: Device,
                 num_kv_blocks: int, block_size: int, seed: int,
                 npu_weights: str = "auto") -> None:
        """fast: the activation dtype, weight format and KV-cache dtype (engine.platform);
        npu_weights: how the NPU model holds the GEMM weights (EngineConfig.npu_weights).
        With speculative decoding, `attach_drafter` gives the drafter before the first step
        (a draft model runs on this runner's device)."""
        self.device = device
        self.model = LlamaModel(loaded, fast.dtype, device, fast.weight_format)
        # The NPU model streams the GEMM weights as served (auto) or as asked (layers only)
        self.lowering = LoweringPolicy(
            weights=_npu_weights(npu_weights, self.model.layers[0].qkv),
            lm_head_weights=_npu_weights(npu_weights, self.model.lm_head)
            if npu_weights == "auto" else "bf16")
        self.arch = loaded.arch
        self.block_size = block_size
        shape = (self.arch.num_layers, num_kv_blocks, block_size, self.arch.num_kv_heads,
                 self.arch.head_dim)
        self.k_caches = torch.zeros(shape, dtype=fast.kv_cache_dtype)  # (L, NB, BS, Hkv, D)
        self.v_caches = torch.zeros(shape, dtype=fast.kv_cache_dtype)
        # per-layer views, made once (indexing the stacked tensor costs a call per layer)
        self._k_layers, self._v_layers = self.k_caches.unbind(0), self.v_caches.unbind(0)
        self.sampler = Sampler(seed)
        # All EOS ids of the model, masked together while a request is below min_tokens.
        self.eos_token_ids = self.arch.eos_token_ids
        self.requests: dict[str, RunnerRequest] = {}  # every unfinished request it was told of
        self.grammars = RunnerGrammars(self.arch.vocab_size)  # of the constrained ones
        self.drafter: Drafter | None = None
        self._draft_probs: dict[str, torch.Tensor] = {}  # request id -> (N, V) draft q rows

    def attach_drafter(self, drafter: Drafter) -> None:
        self.drafter = drafter

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        """Compute the scheduled chunks; sample one token for each chunk with `sample`, or, for a
        verify chunk, accept drafts and sample the token after them; propose the drafts
        `scheduler_output.num_drafts_to_propose` asks for."""
        self._update_requests(scheduler_output)
        chunks = scheduler_output.chunks
        if not chunks:
            return ModelOutput(sampled_token_ids={})
        sampled = [c for c in chunks if c.sample]
        # Grammar masks are filled on a worker thread while the model runs.
        masks = self.grammars.start_masks(sampled)
        self.device.begin_step()
        logits, plan = self._forward(scheduler_output)
        if logits is None:
            self.grammars.masks(masks)  # let the worker finish before anything moves on
            return ModelOutput(sampled_token_ids={}, trace=self._end_step(plan, len(chunks)))
        token_ids, logprobs = self._sample(logits, sampled, self.grammars.masks(masks))
        for request_id, new_ids in token_ids.items():
            self.requests[request_id].output_token_ids.extend(new_ids)
        self.grammars.advance(token_ids)
        drafts = self._propose(token_ids, scheduler_output.num_drafts_to_propose)
        # after the proposals: a draft model runs on the device
        return ModelOutput(sampled_token_ids=token_ids, logprobs=logprobs,
                           trace=self._end_step(plan, len(chunks)), drafts=drafts)

    def _end_step(self, plan: StepPlan, num_requests: int) -> StepTrace:
        """The device's step, timed from the plan the model ran (Device.end_planned_step: at
        batch 1 walking a step's few hundred launches was ~4% of its wall time)."""
        return self.device.end_planned_step(*step_launch_counts(plan, self.arch.num_layers),
                                            num_requests=num_requests)

    def _update_requests(self, scheduler_output: SchedulerOutput) -> None:
        """Forget finished requests (and preempted ones' drafts), learn the new ones."""
        finished = scheduler_output.finished_ids
        for request_id in finished:
            self.requests.pop(request_id, None)
        self.sampler.free(finished)
        self.grammars.free(finished)
        if self.drafter is not None:
            gone = (*finished, *scheduler_output.preempted_ids)
            self.drafter.free(gone)
            for request_id in gone:
                self._draft_probs.pop(request_id, None)
        for new in scheduler_output.new_requests:
            self.requests[new.request_id] = RunnerRequest.of(new)
            self.grammars.add(new.request_id, new.grammar)

    def compute_logits(self, scheduler_output: SchedulerOutput) -> torch.Tensor | None:
        """Run the model over the step's chunks (writing their K/V) inside the device's open
        step; returns (num_sample_rows, V) fp32 logits: per sampled chunk its last known token's
        row, then one row per draft node; None if nothing is sampled."""
        return self._forward(scheduler_output)[0]

    def _forward(self, scheduler_output: SchedulerOutput) -> tuple[torch.Tensor | None, StepPlan]:
        """compute_logits' logits, with the plan the step was lowered to."""
        chunks = scheduler_output.chunks
        inputs = self._step_inputs(scheduler_output)
        plan = lower_step(chunks, len(inputs.sample_rows), self.arch, self.device.chip,
                          self.block_size, self.lowering)
        return self.model.forward(self.device, plan, inputs, self._k_layers, self._v_layers), plan

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledChunk],
                masks: StepMasks | None,
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[TokenLogprob, ...]]]:
        """logits: (num_sample_rows, V), rows in chunk order (1 + N per verify chunk); masks:
        the grammar masks of those rows (None: no grammar among them)."""
        token_ids: dict[str, tuple[int, ...]] = {}
        logprobs: dict[str, tuple[TokenLogprob, ...]] = {}
        plain = [i for i, c in enumerate(sampled) if not c.num_draft_tokens]
        first_rows = np.cumsum([0] + [1 + c.num_draft_tokens for c in sampled])[:-1]
        if plain:
            rows = []
            for i in plain:
                req = self.requests[sampled[i].request_id]
                rows.append(SamplingRow(request_id=req.request_id, params=req.sampling_params,
                                        prompt_token_ids=req.prompt_token_ids,
                                        output_token_ids=req.output_token_ids,
                                        eos_token_ids=self.eos_token_ids))
            plain_logits = logits if len(plain) == len(logits) else logits[first_rows[plain]]
            plain_masks = None if masks is None else masks.select(first_rows[plain])
            for row, (tok, lp) in zip(rows, self.sampler.sample(plain_logits, rows, plain_masks),
                                      strict=True):
                token_ids[row.request_id] = (tok,)
                if lp is not None:
                    logprobs[row.request_id] = (lp,)
        verifies = [c for c in sampled if c.num_draft_tokens]
        if verifies:
            rows_of = np.concatenate([first_rows[i] + np.arange(1 + c.num_draft_tokens)
                                      for i, c in enumerate(sampled) if c.num_draft_tokens])
            results = verify(self.sampler, logits[torch.from_numpy(rows_of)], verifies,
                             self.requests, self.eos_token_ids, self._draft_probs,
                             None if masks is None else masks.select(rows_of))
            for c, result in zip(verifies, results, strict=True):
                token_ids[c.request_id] = result.token_ids
                if result.logprobs is not None:
                    logprobs[c.request_id] = result.logprobs
                self._move_accepted_kv(c, result.path)
        return token_ids, logprobs

    def _move_accepted_kv(self, chunk: ScheduledChunk, path: tuple[int, ...]) -> None:
        """Move the K/V of a tree's accepted path from the nodes' slots to its positions.

        Draft node j was written at slot position root + 1 + j; accepted node number i belongs
        at root + 1 + i. A chain's path is (0, 1, ...): already in place. Sources never precede
        destinations (j >= i), and the gather copies before the scatter writes.
        """
        if path == tuple(range(len(path))):
            return
        root = chunk.start_pos + chunk.num_known_tokens - 1
        bs = self.block_size
        src = torch.from_numpy(_slot_ids(chunk.block_ids, root + 1 + np.asarray(path), bs))
        dst = torch.from_numpy(_slot_ids(chunk.block_ids, root + 1 + np.arange(len(path)), bs))
        for caches in (self.k_caches, self.v_caches):
            flat = caches.view(caches.shape[0], -1, *caches.shape[3:])  # (L, NB * BS, Hkv, D)
            flat[:, dst] = flat[:, src]

    def _propose(self, token_ids: Mapping[str, tuple[int, ...]],
                 num_drafts: Mapping[str, int]) -> dict[str, Draft]:
        """Drafts for the next step of every request that just sampled, as many nodes as the
        scheduler found worth it (`num_drafts`). Draft distributions stay here."""
        if self.drafter is None:
            return {}
        wanted = []
        max_num_tokens = 0
        for request_id in token_ids:
            self._draft_probs.pop(request_id, None)  # a draft is verified at most once
            worth = num_drafts.get(request_id, 0)
            if worth:
                req = self.requests[request_id]
                tokens = JoinedTokens(req.prompt_token_ids, req.output_token_ids)
                wanted.append(DraftRequest(request_id, tokens, req.sampling_params))
                max_num_tokens = max(max_num_tokens, worth)
        if not wanted:
            return {}
        drafts = {}
        proposed = self.grammars.prune(dict(self.drafter.propose(wanted, max_num_tokens)))
        for request_id, draft in proposed.items():
            if draft.probs is not None:
                self._draft_probs[request_id] = draft.probs
            drafts[request_id] = Draft(draft.token_ids, draft.parents)
        return drafts

    def _step_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        row = 0
        for c in scheduler_output.chunks:
            token_ids += c.token_ids
            if c.num_tokens == 1:  # a decode, most rows of most steps: plain ints, no arrays
                pos = c.start_pos
                positions.append(pos)
                slots.append(c.block_ids[pos // bs] * bs + pos % bs)
            else:
                # Slots follow the chunk's rows (a tree's siblings never share one); RoPE
                # positions are the real ones: a draft node sits at root + depth.
                slot_pos = np.arange(c.start_pos, c.context_len)
                pos_of = slot_pos
                if c.num_draft_tokens:
                    root = c.start_pos + c.num_known_tokens - 1
                    depths = node_depths(c.draft_parents)
                    pos_of = np.concatenate([slot_pos[:c.num_known_tokens],
                                             root + np.asarray(depths)])
                positions += pos_of.tolist()
                slots += _slot_ids(c.block_ids, slot_pos, bs).tolist()
            row += c.num_tokens
            if c.sample:
                # the last known token predicts the next one; each draft node its successor
                first = row - 1 - c.num_draft_tokens
                sample_rows.extend(range(first, row))
        cos, sin = self.model.rope_tables(torch.tensor(positions, dtype=torch.int64))
        return StepInputs(
            token_ids=torch.tensor(token_ids, dtype=torch.int64),
            cos=cos, sin=sin,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64),
        )


def _slot_ids(block_ids: tuple[int, ...], positions: np.ndarray, block_size: int) -> np.ndarray:
    """int64 paged-cache slots (block id x block_size + offset) of a request's `positions`,
    its block table `block_ids`."""
    table = np.asarray(block_ids, dtype=np.int64)
    return table[positions // block_size] * block_size + positions % block_size


# The NPU's weight-only formats of the CPU's GGUF blocks (npu_sim.tasks.WEIGHT_QUANT)
_NPU_WEIGHTS_OF = {"q4_1": "w4a16", "q8_0": "w8a16"}


def _npu_weights(choice: str, weight: object) -> str:
    """EngineConfig.npu_weights for one served GEMM weight: auto follows its CPU format."""
    if choice != "auto":
        return choice
    return _NPU_WEIGHTS_OF.get(getattr(weight, "weight_format", ""), "bf16")
