"""Graceful shutdown: uvicorn's Server, with SIGTERM / SIGINT starting a drain instead of an exit.

    signal        -> admission closes: new generation requests get 503, /health answers 503,
                     the listener stays open (a new client gets a 503, not a refused connection)
    drained       -> (no request open in the engine) uvicorn's own shutdown: close the listener,
                     let responses in progress finish, run the lifespan (stops the engine); exit 0
    deadline      -> (--shutdown-timeout passed) the requests still open are aborted: each ends
                     with finish_reason "abort" (a stream still gets its last chunk and [DONE]),
                     then the same shutdown
    second signal -> what is still open is aborted, and uvicorn exits without waiting further
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from engine.async_engine import AsyncEngine

logger = logging.getLogger("xyserve")

ABORT_GRACE_S = 5.0  # wall seconds aborted requests get to send their last output
CONNECTION_GRACE_S = 10.0  # after the drain, wall seconds open connections get to finish


class DrainingServer(uvicorn.Server):
    """A uvicorn Server that drains `engine` for up to `shutdown_timeout_s` before it exits."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine,
                 shutdown_timeout_s: float) -> None:
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = int(CONNECTION_GRACE_S)
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self.drain_started_s: float | None = None  # time.monotonic() of the first signal
        self._announced = False  # the drain's start has been logged
        self._aborted_at_s: float | None = None  # when the deadline's abort was sent

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only flags and a (reentrant) queue put here; logging is left to the
        # next tick.
        if self.drain_started_s is not None or not self.started:
            # A second signal (or one during startup): abort what is open and let uvicorn exit.
            self.engine.abort_all()
            super().handle_exit(sig, frame)
            return
        # Not recorded as a captured signal: a drained server exits 0 rather than re-raising it.
        self.drain_started_s = time.monotonic()
        self.engine.close_admission("the server is shutting down")

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started_s is not None and not self.should_exit:
            if not self._announced:
                self._announced = True
                logger.info("shutting down: new requests get 503; %d in flight get up to %.1f s "
                            "to finish (signal again to abort them)",
                            self.engine.num_open_requests, self.shutdown_timeout_s)
            self._drain_step(time.monotonic())
        return await super().on_tick(counter)

    def _drain_step(self, now_s: float) -> None:
        """Called every tick (0.1 s) while draining: exit once the engine is drained, abort what
        is left at the deadline."""
        assert self.drain_started_s is not None
        num_open = self.engine.num_open_requests
        if num_open == 0:
            logger.info("drained in %.2f s", now_s - self.drain_started_s)
            self.should_exit = True
        elif self._aborted_at_s is None:
            if now_s - self.drain_started_s >= self.shutdown_timeout_s:
                logger.warning("shutdown timeout (%.1f s): aborting %d requests still open",
                               self.shutdown_timeout_s, num_open)
                self.engine.abort_all()
                self._aborted_at_s = now_s
        elif now_s - self._aborted_at_s >= ABORT_GRACE_S:
            logger.warning("%d requests still open after the abort; exiting", num_open)
            self.should_exit = True
