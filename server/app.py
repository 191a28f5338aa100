"""`build_app(engine, config)`: the FastAPI application over a (not yet started) AsyncEngine."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine.async_engine import AsyncEngine
from server import __version__
from server.auth import APIKeyMiddleware
from server.config import ServerConfig
from server.errors import install_exception_handlers
from server.limits import RequestSizeLimitMiddleware
from server.logs import StatsLogLine
from server.memory import start_memory_watch, stop_memory_watch
from server.metrics import ServerMetrics
from server.observe import ObserveMiddleware
from server.routes import chat, completions, metrics, models, tokenize
from server.serving_chat import ChatServing
from server.serving_completions import CompletionServing
from server.state import ModelInfo, ServerState

logger = logging.getLogger("xyserve")


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The OpenAI-compatible app. Its lifespan starts the engine loop (a thread, or its
    process's) beside the server's event loop and stops it on shutdown (in-flight requests then
    end with an error)."""
    info = engine.info
    model = ModelInfo(name=config.served_model_name or info.model_name, root=info.model_name,
                      max_model_len=info.max_model_len, vocab_size=info.arch.vocab_size,
                      created=int(time.time()))
    # Metrics are recorded from the engine's per-step stats: a stat logger of the AsyncEngine.
    cache = engine.config.cache
    server_metrics = ServerMetrics(
        model.name, lambda: engine.stats, engine.config.speculative_config, info.max_model_len,
        cache_config={"block_size": str(info.block_size), "num_gpu_blocks": str(info.num_kv_blocks),
                      "cache_dtype": info.kv_cache_dtype,
                      "enable_prefix_caching": str(cache.enable_prefix_caching)},
        engine_pid=engine.engine_pid)
    engine.stat_loggers.append(server_metrics.record)
    if config.log_stats_interval_s > 0:
        engine.stat_loggers.append(StatsLogLine(config.log_stats_interval_s))
    serving_args = (engine, model, info.tokenizer, config)
    state = ServerState(config=config, engine=engine, tokenizer=info.tokenizer, model=model,
                        metrics=server_metrics, completions=CompletionServing(*serving_args),
                        chat=ChatServing(*serving_args))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        engine.warm_up_grammars()  # structured outputs' tables, in the background (~1 s)
        # The startup objects (weights' wrappers, tokenizer, app) live as long as the server:
        # out of the cyclic GC's reach, whose full passes over them took ~135 ms with the GIL
        # held, a stall of every stream.
        gc.collect()
        gc.freeze()
        logger.info("serving %s at %s/v1", model.name, config.url)
        loop = asyncio.get_running_loop()  # uvloop's where installed (uvicorn's "auto")
        logger.debug("event loop: %s.%s", type(loop).__module__, type(loop).__qualname__)
        memory_watch = start_memory_watch()  # freed memory goes back to the OS as it piles up
        try:
            yield
        finally:
            await stop_memory_watch(memory_watch)
            await engine.shutdown()

    app = FastAPI(title="xyserve", version=__version__, lifespan=lifespan,
                  summary="OpenAI-compatible LLM serving on a simulated Ascend NPU")
    app.state.xyserve = state
    install_exception_handlers(app, config.retry_after_s)
    # Middleware, outermost last: request ids and HTTP metrics (they see every status), CORS
    # (answers browsers' preflights, which carry no key), then the API key (all but /health and
    # /metrics), then the body size limit (before parsing).
    app.add_middleware(RequestSizeLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    routers = (models.open_router, metrics.router, completions.router, chat.router,
               models.router, tokenize.router)
    app.add_middleware(ObserveMiddleware, metrics=server_metrics,
                       routes=[route for router in routers for route in router.routes])
    for router in routers:
        app.include_router(router)
    return app
