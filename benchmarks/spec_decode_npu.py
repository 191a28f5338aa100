"""Simulated NPU time per output token with and without speculation, at measured acceptance.

Timing only (npu_sim Device(chip, compute=False)), through the engine's own lowering: a decode
step of `batch` sequences at `context` tokens, against a step in which a share of those
sequences verify a draft instead (a chunk of 1 + L tokens whose last L are draft nodes:
`ChunkShape.draft_parents`, a chain or, for the tree drafter, a binary tree; L = the measured
mean draft length) and the rest decode. The LM head runs on every verified row. For the
draft-model drafter the draft model's own launches are added: L one-token decode steps of a
layer-skip copy of the target (its first num_layers * fraction layers, the same LM head),
launched inside the target's step (device time, no extra host overhead).

Tokens a verify yields: 1 (the bonus token) + the expected accepted length, sum over positions
of accepted_per_pos / drafts (the spec_decode_num_accepted_tokens_per_pos counters). The share of
decode slots that verify (adaptive drafting switches requests off) comes from the counters too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from benchmarks.kernels.attention import binary_tree
from benchmarks.kernels.harness import fake_chunks
from engine.arch import ModelArch
from engine.arch_presets import get_arch
from engine.config import DEFAULT_NPU
from engine.lowering import ChunkShape, lower_step, step_launches
from npu_sim.device import Device
from npu_sim.hardware import get_chip

NPU_MODEL = "llama-2-7b"
NPU_CONTEXT_TOKENS = 1024
NPU_BLOCK_SIZE = 128


@dataclass(frozen=True)
class Acceptance:
    """The spec_decode_* counters of one run (increases over it) and its decode-token count."""

    num_drafts: float  # verify chunks (one per request and step with drafts)
    num_draft_tokens: float  # draft tokens (tree nodes) verified
    num_accepted_tokens: float  # of those accepted (bonus tokens not counted)
    accepted_per_pos: tuple[float, ...]  # drafts whose accepted path reached depth i + 1
    num_decode_tokens: float  # output tokens after each request's first (prefill) token

    @property
    def rate(self) -> float:
        """Accepted / draft tokens (0 without drafts)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens one verify yields, the bonus token included (1 = drafting gains nothing)."""
        return 1.0 + (self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0)

    @property
    def expected_accepted(self) -> float:
        """Expected accepted drafts per verify from the per-position counters."""
        return sum(self.accepted_per_pos) / self.num_drafts if self.num_drafts else 0.0

    @property
    def mean_draft_len(self) -> float:
        """Draft tokens per verify."""
        return self.num_draft_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def draft_share(self) -> float:
        """Share of decode slots (a request in a step) that verified a draft: a verify yields
        1 + accepted tokens, a plain decode 1."""
        verified = self.num_drafts + self.num_accepted_tokens
        plain = max(0.0, self.num_decode_tokens - verified)
        slots = self.num_drafts + plain
        return self.num_drafts / slots if slots else 0.0


def _step_s(device: Device, arch: ModelArch, batch: int, num_verify: int, spec_len: int,
            tree: bool, context: int) -> float:
    """Simulated seconds of one step: num_verify chunks of 1 + spec_len tokens (spec_len draft
    nodes), batch - num_verify decodes, all at `context` cached tokens."""
    specs = [(context, 1 + spec_len)] * num_verify + [(context, 1)] * (batch - num_verify)
    parents = binary_tree(spec_len) if tree else tuple(range(-1, spec_len - 1))
    chunks: list[ChunkShape] = [
        dataclasses.replace(c, draft_parents=parents) if i < num_verify else c
        for i, c in enumerate(fake_chunks(specs, NPU_BLOCK_SIZE))]
    num_sampled = num_verify * (1 + spec_len) + batch - num_verify
    plan = lower_step(chunks, num_sampled, arch, device.chip, NPU_BLOCK_SIZE)
    device.begin_step()
    for kernel in step_launches(plan, arch.num_layers):
        device.launch(kernel)
    return device.end_step().sim_s


def _draft_s(device: Device, arch: ModelArch, batch: int, spec_len: int, context: int) -> float:
    """Device seconds of the draft model's spec_len one-token steps for `batch` requests."""
    if not batch:
        return 0.0
    plan = lower_step(fake_chunks([(context, 1)] * batch, NPU_BLOCK_SIZE), batch, arch,
                      device.chip, NPU_BLOCK_SIZE)
    device.begin_step()
    for kernel in step_launches(plan, arch.num_layers):
        device.launch(kernel)
    return spec_len * device.end_step().device_s


def npu_time_per_token(acceptance: Acceptance, batch: int, *, model: str = NPU_MODEL,
                       chip: str = DEFAULT_NPU, context: int = NPU_CONTEXT_TOKENS,
                       tree: bool = False, draft_layer_fraction: float | None = None,
                       all_steps_draft: bool = False) -> dict[str, float]:
    """Simulated ms per output token of `model` on `chip` at `batch` sequences of `context`
    tokens: plain decode vs speculation at `acceptance`.

    draft_layer_fraction: the draft-model drafter's layers over the target's (None: a drafter
    without a model, ngram / tree, whose host cost is not modelled). all_steps_draft: every
    decode slot verifies (ignore the measured draft share). Each request verifies in a step
    with probability `share`, so the step time is the binomial mean over verify-chunk counts.
    """
    arch = get_arch(model)
    device = Device(get_chip(chip), compute=False)
    plain_s = _step_s(device, arch, batch, 0, 0, False, context)
    out = {"decode_step_ms": plain_s * 1e3, "decode_ms_per_token": plain_s * 1e3 / batch}
    spec_len = max(1, round(acceptance.mean_draft_len))
    share = 1.0 if all_steps_draft else acceptance.draft_share
    draft_arch = None
    if draft_layer_fraction is not None:
        layers = max(1, round(arch.num_layers * draft_layer_fraction))
        draft_arch = dataclasses.replace(arch, num_layers=layers)
        out["draft_layers"] = layers

    def step(num_verify: int) -> float:
        if num_verify == 0:
            return plain_s
        t = _step_s(device, arch, batch, num_verify, spec_len, tree, context)
        if draft_arch is not None:
            t += _draft_s(device, draft_arch, num_verify, spec_len, context)
        return t

    # requests draft independently: the number of verify chunks in a step is binomial
    pmf = [math.comb(batch, n) * share**n * (1 - share) ** (batch - n) for n in range(batch + 1)]
    step_s = sum(p * step(n) for n, p in enumerate(pmf) if p > 1e-6) / sum(
        p for p in pmf if p > 1e-6)
    tokens = batch * (1 + share * acceptance.expected_accepted)
    out.update({"verify_step_ms": step(batch) * 1e3 if acceptance.num_drafts else plain_s * 1e3,
                "spec_step_ms": step_s * 1e3, "tokens_per_step": tokens,
                "spec_len": spec_len, "draft_share": share,
                "spec_ms_per_token": step_s * 1e3 / tokens,
                "speedup": plain_s / batch / (step_s / tokens)})
    return out
