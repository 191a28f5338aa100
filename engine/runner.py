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

from engine.lowering import ChunkShape, lower_step
from engine.models.arch import ModelArch
from engine.models.llama import LlamaModel, StepInputs
from engine.models.loader import LoadedModel
from engine.outputs import ModelOutput, SchedulerOutput
from engine.request import Request
from engine.sampler import Sampler, SamplingRow
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
                 npu_dtype: str = "bf16") -> None:
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

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput,
                requests: Mapping[str, Request]) -> ModelOutput:
        """Compute the scheduled chunks and sample one token for each chunk with `sample`.

        `requests` maps ids to the scheduler's Request records (read only).
        """
        self.sampler.free(scheduler_output.finished_ids)
        chunks = scheduler_output.chunks
        if not chunks:
            return ModelOutput(sampled_token_ids={})
        inputs = self._step_inputs(scheduler_output)
        plan = lower_step([ChunkShape(c.start_pos, c.num_tokens, c.block_ids) for c in chunks],
                          len(inputs.sample_rows), self.arch, self.device.chip, self.block_size)
        self.device.begin_step()
        logits = self.model.forward(self.device, plan, inputs, self._k_layers, self._v_layers)
        trace = self.device.end_step()
        sampled = [c for c in chunks if c.sample]
        if logits is None:
            return ModelOutput(sampled_token_ids={}, trace=trace)
        rows = []
        for c in sampled:
            req = requests[c.request_id]
            rows.append(SamplingRow(request_id=c.request_id, params=req.sampling_params,
                                    prompt_token_ids=req.prompt_token_ids,
                                    output_token_ids=req.output_token_ids,
                                    eos_token_ids=self.eos_token_ids))
        results = self.sampler.sample(logits, rows)
        token_ids = {c.request_id: (tok,) for c, (tok, _) in zip(sampled, results, strict=True)}
        logprobs = {c.request_id: (lp,) for c, (_, lp) in zip(sampled, results, strict=True)
                    if lp is not None}
        return ModelOutput(sampled_token_ids=token_ids, logprobs=logprobs, trace=trace)

    def _step_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        token_ids, positions, slots, sample_rows = [], [], [], []
        row = 0
        for c in scheduler_output.chunks:
            pos = np.arange(c.start_pos, c.context_len)
            table = np.asarray(c.block_ids, dtype=np.int64)
            token_ids.append(np.asarray(c.token_ids, dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            row += c.num_tokens
            if c.sample:
                sample_rows.append(row - 1)  # the chunk's last token predicts the next one
        pos_t = torch.from_numpy(np.concatenate(positions))
        cos, sin = self.model.rope_tables(pos_t)
        return StepInputs(
            token_ids=torch.from_numpy(np.concatenate(token_ids)),
            cos=cos, sin=sin,
            slot_mapping=torch.from_numpy(np.concatenate(slots)),
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64),
        )
