"""The draft-model drafter: a small model sharing the target's tokenizer proposes a chain of
tokens, running on the same simulated device as the target, inside the target's step.

It owns its LlamaModel and its own paged K/V cache (num_kv_blocks x block_size tokens, handed out
by an `engine.kv_cache.BlockPool` without prefix caching). Per request it remembers the tokens
whose K/V it holds (positions 0 .. len - 1). A `propose()` call, for the requests it is given:

1. rolls each request back to the longest common prefix of what it holds and its `token_ids`
   (drafts the target rejected vanish this way; blocks past the prefix go back to the pool),
   always recomputing at least the last token, whose logits the first draft comes from;
2. runs ONE batched catch-up step computing each request's missing tokens (after accepted
   drafts: the root token and a few drafts; for a fresh request: its whole prompt) and samples
   the first draft from each drafting request's last row;
3. runs up to max_num_tokens - 1 batched one-token decode steps, each feeding the draft tokens of
   the previous step.

Catch-up budget: at most `max_catchup_tokens` catch-up tokens per call, given to the requests
with the fewest missing tokens first (a decoding request misses 1 .. k + 1 tokens, so a long
fresh prompt never delays their drafts). A request whose catch-up does not fit computes a chunk
of what is left of the budget and proposes nothing this call (its draft prefill is chunked
across steps, as the target's own prefill is).

The steps launch on the shared `Device` without begin_step()/end_step(): the target's runner
calls propose() between its own begin_step() and end_step(), so the draft's launches are timed
as part of that step's StepTrace (Device.launch appends every launch to the open step; its
timing caches are keyed by the kernel object and its shape, so the two models' kernels never
mix up timings).

Degradation, never failure: a request whose blocks cannot be allocated loses its draft state
(freed) and gets no draft this call; a request's draft is cut to max_position_embeddings - n
tokens for a sequence of n tokens (none when n >= max_position_embeddings).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.kv_cache import BlockPool
from engine.lowering import ChunkShape, lower_step
from engine.models.llama import LlamaModel, StepInputs
from engine.models.loader import LoadedModel
from engine.sampler import generator_seed
from engine.spec.types import Draft, DraftRequest
from npu_sim.device import Device


@dataclass
class _DraftState:
    """The draft cache's view of one request."""

    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V is held, position order
    block_ids: list[int] = field(default_factory=list)  # block table: position p lives in
    #   block_ids[p // block_size]; covers at least len(token_ids) tokens


@dataclass
class _Job:
    """One request's work in one propose() call."""

    request: DraftRequest
    state: _DraftState
    catchup: list[int]  # tokens computed in the catch-up step (positions len(state.token_ids)..)
    num_drafts: int  # draft tokens to propose; 0 = catching up only
    draft: list[int] = field(default_factory=list)  # drafted so far
    probs: list[torch.Tensor] = field(default_factory=list)  # (V,) q rows of sampled requests


