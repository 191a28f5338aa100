"""One replica of a simulated cluster: an EngineCore (one NPU or one TP group), its role, and
the Recorder of what it ran. It answers the router's questions from the engine's own state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cluster.recorder import Recorder
from cluster.routing import PromptKey
from engine.core import EngineCore

# mixed: prefills and decodes (chunked prefill mixed with decodes, the default); prefill: runs
# prompts to their first token and hands the KV on; decode: takes handed-off requests (and
# verifies drafts when speculation is on)
Role = Literal["mixed", "prefill", "decode"]


@dataclass
class Replica:
    """An engine of the cluster (mutable: the engine steps, the recorder fills)."""

    index: int  # its position in the cluster (prefill replicas first, then decode ones)
    role: Role
    core: EngineCore  # the timing-only engine: scheduler, KV cache, lowering, cost model
    num_npus: int  # the cards it occupies (its tensor-parallel size)
    recorder: Recorder = field(default_factory=Recorder)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def outstanding_tokens(self) -> int:
        """Tokens still to run through the model, over every request it holds: the prompt not
        yet computed (or received) and each output still to come (a simulated request's
        max_tokens is its length)."""
        total = 0
        for r in self.core.scheduler.requests.values():
            done = max(r.num_computed_tokens, r.num_external_tokens)
            total += (r.max_num_tokens or r.num_tokens) - done
        return total

    def cached_prefix_tokens(self, prompt: PromptKey) -> int:
        """Tokens at the start of the prompt its prefix cache holds (0 for another block size)."""
        kv_cache = self.core.scheduler.kv_cache
        if prompt.block_size != kv_cache.block_size:
            return 0
        return kv_cache.num_cached_blocks(prompt.block_hashes) * prompt.block_size
