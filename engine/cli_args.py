"""The engine's command-line options, declared once for every command that builds an engine
(`xyserve serve`, `xyserve simulate`): each default is read from the config dataclasses (the one
source of defaults), and `engine_config(args, ...)` turns the parsed options back into a
validated EngineConfig.
"""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from engine.config import (
    NPU_STACKS,
    NPU_WEIGHTS,
    SPECULATIVE_METHODS,
    CacheConfig,
    EngineConfig,
    NpuDtype,
    SchedulerConfig,
    SchedulingPolicy,
    SpeculativeConfig,
)

# The --speculative methods that read each speculative option. Changing an option that the chosen
# method (or no method) ignores is an error, not a silent no-op.
SPECULATIVE_OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "num_speculative_tokens": SPECULATIVE_METHODS,
    "ngram_min": ("ngram", "tree"),
    "ngram_max": ("ngram", "tree"),
    "num_speculative_branches": ("tree",),
    "draft_model": ("draft-model",),
    "spec_token_cost": SPECULATIVE_METHODS,
}


def config_default(cls: type, name: str) -> Any:
    """The declared default of field `name` of dataclass `cls`."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _describe(value: Any, none_means: str) -> str:
    return none_means if value is None else str(value)


def add_config_argument(p: argparse.ArgumentParser) -> None:
    """--config FILE (read by the `xyserve` entry point before parsing; listed for --help)."""
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of this command's options (`max-num-seqs: 8`, ...); options "
                        "on the command line override it")


def add_scheduler_arguments(p: argparse.ArgumentParser,
                            kv_budget: bool = True) -> argparse._ArgumentGroup:
    """Scheduler and KV-cache options in an "engine" group, returned for command-specific
    ones. kv_budget: offer --kv-cache-memory-bytes (the CPU engine's pool budget; a simulated
    NPU sizes its pool from its HBM)."""
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int,
                   default=config_default(SchedulerConfig, "max_num_seqs"),
                   help="requests running at once (default: %(default)s)")
    e.add_argument("--max-num-batched-tokens", type=int,
                   default=config_default(SchedulerConfig, "max_num_batched_tokens"),
                   help="token budget per engine step (default: %(default)s)")
    mixed_prefill_budget = config_default(SchedulerConfig, "mixed_prefill_budget")
    e.add_argument("--mixed-prefill-budget", type=int, default=mixed_prefill_budget,
                   help="prefill tokens a step may carry while requests decode in it, which "
                        "bounds the streams' inter-token latency while long prompts arrive "
                        f"(default: {_describe(mixed_prefill_budget, 'half the token budget')})")
    max_model_len = config_default(SchedulerConfig, "max_model_len")
    e.add_argument("--max-model-len", type=int, default=max_model_len,
                   help="prompt + output tokens at most (default: "
                        f"{_describe(max_model_len, 'the model limit')})")
    e.add_argument("--scheduling-policy", default=config_default(SchedulerConfig, "policy"),
                   choices=typing.get_args(SchedulingPolicy),
                   help="token_budget: chunked prefill mixed with decodes; prefill_first: the "
                        "unchunked baseline (default: %(default)s)")
    e.add_argument("--block-size", type=int, default=config_default(CacheConfig, "block_size"),
                   help="tokens per KV-cache block (default: %(default)s)")
    num_kv_blocks = config_default(CacheConfig, "num_kv_blocks")
    e.add_argument("--num-kv-blocks", type=int, default=num_kv_blocks,
                   help="KV-cache blocks (default: "
                        f"{_describe(num_kv_blocks, 'as many as the memory holds')})")
    if kv_budget:
        e.add_argument("--kv-cache-memory-bytes", type=int,
                       default=config_default(CacheConfig, "kv_cache_memory_bytes"),
                       help="memory budget of the KV cache when --num-kv-blocks is not given "
                            "(default: %(default)s)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=config_default(CacheConfig, "enable_prefix_caching"),
                   help="share the KV blocks of common prompt prefixes between requests "
                        "(automatic prefix caching; default: %(default)s)")
    e.add_argument("--seed", type=int, default=config_default(EngineConfig, "seed"),
                   help="seed of the sampler (and of simulated draws) (default: %(default)s)")
    return e


def add_npu_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The simulated NPU's options; returns the group for command-specific ones."""
    n = p.add_argument_group("simulated NPU")
    n.add_argument("--npu", default=config_default(EngineConfig, "npu"),
                   help="chip preset (910b1, 910b2, 910b3, 910b4) or a JSON / YAML chip file "
                        "(default: %(default)s)")
    n.add_argument("--npu-dtype", default=config_default(EngineConfig, "npu_dtype"),
                   choices=typing.get_args(NpuDtype),
                   help="operand dtype the NPU cost model assumes (default: %(default)s)")
    n.add_argument("--npu-weights", default=config_default(EngineConfig, "npu_weights"),
                   choices=NPU_WEIGHTS,
                   help="the decoder layers' GEMM weights in the NPU's HBM: bf16, or weight-only "
                        "w8a16 / w4a16 (int8 / int4 with fp16 group scales, widened on the "
                        "AIVs); auto: as served (the default model's GGUF Q4_1 blocks as w4a16, "
                        "Q8_0 as w8a16), bf16 in simulate (default: %(default)s)")
    n.add_argument("--stack", default=config_default(EngineConfig, "npu_stack"), choices=NPU_STACKS,
                   help="the serving stack whose host overhead a simulated step pays: xyserve "
                        "(this system's runtime), eager (a launch-bound eager loop), vllm-ascend, "
                        "mindie (graph-captured) (default: %(default)s)")
    n.add_argument("--npu-trace", default=config_default(EngineConfig, "npu_trace_dir"),
                   metavar="DIR",
                   help="write Perfetto / Chrome timelines (a track per AI core) of the first "
                        "steps into DIR: timeline.json across them on the simulated clock, and "
                        "step-NNNN.json each; open them in ui.perfetto.dev")
    n.add_argument("--npu-trace-steps", type=int, metavar="N",
                   default=config_default(EngineConfig, "npu_trace_steps"),
                   help="with --npu-trace: the steps recorded (default: %(default)s)")
    return n


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    """The speculative-decoding options of `serve` (defaults from SpeculativeConfig)."""
    sc = SpeculativeConfig
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", default=config_default(sc, "speculative"),
                   choices=SPECULATIVE_METHODS,
                   help="draft tokens and verify them in one pass of the model: ngram (prompt "
                        "lookup, a chain), tree (prompt lookup, several continuations merged "
                        "into a token tree), draft-model (a small model, --draft-model) "
                        "(default: off)")
    g.add_argument("--num-speculative-tokens", type=int,
                   default=config_default(sc, "num_speculative_tokens"), metavar="K",
                   help="draft tokens (tree nodes) verified per request and step at most "
                        "(default: %(default)s)")
    g.add_argument("--ngram-min", type=int, default=config_default(sc, "ngram_min"), metavar="N",
                   help="ngram / tree: shortest suffix n-gram matched in the prompt and output "
                        "(default: %(default)s)")
    g.add_argument("--ngram-max", type=int, default=config_default(sc, "ngram_max"), metavar="N",
                   help="ngram / tree: longest suffix n-gram, tried first (default: %(default)s)")
    g.add_argument("--num-speculative-branches", type=int,
                   default=config_default(sc, "num_speculative_branches"), metavar="B",
                   help="tree: distinct continuations merged into one draft tree "
                        "(default: %(default)s)")
    g.add_argument("--draft-model", default=config_default(sc, "draft_model"), metavar="PATH",
                   help="draft-model: preset name, local Hugging Face directory or .gguf file "
                        "sharing the target's tokenizer")
    g.add_argument("--spec-token-cost", type=float,
                   default=config_default(sc, "spec_token_cost"), metavar="C",
                   help="what one more token adds to a step relative to its fixed cost: with B "
                        "requests decoding, drafts are verified only while their measured "
                        "acceptance is at least B*C/(1+B*C); 0 = always draft "
                        "(default: %(default)s)")


