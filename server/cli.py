"""The `xyserve` command. `xyserve serve` runs the OpenAI-compatible server.

Every option's default is read from the config dataclasses (ServerConfig, EngineConfig,
CacheConfig, SchedulerConfig, SpeculativeConfig), the one source of defaults. Subcommands
register themselves through `add_<name>_parser(subparsers)` and a `func` default, so `bench` and
`kernels` can join.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

from engine.cli_args import (
    add_config_argument,
    add_npu_arguments,
    add_scheduler_arguments,
    add_speculative_arguments,
    engine_config,
)
from engine.cli_args import config_default as _default
from engine.config import KV_CACHE_DTYPES, WEIGHT_FORMATS, Dtype, EngineConfig
from engine.cpus import usable_cores
from server import __version__
from server.cli_config import ConfigFileError, expand_config
from server.config import LOG_FORMATS, LOG_LEVELS, ServerConfig

logger = logging.getLogger("xyserve")


def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description="Serve a model over the OpenAI API "
                                          "(/v1/completions, /v1/chat/completions, ...).")
    s = ServerConfig
    add_config_argument(p)
    p.add_argument("--model", default=_default(EngineConfig, "model"),
                   help="preset name, local Hugging Face directory or local .gguf file "
                        "(default: %(default)s)")
    p.add_argument("--host", default=_default(s, "host"), help="interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=_default(s, "port"),
                   help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=_default(s, "api_key"),
                   help="require `Authorization: Bearer <key>` on all routes but /health and "
                        "/metrics (default: no key)")
    p.add_argument("--served-model-name", default=_default(s, "served_model_name"),
                   help="model name clients use (default: the --model value)")
    p.add_argument("--max-waiting-requests", type=int, default=_default(s, "max_waiting_requests"),
                   help="queued engine requests beyond which new calls get 429; a call bringing "
                        "more (prompts x n) gets 400 (default: %(default)s)")
    p.add_argument("--max-choices-per-request", type=int,
                   default=_default(s, "max_choices_per_request"),
                   help="prompts x n of one call at most, beyond which it gets 400 "
                        "(default: %(default)s)")
    p.add_argument("--cors-origins", default=",".join(_default(s, "cors_origins")),
                   help="comma-separated browser origins allowed by CORS, '*' for any "
                        "(default: none, no CORS headers)")
    p.add_argument("--log-level", default=_default(s, "log_level"), choices=LOG_LEVELS,
                   help="(default: %(default)s)")
    p.add_argument("--log-format", default=_default(s, "log_format"), choices=LOG_FORMATS,
                   help="text lines, or one JSON object a line; either way each line about an "
                        "HTTP request carries its X-Request-Id (default: %(default)s)")
    p.add_argument("--log-stats-interval", type=float, metavar="SECONDS",
                   default=_default(s, "log_stats_interval_s"),
                   help="log throughput, running / waiting requests, KV-cache usage and "
                        "prefix-cache hit rate this often while the engine works; 0 = never "
                        "(default: %(default)s)")
    p.add_argument("--log-metrics-scrapes", action="store_true",
                   help="keep GET /metrics in the access log (default: left out)")
    p.add_argument("--max-request-bytes", type=int, default=_default(s, "max_request_bytes"),
                   help="request bodies larger than this get 413 (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=_default(s, "shutdown_timeout_s"),
                   metavar="SECONDS",
                   help="on SIGTERM / SIGINT, seconds in-flight requests get to finish while new "
                        "ones get 503; then the rest are aborted (default: %(default)s)")
    c = p.add_argument_group("connections")
    c.add_argument("--header-timeout", type=float, default=_default(s, "header_timeout_s"),
                   metavar="SECONDS",
                   help="a request's headers must arrive within this many seconds of its first "
                        "byte (or of the connection's opening), else 408 and the connection "
                        "closes (default: %(default)s)")
    c.add_argument("--body-timeout", type=float, default=_default(s, "body_timeout_s"),
                   metavar="SECONDS",
                   help="a request's body must arrive within this many seconds of its headers, "
                        "else 408 and the connection closes (default: %(default)s)")
    c.add_argument("--max-connections", type=int, default=_default(s, "max_connections"),
                   help="open connections at most; one more gets 503 and is closed at once "
                        "(default: %(default)s)")
    e = add_scheduler_arguments(p)
    e.add_argument("--threads", "-t", type=int, default=_default(EngineConfig, "threads"),
                   metavar="N",
                   help="CPU threads the engine's kernels use (llama.cpp's -t) (default: the "
                        f"{usable_cores()} cores this process may use)")
    e.add_argument("--pin-threads", action=argparse.BooleanOptionalAction,
                   default=_default(EngineConfig, "pin_threads"),
                   help="pin the kernels' threads one per CPU, where there is a thread per CPU "
                        "this process may use (default: %(default)s)")
    e.add_argument("--strict-kernels", action="store_true",
                   help="run every kernel task by task (the reference path; slow)")
    e.add_argument("--dtype", default=_default(EngineConfig, "dtype"),
                   choices=typing.get_args(Dtype),
                   help="CPU activation dtype; auto: the fastest path this CPU has, measured "
                        "once per CPU model (bfloat16 only where the CPU computes it natively); "
                        "bfloat16 runs on ATen, launch by launch, outside the C kernels "
                        "(default: %(default)s)")
    e.add_argument("--weight-format", default=_default(EngineConfig, "weight_format"),
                   choices=WEIGHT_FORMATS,
                   help="GEMM weights on the CPU: fp32, bf16 (rounded), gguf (each weight in the "
                        "Q4_1 / Q8_0 blocks the model's GGUF ships, decoded inside the GEMM: "
                        "the same math as fp32, a fraction of the bytes), gguf+bf16 (bf16 "
                        "rounded from the blocks, which a lone stream's steps read, and on AMX "
                        "decode batches too, as those bf16 weights); auto: the fastest, "
                        "measured (default: %(default)s)")
    e.add_argument("--kv-cache-dtype", default=_default(EngineConfig, "kv_cache_dtype"),
                   choices=KV_CACHE_DTYPES,
                   help="the paged KV cache's dtype; 16-bit halves its memory and traffic "
                        "(auto: the activation dtype) (default: %(default)s)")
    add_npu_arguments(p)
    add_speculative_arguments(p)
    p.set_defaults(func=run_serve)


def add_kernels_parser(subparsers: Any) -> None:
    # Listed here for `xyserve --help`; main() hands `kernels ...` to the sweep, which owns its
    # options (`xyserve kernels --help`).
    subparsers.add_parser("kernels", help="kernel sweeps on the simulated NPU: meta primitives "
                                          "vs their baselines (`kernels gemm` / `kernels "
                                          "attention`: one kernel's time)")


def run_kernels(argv: list[str]) -> int:
    from benchmarks.kernels.cli import main as kernels_main

    return kernels_main(argv)


def add_bench_parser(subparsers: Any) -> None:
    from benchmarks.load.args import add_bench_arguments  # no heavy imports

    p = subparsers.add_parser("bench", help="benchmark a running OpenAI-compatible server",
                              description="Load-test /v1/completions or /v1/chat/completions "
                                          "of a running server (xyserve, vLLM, transformers "
                                          "serve, ...) and report "
                                          "throughput, latency percentiles and goodput.")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from benchmarks.load.run import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xyserve",
        description="OpenAI-compatible LLM serving on a simulated Ascend NPU.")
    parser.add_argument("--version", action="version", version=f"xyserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(subparsers)
    add_kernels_parser(subparsers)
    add_bench_parser(subparsers)
    from cluster.cli import add_simulate_parser  # argparse only; the simulator loads on use
    from cluster.sweep_cli import add_sweep_parser

    add_simulate_parser(subparsers)
    add_sweep_parser(subparsers)
    return parser


def build_configs(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    """The validated configs of `serve`'s arguments; raises ValueError with the reason."""
    server_config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_waiting_requests=args.max_waiting_requests,
        max_choices_per_request=args.max_choices_per_request,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        log_level=args.log_level, log_format=args.log_format,
        log_stats_interval_s=args.log_stats_interval,
        log_metrics_scrapes=args.log_metrics_scrapes, max_request_bytes=args.max_request_bytes,
        shutdown_timeout_s=args.shutdown_timeout, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, max_connections=args.max_connections)
    config = engine_config(args, dtype=args.dtype, weight_format=args.weight_format,
                           kv_cache_dtype=args.kv_cache_dtype, strict_kernels=args.strict_kernels,
                           threads=args.threads, pin_threads=args.pin_threads)
    return server_config, config


