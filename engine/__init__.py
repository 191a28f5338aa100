"""xyserve engine: token-budget scheduling, paged KV cache, model runner over the simulated NPU.

Offline use: `from engine import LLM, SamplingParams`.
"""

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.request import FinishReason, SamplingParams

__all__ = ["LLM", "CacheConfig", "EngineConfig", "FinishReason", "SamplingParams",
           "SchedulerConfig"]


def __getattr__(name: str) -> object:
    # LLM pulls in torch and transformers; import it only when asked for, so the pure parts
    # (scheduler, KV cache) stay importable without them.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