class DraftModelDrafter:
    """Drafter (engine.spec.types.Drafter) running a small model on the target's device.

    Not thread-safe: the engine thread calls it inside the target's step.
    """

    def __init__(self, loaded: LoadedModel, dtype: torch.dtype, device: Device, block_size: int,
                 num_kv_blocks: int, target_vocab_size: int, seed: int = 0,
                 max_catchup_tokens: int = 512) -> None:
        """Raises ValueError when the draft's vocabulary differs in size from the target's (its
        token ids would not mean the same tokens) or a size argument is not positive."""
        arch = loaded.arch
        if arch.vocab_size != target_vocab_size:
            raise ValueError(f"draft model {loaded.name!r} has a vocabulary of {arch.vocab_size} "
                             f"tokens but the target has {target_vocab_size}; the draft model "
                             "must share the target's tokenizer")
        if block_size < 1 or max_catchup_tokens < 1:
            raise ValueError("block_size and max_catchup_tokens must be at least 1")
        self.model = LlamaModel(loaded, dtype, device)
        self.arch = arch
        self.device = device
        self.block_size = block_size
        self.max_catchup_tokens = max_catchup_tokens
        self.pool = BlockPool(num_kv_blocks)  # raises ValueError for num_kv_blocks < 1
        shape = (arch.num_layers, num_kv_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        k_caches = torch.zeros(shape, dtype=dtype)  # (L, NB, BS, Hkv, D)
        v_caches = torch.zeros(shape, dtype=dtype)
        self._k_layers, self._v_layers = k_caches.unbind(0), v_caches.unbind(0)  # L x (NB, ...)
        self._generator = torch.Generator().manual_seed(generator_seed(seed))
        self._states: dict[str, _DraftState] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_held_tokens(self, request_id: str) -> int:
        """Tokens of `request_id` whose K/V the draft cache holds (0 if unknown)."""
        state = self._states.get(request_id)
        return len(state.token_ids) if state else 0

    def free(self, request_ids: Iterable[str]) -> None:
        """Forget finished or preempted requests and return their blocks (unknown ids ignored)."""
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is not None:
                self.pool.free(reversed(state.block_ids))

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest], max_num_tokens: int,
                ) -> Mapping[str, Draft]:
        """A chain of up to max_num_tokens draft tokens per request; requests still catching up,
        out of blocks or at the position limit are left out. Greedy requests get argmax chains
        (probs None); sampled ones tokens drawn from q = softmax(logits / temperature), with the
        (num_tokens, V) float32 q rows as Draft.probs."""
        if max_num_tokens < 1:
            return {}
        jobs = self._plan(requests, max_num_tokens)
        if not jobs:
            return {}
        # catch-up step: every job's missing tokens; drafting jobs sample from their last row
        logits = self._step([(j.state, j.catchup, j.num_drafts > 0) for j in jobs])
        drafting = [j for j in jobs if j.num_drafts]
        if logits is not None:
            self._sample(drafting, logits)
        for i in range(1, max_num_tokens):  # decode steps: feed draft i - 1, sample draft i
            live = [j for j in drafting if j.num_drafts > i]
            if not live:
                break
            self._sample(live, self._step([(j.state, j.draft[-1:], True) for j in live]))
        out = {}
        for j in drafting:
            probs = torch.stack(j.probs) if j.probs else None  # (num_drafts, V)
            out[j.request.request_id] = Draft(tuple(j.draft), tuple(range(-1, j.num_drafts - 1)),
                                              probs)
        return out

    # ------------------------------------------------------------------ planning

    def _plan(self, requests: Sequence[DraftRequest], max_num_tokens: int) -> list[_Job]:
        """Roll every request back, then hand out the catch-up budget and the blocks."""
        bs, max_pos = self.block_size, self.arch.max_position_embeddings
        candidates: list[tuple[DraftRequest, list[int], int]] = []  # (request, tokens, drafts)
        for r in requests:
            tokens = list(r.token_ids)
            num_drafts = min(max_num_tokens, max_pos - len(tokens))
            if not tokens or num_drafts < 1:
                self.free([r.request_id])  # sequences only grow: it will never draft again
                continue
            state = self._states.setdefault(r.request_id, _DraftState())
            # Keep the common prefix, but recompute the last token: its row gives draft 1.
            held = min(_common_prefix(state.token_ids, tokens), len(tokens) - 1)
            del state.token_ids[held:]
            keep = -(-held // bs)
            self.pool.free(reversed(state.block_ids[keep:]))
            del state.block_ids[keep:]
            candidates.append((r, tokens, num_drafts))
        # Fewest missing tokens first: decoding requests draft before long prompts catch up.
        candidates.sort(key=lambda c: len(c[1]) - len(self._states[c[0].request_id].token_ids))
        budget, jobs = self.max_catchup_tokens, []
        for r, tokens, num_drafts in candidates:
            state = self._states[r.request_id]
            held = len(state.token_ids)
            catchup = tokens[held:held + budget]
            if len(catchup) < len(tokens) - held:
                num_drafts = 0  # still catching up: a chunk now, drafts on a later call
            if not catchup:
                continue
            # Slots for the catch-up and for the num_drafts - 1 drafts fed back in decode steps.
            need_tokens = held + len(catchup) + max(num_drafts - 1, 0)
            total_blocks = -(-(len(tokens) + max(num_drafts - 1, 0)) // bs)
            missing = -(-need_tokens // bs) - len(state.block_ids)
            new_blocks = (self.pool.allocate(missing) if total_blocks <= self.pool.num_blocks
                          else None)
            if new_blocks is None:  # out of blocks (or never fits): no draft, state dropped
                self.free([r.request_id])
                continue
            state.block_ids.extend(new_blocks)
            budget -= len(catchup)
            jobs.append(_Job(r, state, catchup, num_drafts))
        return jobs

    # ------------------------------------------------------------------ execution

    def _step(self, chunks: Sequence[tuple[_DraftState, Sequence[int], bool]],
              ) -> torch.Tensor | None:
        """Compute (state, new tokens, sample) chunks in one batched draft step, appending the
        tokens to each state. Returns fp32 logits (num_sampled, V) of the sampled chunks' last
        rows, in chunk order, or None when nothing is sampled."""
        bs = self.block_size
        token_ids, positions, slots, sample_rows, shapes = [], [], [], [], []
        row = 0
        for state, new, sample in chunks:
            start = len(state.token_ids)
            pos = np.arange(start, start + len(new))  # (n,)
            table = np.asarray(state.block_ids, dtype=np.int64)
            token_ids.append(np.asarray(new, dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)  # (n,) flat cache slots
            shapes.append(ChunkShape(start, len(new), tuple(state.block_ids)))
            row += len(new)
            if sample:
                sample_rows.append(row - 1)
            state.token_ids.extend(new)
        cos, sin = self.model.rope_tables(torch.from_numpy(np.concatenate(positions)))
        inputs = StepInputs(token_ids=torch.from_numpy(np.concatenate(token_ids)), cos=cos,
                            sin=sin, slot_mapping=torch.from_numpy(np.concatenate(slots)),
                            sample_rows=torch.tensor(sample_rows, dtype=torch.int64))
        plan = lower_step(shapes, len(sample_rows), self.arch, self.device.chip, bs)
        # No begin_step()/end_step(): these launches belong to the target's open step.
        return self.model.forward(self.device, plan, inputs, self._k_layers, self._v_layers)

    def _sample(self, jobs: Sequence[_Job], logits: torch.Tensor | None) -> None:
        """Append one draft token per job from its logits row (R, V)."""
        assert logits is not None and logits.shape[0] == len(jobs)
        greedy = [j.request.params.greedy for j in jobs]
        token_ids = logits.argmax(dim=-1)  # (R,) ties -> lowest id
        sampled = [i for i, g in enumerate(greedy) if not g]
        if sampled:
            idx = torch.tensor(sampled)
            temps = torch.tensor([jobs[i].request.params.temperature for i in sampled])  # (S,)
            q = (logits[idx] / temps.unsqueeze(1)).softmax(dim=-1)  # (S, V) fp32
            token_ids[idx] = torch.multinomial(q, 1, generator=self._generator).squeeze(1)
            for i, q_row in zip(sampled, q, strict=True):
                jobs[i].probs.append(q_row)
        for j, t in zip(jobs, token_ids.tolist(), strict=True):
            j.draft.append(t)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, one C-level compare
        return n
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))  # (num_mismatches,)
    return int(diff[0])