def engine_config(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    """The validated EngineConfig of the options above (plus `extra` engine fields); raises
    ValueError naming a bad value or a flag the chosen --speculative method ignores."""
    options = dict(
        model=args.model, seed=args.seed, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=args.enable_prefix_caching,
        npu=args.npu, npu_dtype=args.npu_dtype, npu_weights=args.npu_weights,
        npu_stack=args.stack,
        npu_trace_dir=args.npu_trace, npu_trace_steps=args.npu_trace_steps,
        policy=args.scheduling_policy, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        mixed_prefill_budget=args.mixed_prefill_budget, max_model_len=args.max_model_len)
    if hasattr(args, "kv_cache_memory_bytes"):
        options["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    config = EngineConfig.from_kwargs(**options, **_speculative_options(args), **extra)
    check_files(config)
    return config


def check_files(config: EngineConfig) -> None:
    """Read and validate what the config names beside the model, before anything loads: the
    chip file of --npu and the --npu-trace directory. Raises ValueError naming the flag, the
    file and (for a chip file) the field."""
    from npu_sim.hardware import load_chip  # plain Python: no torch, no model

    try:
        load_chip(config.npu)
    except ValueError as exc:
        raise ValueError(f"--npu: {exc}") from None
    if config.npu_trace_dir is not None:
        trace_dir = Path(config.npu_trace_dir)
        try:
            trace_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--npu-trace: cannot create {trace_dir}: {exc.strerror}") from None
        if not os.access(trace_dir, os.W_OK | os.X_OK):
            raise ValueError(f"--npu-trace: {trace_dir} is not writable")


def _speculative_options(args: argparse.Namespace) -> dict[str, Any]:
    """SpeculativeConfig's fields from the arguments; a ValueError names a flag that the chosen
    --speculative method ignores (changed from its default) or one that it needs."""
    method = args.speculative
    options: dict[str, Any] = {"speculative": method}
    for name, methods in SPECULATIVE_OPTION_METHODS.items():
        value = getattr(args, name)
        options[name] = value
        if method not in methods and value != config_default(SpeculativeConfig, name):
            flag = "--" + name.replace("_", "-")
            which = "" if methods == SPECULATIVE_METHODS else " " + " or ".join(methods)
            if method is None:
                raise ValueError(f"{flag} needs --speculative{which}")
            raise ValueError(f"{flag} applies only with --speculative{which}, not {method}")
    if method == "draft-model" and args.draft_model is None:
        raise ValueError("--speculative draft-model needs --draft-model PATH")
    return options
