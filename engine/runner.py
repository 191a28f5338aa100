"""ModelRunner: turns a SchedulerOutput into sampled tokens by way of the simulated NPU.

Per step: gather the batch's token ids, positions and cache slots (once, shared by all layers),
lower the batch into a StepPlan (once, replayed for every layer), run the model's launches on the
device, and sample from the logits of the rows that end a sequence's known tokens.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

import numpy as np
import torch

from engine.config import SpeculativeConfig
from engine.lowering import ChunkShape, lower_step
from engine.models.arch import ModelArch
from engine.models.llama import LlamaModel, StepInputs
from engine.models.loader import LoadedModel
from engine.outputs import ModelOutput, ScheduledChunk, SchedulerOutput, TokenLogprob
from engine.request import Request
from engine.sampler import Sampler, SamplingRow
from engine.spec.adaptive import drafts_worth
from engine.spec.types import Draft, Drafter, DraftRequest, JoinedTokens
from engine.spec.verify import node_paths, verify
from npu_sim.device import Device
from npu_sim.hardware import ChipSpec


def keep_freed_tensor_memory() -> bool:
    """Let glibc serve tensors of up to 32 MiB from the heap and keep up to 256 MiB it frees.

    By default glibc maps every allocation above a (dynamic) threshold afresh and gives freed
    heap tops back to the OS, so a step's large temporaries (gathered K/V, GEMM outputs of a long
    chunk) page-fault on every launch: measured here, gathering 11 MB of K cost 5.4 ms that way
    and 0.6 ms with the memory kept. Process-wide; skipped where the user set MALLOC_* tunables
    or the C library has no mallopt. Returns whether it applied.
    """
    if any(k.startswith(("MALLOC_MMAP_THRESHOLD", "MALLOC_TRIM_THRESHOLD")) for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


def kv_block_bytes(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * elem


class ModelRunner:
    """Owns the model weights, the paged KV cache tensors, the device and the sampler."""

    def __init__(self, loaded: LoadedModel, dtype: torch.dtype, chip: ChipSpec,
                 num_kv_blocks: int, block_size: int, seed: int, strict: bool = False,
                 npu_dtype: str = "bf16", speculative: SpeculativeConfig | None = None) -> None:
        """speculative: when enabled, `attach_drafter` must give the drafter before the first
        step (a draft model needs this runner's device)."""
        keep_freed_tensor_memory()
        self.model = LlamaModel(loaded, dtype)
        self.arch = loaded.arch
        self.device = Device(chip, strict=strict, dtype=npu_dtype)
        self.block_size = block_size
        shape = (self.arch.num_layers, num_kv_blocks, block_size, self.arch.num_kv_heads,
                 self.arch.head_dim)
        self.k_caches = torch.zeros(shape, dtype=dtype)  # (L, NB, BS, Hkv, D)
        self.v_caches = torch.zeros(shape, dtype=dtype)
        # per-layer views, made once (indexing the stacked tensor costs a call per layer)
        self._k_layers, self._v_layers = self.k_caches.unbind(0), self.v_caches.unbind(0)
        self.sampler = Sampler(seed)
        # All EOS ids of the model, masked together while a request is below min_tokens.
        self.eos_token_ids = self.arch.eos_token_ids
        self.speculative = speculative if speculative is not None and speculative.enabled else None
        self.drafter: Drafter | None = None
        self._draft_probs: dict[str, torch.Tensor] = {}  # request id -> (N, V) draft q rows

    def attach_drafter(self, drafter: Drafter) -> None:
        self.drafter = drafter

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput,
                requests: Mapping[str, Request]) -> ModelOutput:
        """Compute the scheduled chunks; sample one token for each chunk with `sample`, or, for a
        verify chunk, accept drafts and sample the token after them; propose the next drafts.

        `requests` maps ids to the scheduler's Request records (read only).
        """
        self.sampler.free(scheduler_output.finished_ids)
        if self.drafter is not None:
            gone = (*scheduler_output.finished_ids, *scheduler_output.preempted_ids)
            self.drafter.free(gone)
            for request_id in gone:
                self._draft_probs.pop(request_id, None)
        chunks = scheduler_output.chunks
        if not chunks:
            return ModelOutput(sampled_token_ids={})
        self.device.begin_step()
        logits = self.compute_logits(scheduler_output)
        if logits is None:
            return ModelOutput(sampled_token_ids={}, trace=self.device.end_step())
        token_ids, logprobs = self._sample(logits, [c for c in chunks if c.sample], requests)
        drafts = self._propose(token_ids, requests)
        trace = self.device.end_step()  # after the proposals: a draft model runs on the device
        return ModelOutput(sampled_token_ids=token_ids, logprobs=logprobs, trace=trace,
                           drafts=drafts)

    def compute_logits(self, scheduler_output: SchedulerOutput) -> torch.Tensor | None:
        """Run the model over the step's chunks (writing their K/V) inside the device's open
        step; returns (num_sample_rows, V) fp32 logits: per sampled chunk its last known token's
        row, then one row per draft node; None if nothing is sampled."""
        chunks = scheduler_output.chunks
        inputs = self._step_inputs(scheduler_output)
        plan = lower_step([ChunkShape(c.start_pos, c.num_tokens, c.block_ids, c.draft_parents)
                           for c in chunks],
                          len(inputs.sample_rows), self.arch, self.device.chip, self.block_size)
        return self.model.forward(self.device, plan, inputs, self._k_layers, self._v_layers)

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledChunk],
                requests: Mapping[str, Request],
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[TokenLogprob, ...]]]:
        """logits: (num_sample_rows, V), rows in chunk order (1 + N per verify chunk)."""
        token_ids: dict[str, tuple[int, ...]] = {}
        logprobs: dict[str, tuple[TokenLogprob, ...]] = {}
        plain = [i for i, c in enumerate(sampled) if not c.num_draft_tokens]
        first_rows = np.cumsum([0] + [1 + c.num_draft_tokens for c in sampled])[:-1]
        if plain:
            rows = []
            for i in plain:
                req = requests[sampled[i].request_id]
                rows.append(SamplingRow(request_id=req.request_id, params=req.sampling_params,
                                        prompt_token_ids=req.prompt_token_ids,
                                        output_token_ids=req.output_token_ids,
                                        eos_token_ids=self.eos_token_ids))
            plain_logits = logits if len(plain) == len(logits) else logits[first_rows[plain]]
            for row, (tok, lp) in zip(rows, self.sampler.sample(plain_logits, rows), strict=True):
                token_ids[row.request_id] = (tok,)
                if lp is not None:
                    logprobs[row.request_id] = (lp,)
        verifies = [c for c in sampled if c.num_draft_tokens]
        if verifies:
            rows_of = np.concatenate([first_rows[i] + np.arange(1 + c.num_draft_tokens)
                                      for i, c in enumerate(sampled) if c.num_draft_tokens])
            results = verify(self.sampler, logits[torch.from_numpy(rows_of)], verifies,
                             requests, self.eos_token_ids, self._draft_probs)
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
        src = self._slots(chunk.block_ids, root + 1 + np.asarray(path))
        dst = self._slots(chunk.block_ids, root + 1 + np.arange(len(path)))
        for caches in (self.k_caches, self.v_caches):
            flat = caches.view(caches.shape[0], -1, *caches.shape[3:])  # (L, NB * BS, Hkv, D)
            flat[:, dst] = flat[:, src]

    def _slots(self, block_ids: tuple[int, ...], positions: np.ndarray) -> torch.Tensor:
        table = np.asarray(block_ids, dtype=np.int64)
        bs = self.block_size
        return torch.from_numpy(table[positions // bs] * bs + positions % bs)

    def _propose(self, token_ids: Mapping[str, tuple[int, ...]],
                 requests: Mapping[str, Request]) -> dict[str, Draft]:
        """Drafts for the next step of every request that just sampled, as many nodes as its
        measured acceptance pays for (engine.spec.adaptive). Draft distributions stay here."""
        if self.drafter is None or self.speculative is None:
            return {}
        spec = self.speculative
        wanted = []
        max_num_tokens = 0
        for request_id, new_ids in token_ids.items():
            req = requests[request_id]
            # (the requests that just sampled are the next step's decodes)
            worth = drafts_worth(req, spec, len(token_ids), spec.num_speculative_tokens)
            self._draft_probs.pop(request_id, None)  # a draft is verified at most once
            if worth:
                tokens = JoinedTokens(req.prompt_token_ids, req.output_token_ids, new_ids)
                wanted.append(DraftRequest(request_id, tokens, req.sampling_params))
                max_num_tokens = max(max_num_tokens, worth)
        if not wanted:
            return {}
        drafts = {}
        for request_id, draft in self.drafter.propose(wanted, max_num_tokens).items():
            if draft.probs is not None:
                self._draft_probs[request_id] = draft.probs
            drafts[request_id] = Draft(draft.token_ids, draft.parents)
        return drafts

    def _step_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        token_ids, positions, slots, sample_rows = [], [], [], []
        row = 0
        for c in scheduler_output.chunks:
            # Slots follow the chunk's rows (a tree's siblings never share one); RoPE positions
            # are the real ones: a draft node sits at root + depth.
            slot_pos = np.arange(c.start_pos, c.context_len)
            pos = slot_pos
            if c.num_draft_tokens:
                root = c.start_pos + c.num_known_tokens - 1
                depths = [len(p) for p in node_paths(c.draft_parents)]
                pos = np.concatenate([slot_pos[:c.num_known_tokens], root + np.asarray(depths)])
            table = np.asarray(c.block_ids, dtype=np.int64)
            token_ids.append(np.asarray(c.token_ids, dtype=np.int64))
            positions.append(pos)
            slots.append(table[slot_pos // bs] * bs + slot_pos % bs)
            row += c.num_tokens
            if c.sample:
                # the last known token predicts the next one; each draft node its successor
                first = row - 1 - c.num_draft_tokens
                sample_rows.extend(range(first, row))
        pos_t = torch.from_numpy(np.concatenate(positions))
        cos, sin = self.model.rope_tables(pos_t)
        return StepInputs(
            token_ids=torch.from_numpy(np.concatenate(token_ids)),
            cos=cos, sin=sin,
            slot_mapping=torch.from_numpy(np.concatenate(slots)),
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64),
        )