def run_serve(args: argparse.Namespace) -> int:
    """Validate every option and file, bind the port, load the model, build the app, serve until
    interrupted. Returns the exit status: 2 for a bad option or file (one line, as argparse
    says it), 1 when the port or the model cannot be had."""
    try:
        server_config, engine_config = build_configs(args)
    except ValueError as exc:
        print(f"xyserve serve: error: {exc}", file=sys.stderr)
        return 2
    from server.connections import bind_listener

    try:  # before the model loads: a second server on a taken port fails at once
        listener = bind_listener(server_config.host, server_config.port)
    except OSError as exc:
        print(f"xyserve serve: error: cannot listen on {server_config.url}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    from server.logs import configure

    log_config = configure(server_config.log_level, server_config.log_format,
                           server_config.log_metrics_scrapes)

    # Heavy imports (uvicorn, FastAPI, transformers) only once the arguments are known good;
    # torch loads in the engine process alone.
    import uvicorn

    from engine.allocator import limit_malloc_arenas
    from engine.arch import ModelLoadError
    from engine.async_engine import AsyncEngine
    from server.app import build_app
    from server.auth import redact_in_logs
    from server.connections import ConnectionLimits, guarded_protocol
    from server.shutdown import DrainingServer

    limit_malloc_arenas()  # the front end's threads (uvicorn's, workers) share two heaps
    try:  # the engine loop runs in a process of its own: engine.core_process says why
        engine = AsyncEngine.in_subprocess(
            engine_config, server_config.max_waiting_requests,
            process_setup=functools.partial(configure, server_config.log_level,
                                            server_config.log_format))
    except (ModelLoadError, ValueError, RuntimeError) as exc:  # (RuntimeError: it died)
        logger.error("cannot start the engine: %s", exc)
        listener.close()
        return 1
    app = build_app(engine, server_config)
    block_size = engine_config.cache.block_size
    info = engine.info
    logger.info("model %s (served as %s), max_model_len %d tokens", info.model_name,
                server_config.served_model_name or info.model_name, info.max_model_len)
    logger.info("KV cache: %d blocks x %d tokens = %d tokens", info.num_kv_blocks, block_size,
                info.num_kv_blocks * block_size)
    from npu_sim.host import get_stack  # plain Python: the stack profiles

    logger.info("simulated NPU %s (%s), host overhead of stack %s", info.chip,
                engine_config.npu_dtype, get_stack(engine_config.npu_stack).describe())
    logger.info("OpenAI-compatible API at %s/v1 (OpenAPI docs at %s/docs)", server_config.url,
                server_config.url)
    limits = ConnectionLimits(
        header_timeout_s=server_config.header_timeout_s,
        body_timeout_s=server_config.body_timeout_s,
        max_connections=server_config.max_connections, retry_after_s=server_config.retry_after_s)
    uvicorn_config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                                    http=guarded_protocol(limits),
                                    log_level=server_config.log_level, log_config=log_config)
    if server_config.api_key is not None:
        redact_in_logs(server_config.api_key)
    # SIGTERM / SIGINT drain the engine (503 for new requests) before uvicorn's shutdown.
    DrainingServer(uvicorn_config, engine, server_config.shutdown_timeout_s).run(
        sockets=[listener])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xyserve` console script."""
    # Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. Spinning
    # workers starve a busy neighbour on a small machine (the event loop, a client): measured
    # 80x slower GEMMs with one core held by another process, against 15% slower when idle.
    # A short spin first (libgomp's default with PASSIVE is none): the regions of a step that
    # runs kernel by kernel (prefill chunks) follow each other within microseconds, and waking
    # a sleeping worker for each cost 10% of prefill-heavy throughput on bf16 weights (402-405
    # -> 436-453 tok/s served, 2026-12-04); a step's gaps of Python still put it to sleep.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["kernels"]:
        return run_kernels(argv[1:])
    parser = build_parser()
    try:
        argv = expand_config(_subparsers(parser), argv)
    except ConfigFileError as exc:
        parser.error(str(exc))
    threads = _threads_option(argv) if argv[:1] == ["serve"] else None
    if threads is not None:  # before torch loads: OpenMP sizes its teams from this
        os.environ["OMP_NUM_THREADS"] = threads
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def console_main() -> int:
    """The `xyserve` command: `main()`, after which the process exits. What the command built
    and module caches still hold (a full-trace simulation's kernels, plans and templates:
    hundreds of thousands of objects) is moved out of the cyclic collector's reach first, so
    the interpreter's last collection does not walk it on the way out (~0.1 s of a ~9 s
    `xyserve simulate`). Not for callers that go on running: nothing frozen is collected."""
    status = main()
    gc.freeze()
    return status


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _threads_option(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("--threads", "-t") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(console_main())
