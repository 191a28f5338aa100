"""Engine configuration: frozen dataclasses, validated when built, the one source of defaults.

The CLI and `LLM(...)` read their defaults from these classes; nothing else hard-codes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

DEFAULT_MODEL = "smollm2-135m-instruct"
# The simulated chip: a preset name of npu_sim.hardware, kept here as a plain name so that the
# engine's configuration (and the pure scheduler that reads it) never loads the simulator.
DEFAULT_NPU = "910b2"
# The serving stacks whose host overhead the simulated NPU can model (npu_sim.host.STACKS; a test
# keeps the two equal): xyserve's own runtime, a launch-bound eager loop, vLLM-Ascend, MindIE.
NPU_STACKS = ("xyserve", "eager", "vllm-ascend", "mindie")
# How the GEMM weights lie in the simulated NPU's HBM (npu_sim.tasks.NPU_WEIGHT_FORMATS; a test
# keeps the two equal): bf16, or weight-only w8a16 / w4a16; auto: as the model is served (GGUF
# Q4_1 weights as w4a16, Q8_0 as w8a16, others bf16), bf16 in a timing-only simulation.
NPU_WEIGHTS = ("auto", "bf16", "w8a16", "w4a16")

Dtype = Literal["auto", "float32", "bfloat16"]
# How the GEMM weights are held on the CPU: fp32, bf16 (rounded), gguf (each weight in the
# Q4_1 / Q8_0 blocks it ships in: exact, a quarter to an eighth of the fp32 bytes), or gguf+bf16
# (bf16 rounded from the blocks; a lone stream's steps read the blocks, and on AMX so do decode
# batches, as the bf16 weights: npu_sim.kernels.gemm.PackedWeight.with_small); auto: the
# fastest this CPU has, measured (engine.platform)
WeightFormat = Literal["auto", "fp32", "bf16", "gguf", "gguf+bf16"]
WEIGHT_FORMATS = ("auto", "fp32", "bf16", "gguf", "gguf+bf16")
BF16_WEIGHT_FORMATS = ("bf16", "gguf+bf16")  # the formats that round the weights to bf16
# auto: bf16 beside BF16_WEIGHT_FORMATS, else the compute dtype (engine.platform)
KvCacheDtype = Literal["auto", "float32", "bfloat16", "float16"]
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
NpuDtype = Literal["bf16", "fp16"]
SchedulingPolicy = Literal["token_budget", "prefill_first"]
SpeculativeMethod = Literal["ngram", "tree", "draft-model"]
SPECULATIVE_METHODS = ("ngram", "tree", "draft-model")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 128  # tokens per KV block (128, as Ascend's serving stacks use)
    num_kv_blocks: int | None = None  # blocks in the pool; None = derive from the memory budget
    kv_cache_memory_bytes: int = 1 << 30  # memory budget for the pool when num_kv_blocks is None
    enable_prefix_caching: bool = True  # share full blocks of equal prefixes between requests
    #   (hashed by content, evicted LRU); on by default, as in vLLM

    def __post_init__(self) -> None:
        _require(self.block_size >= 1 and self.block_size % 16 == 0, "block_size",
                 self.block_size, "must be a positive multiple of 16")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks",
                 self.num_kv_blocks, "must be at least 1")
        _require(self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes",
                 self.kv_cache_memory_bytes, "must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    """The token-budget scheduler."""

    # Token budget per step (prefill chunks + decodes). A step of 256 tokens takes ~0.3 s on a
    # 2-core CPU: against 512, prefill-heavy and shared-prefix traffic (c = 16) kept their
    # throughput while TTFT p50 fell 30-45% and ITL p99 40-45% (benchmarks/results/2026-11-30-b.md).
    max_num_batched_tokens: int = 256
    max_num_seqs: int = 64  # requests running at once
    max_model_len: int | None = None  # prompt + output tokens; None = the model's limit
    policy: SchedulingPolicy = "token_budget"  # "prefill_first": the unchunked baseline
    # Prefill tokens (chunks of prompts, recomputes) a token_budget step may carry while requests
    # decode in it; None = half of max_num_batched_tokens. Every prefill token lengthens the
    # step that all the decoding streams wait on, so a cap bounds their inter-token latency
    # while long prompts arrive; a step without decodes still fills the whole budget. Half the
    # budget: on a 2-core AMX Xeon (budget 256) ITL p99 of 16 streams among arriving 1000-token
    # prompts fell from 229-250 to 160-174 ms with p50, the prompts' TTFT and prefill-heavy
    # throughput unchanged (benchmarks/results/2026-12-04-mixed-load.md).
    mixed_prefill_budget: int | None = None

    @property
    def mixed_prefill_cap(self) -> int:
        """The prefill tokens a step with decodes may carry (mixed_prefill_budget resolved)."""
        if self.mixed_prefill_budget is not None:
            return self.mixed_prefill_budget
        return max(1, self.max_num_batched_tokens // 2)

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 self.max_num_batched_tokens, "must be at least 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be at least 1")
        _require(self.mixed_prefill_budget is None or self.mixed_prefill_budget >= 1,
                 "mixed_prefill_budget", self.mixed_prefill_budget, "must be at least 1")
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len",
                 self.max_model_len, "must be at least 2")
        _require(self.policy in ("token_budget", "prefill_first"), "policy", self.policy,
                 "must be token_budget or prefill_first")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (the verify stage); off unless `speculative` names a drafter."""

    speculative: SpeculativeMethod | None = None  # ngram | tree | draft-model; None = off
    num_speculative_tokens: int = 4  # k: draft tokens (tree nodes) verified per step at most
    ngram_min: int = 1  # shortest suffix n-gram the prompt-lookup drafters match
    ngram_max: int = 4  # longest suffix n-gram they try first
    num_speculative_branches: int = 3  # tree: distinct continuations merged into one tree
    draft_model: str | None = None  # draft-model: preset, HF directory or .gguf sharing the
    #   target's tokenizer
    spec_token_cost: float = 0.1  # c: what one more token adds to a step, relative to the
    #   step's fixed cost (reading the weights); with B requests decoding, a draft position is
    #   verified only while its measured acceptance is at least B c / (1 + B c) (9% at B = 1,
    #   62% at B = 16), so speculation stops where it would cost more than it saves. 0 = always
    #   draft. (Calibrated on a 2-core CPU: the default model's decode step costs ~45 ms + ~1 ms
    #   of GEMM per token, but plain chat at concurrency 16 still lost 13% at c = 0.045.)

    def __post_init__(self) -> None:
        _require(self.speculative is None or self.speculative in SPECULATIVE_METHODS,
                 "speculative", self.speculative,
                 f"must be one of {', '.join(SPECULATIVE_METHODS)}")
        _require(1 <= self.num_speculative_tokens <= 63, "num_speculative_tokens",
                 self.num_speculative_tokens, "must be in [1, 63]")
        _require(1 <= self.ngram_min <= self.ngram_max, "ngram_min", self.ngram_min,
                 "must be at least 1 and at most ngram_max")
        _require(self.num_speculative_branches >= 1, "num_speculative_branches",
                 self.num_speculative_branches, "must be at least 1")
        _require((self.speculative == "draft-model") == (self.draft_model is not None),
                 "draft_model", self.draft_model,
                 "must be given exactly when speculative is draft-model")
        _require(self.spec_token_cost >= 0.0, "spec_token_cost", self.spec_token_cost,
                 "must be non-negative")

    @property
    def enabled(self) -> bool:
        return self.speculative is not None


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start."""

    model: str = DEFAULT_MODEL  # preset name, local HF directory or local .gguf file
    dtype: Dtype = "auto"  # CPU compute (activation) dtype; auto: the fastest this CPU has,
    #   measured once per CPU model (engine.platform)
    weight_format: WeightFormat = "auto"  # GEMM weights on the CPU (see WeightFormat)
    kv_cache_dtype: KvCacheDtype = "auto"  # the paged KV cache's dtype (16 bits halve its
    #   memory and traffic, fp32 accumulation either way)
    seed: int = 0  # seed of the sampler's shared RNG (requests without their own seed)
    threads: int | None = None  # CPU threads of the engine's kernels (torch's and the native
    #   ones' OpenMP team); None = the cores this process may use (its CPU affinity)
    pin_threads: bool = True  # the server's engine loop pins its kernel threads one per CPU
    #   (where there is a thread per usable CPU: engine.platform.pin_kernel_threads)
    strict_kernels: bool = False  # run every kernel task by task (reference path); slow
    npu: str = DEFAULT_NPU  # simulated chip: a preset (910b1..910b4) or a JSON / YAML chip file
    npu_dtype: NpuDtype = "bf16"  # operand dtype the cost model assumes on the NPU
    npu_weights: str = "auto"  # the decoder layers' GEMM weights in the NPU's HBM (NPU_WEIGHTS)
    npu_stack: str = NPU_STACKS[0]  # whose host and runtime overhead each step pays
    #   (npu_sim.host: per step, per launch, per request)
    npu_trace_dir: str | None = None  # write Perfetto timelines of the first steps here
    npu_trace_steps: int = 16  # steps --npu-trace records (one timeline.json across them, and
    #   a step-NNNN.json each)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        _require(self.dtype in ("auto", "float32", "bfloat16"), "dtype", self.dtype,
                 "must be auto, float32 or bfloat16")
        _require(self.weight_format in WEIGHT_FORMATS, "weight_format", self.weight_format,
                 f"must be one of {', '.join(WEIGHT_FORMATS)}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
                 f"must be one of {', '.join(KV_CACHE_DTYPES)}")
        _require(self.threads is None or self.threads >= 1, "threads", self.threads,
                 "must be at least 1")
        _require(self.npu_dtype in ("bf16", "fp16"), "npu_dtype", self.npu_dtype,
                 "must be bf16 or fp16")
        _require(self.npu_weights in NPU_WEIGHTS, "npu_weights", self.npu_weights,
                 f"must be one of {', '.join(NPU_WEIGHTS)}")
        _require(self.npu_trace_steps >= 1, "npu_trace_steps", self.npu_trace_steps,
                 "must be at least 1")
        _require(self.npu_stack in NPU_STACKS, "npu_stack", self.npu_stack,
                 f"must be one of {', '.join(NPU_STACKS)}")

    @staticmethod
    def from_kwargs(**kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (`max_num_seqs=8, block_size=16, ...`).

        Each name is looked up in SpeculativeConfig (`speculative="ngram"` names the drafter),
        then EngineConfig, CacheConfig and SchedulerConfig; an unknown name is a TypeError, as
        for any function.
        """
        groups: dict[type, dict[str, Any]] = {SpeculativeConfig: {}, EngineConfig: {},
                                               CacheConfig: {}, SchedulerConfig: {}}
        nested = ("cache", "scheduler", "speculative_config")
        for name, value in kwargs.items():
            for cls, bucket in groups.items():
                if name in {f.name for f in fields(cls)} and name not in nested:
                    bucket[name] = value
                    break
            else:
                raise TypeError(f"unknown engine option {name!r}")
        return replace(EngineConfig(**groups[EngineConfig]),
                       cache=CacheConfig(**groups[CacheConfig]),
                       scheduler=SchedulerConfig(**groups[SchedulerConfig]),
                       speculative_config=SpeculativeConfig(**groups[SpeculativeConfig]))


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{name} {why}, got {value!r}")
