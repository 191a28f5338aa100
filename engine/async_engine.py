"""AsyncEngine: the asyncio face of EngineCore, for the HTTP server.

The engine loop (engine.engine_loop) owns the EngineCore and steps it, on a thread of this
process (`AsyncEngine(core)`) or in a process of its own (`AsyncEngine.in_subprocess(config)`,
what `xyserve serve` runs: engine.core_process says why). The event loop talks to it through:

- commands (add, abort), drained before every step, so requests enter the scheduler only
  between steps;
- one mailbox per request, filled on the event loop (via `call_soon_threadsafe`) from the loop's
  events and drained by its RequestStream. A mailbox holds at most one output: a delta that
  arrives before the consumer took the previous one is merged into it (vLLM's
  RequestOutputCollector), so a client that reads slower than the engine writes costs one
  pending delta, never a growing queue.

A client that goes away cancels its `generate()` task; the cancellation aborts the request, and its
KV blocks are freed before the next step. If the engine loop dies, every open request and every
later one fails with EngineDeadError at once; `close_admission()` (graceful shutdown) refuses new
requests while the open ones finish, and `abort_all()` ends those still running at a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Protocol

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.core_process import ProcessHost
from engine.engine_loop import (
    Abort,
    AbortAll,
    Add,
    Admitted,
    Command,
    Compile,
    Compiled,
    Deliver,
    Died,
    Event,
    Intake,
    Stepped,
    Stop,
    WarmUpGrammars,
    route,
    run_engine_loop,
)
from engine.mailbox import Mailbox
from engine.outputs import EngineInfo, RequestOutput
from engine.request import RequestRejected, SamplingParams
from engine.stats import IterationStats, SchedulerStats

logger = logging.getLogger("xyserve")

StatLogger = Callable[[SchedulerStats, IterationStats], None]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class AdmissionClosedError(RuntimeError):
    """The engine takes no new requests (the server is shutting down); the open ones go on."""


class LoopHost(Protocol):
    """Where the engine loop runs: a thread (ThreadHost) or a process (core_process)."""

    info: EngineInfo  # the engine's
    config: EngineConfig  # the engine's (resolved)
    initial_stats: SchedulerStats  # before its first step
    pid: int | None  # the process the loop runs in; None: this one

    def start(self, on_event: Callable[[Event], None]) -> None:
        """Start the loop; `on_event` is called with each of its events, in order, on one
        thread that is not the event loop's."""

    def send(self, command: Command) -> None:
        """Queue a command (thread-safe; dropped once the loop is gone)."""

    def join(self) -> None:
        """Block until the loop has ended (after Stop, or its death)."""

    def is_alive(self) -> bool:
        """The loop runs."""


class ThreadHost:
    """The engine loop on a thread of this process (torch releases the GIL in the kernels, so
    the event loop keeps answering meanwhile)."""

    def __init__(self, core: EngineCore) -> None:
        self._core = core  # stepped by the engine thread only, after start()
        self.info = core.info
        self.config = core.config
        self.initial_stats = core.make_stats()
        self.pid = None
        self._intake = Intake()
        self._on_event: Callable[[Event], None] | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_event: Callable[[Event], None]) -> None:
        self._on_event = on_event
        self._thread = threading.Thread(target=run_engine_loop, name="xyserve-engine",
                                        args=(self._core, self._intake.next, on_event),
                                        daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        route(self._core, command, self._intake, self._emit)

    def _emit(self, event: Event) -> None:  # (a grammar compile's, from its worker thread)
        assert self._on_event is not None, "start() first"
        self._on_event(event)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class AsyncEngine:
    """Runs the engine loop beside the event loop; `generate()` streams each request's
    outputs."""

    def __init__(self, core: EngineCore | LoopHost, max_waiting_requests: int | None = None,
                 stat_loggers: Sequence[StatLogger] = ()) -> None:
        """core: an EngineCore (its loop runs on a thread of this process) or a LoopHost
        (engine.core_process.ProcessHost: in_subprocess), which start() starts."""
        self._host: LoopHost = ThreadHost(core) if isinstance(core, EngineCore) else core
        self.max_waiting_requests = max_waiting_requests  # None = unbounded
        # Called after every step, on the thread that hears the loop; quick and thread-safe.
        self.stat_loggers = list(stat_loggers)
        self._mailboxes: dict[str, Mailbox] = {}  # open requests (event-loop side)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._dead: EngineDeadError | None = None  # why the engine loop stopped, once it has
        self._admission_closed: str | None = None  # why new requests are refused, once they are
        self._num_unadmitted = 0  # adds sent to the loop, not yet in the scheduler
        self._stats = self._host.initial_stats  # refreshed by the loop's events
        self._tickets = itertools.count()
        self._compiling: dict[int, asyncio.Future[None]] = {}  # grammar compiles awaited

    @classmethod
    def in_subprocess(cls, config: EngineConfig, max_waiting_requests: int | None = None,
                      process_setup: Callable[[], None] | None = None) -> AsyncEngine:
        """An engine whose loop runs in a process of its own, its model loaded there (blocks
        until loaded; spawned, so a script calling this needs Python's `if __name__ ==
        "__main__":` guard). process_setup: called first in that process (picklable: logging).
        Raises as EngineCore.load does (ModelLoadError, ValueError), RuntimeError when that
        process died before it could say."""
        return cls(ProcessHost(config, process_setup), max_waiting_requests)

    @property
    def info(self) -> EngineInfo:
        """The model served, its limits and its tokenizer."""
        return self._host.info

    @property
    def config(self) -> EngineConfig:
        return self._host.config

    @property
    def engine_pid(self) -> int | None:
        """The engine process's id (its memory and CPU are its own); None: it runs in this
        process."""
        return self._host.pid

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine loop; call from the event loop that will call generate()."""
        self._loop = asyncio.get_running_loop()
        self._host.start(self._on_event)
        self._started = True

    async def shutdown(self) -> None:
        """Stop the engine loop (in-flight requests end with an error)."""
        self._host.send(Stop())
        if self._started:
            await asyncio.to_thread(self._host.join)

    @property
    def is_alive(self) -> bool:
        """The engine loop runs (and has not failed)."""
        return self._dead is None and self._started and self._host.is_alive()

    def close_admission(self, reason: str) -> None:
        """Refuse new requests from now on (AdmissionClosedError); open ones go on."""
        self._admission_closed = reason

    @property
    def admission_closed(self) -> str | None:
        """Why new requests are refused (None while they are accepted)."""
        return self._admission_closed

    @property
    def num_open_requests(self) -> int:
        """Requests queued or generating whose stream is still open."""
        return len(self._mailboxes)

    def abort_all(self) -> None:
        """Finish every unfinished request with finish_reason "abort" before the next step; each
        open stream gets that as its last output."""
        self._host.send(AbortAll())

    def warm_up_grammars(self) -> None:
        """Build the structured-output compiler's tokenizer tables in the background now
        (~1 s), rather than when the first constrained request comes (no-op without a
        tokenizer)."""
        if self.info.tokenizer is not None:
            self._host.send(WarmUpGrammars())

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile params.structured_outputs into the engine's cache, off its loop, so the loop
        finds it compiled when the request is queued. Raises RequestRejected, naming the field,
        when it cannot be compiled; EngineDeadError when the loop is gone."""
        if params.structured_outputs is None:
            return
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        ticket = next(self._tickets)
        done = self._compiling[ticket] = asyncio.get_running_loop().create_future()
        self._host.send(Compile(ticket, params.structured_outputs))
        try:
            await done
        finally:
            self._compiling.pop(ticket, None)

    @property
    def stats(self) -> SchedulerStats:
        """Scheduler stats as of the last step (plus requests not yet admitted as waiting)."""
        s = self._stats
        return replace(s, num_waiting_reqs=s.num_waiting_reqs + self._num_unadmitted)

    # ------------------------------------------------------------------------------ requests

    def check_admission(self, num_requests: int) -> None:
        """Raise unless `num_requests` more can be queued now: RequestRejected when they never
        could (more than max_waiting_requests: retrying cannot help), EngineDeadError,
        AdmissionClosedError, or QueueFullError when the queue has no room for all of them.

        An API call queueing several requests (n choices, several prompts) checks them together,
        then queues them with `add_request(..., admission_checked=True)` before it next awaits.
        Every request counts, also when nothing waits yet: all of a call's requests wait (in the
        intake, then the scheduler's queue) before any of them runs.
        """
        limit = self.max_waiting_requests
        if limit is not None and num_requests > limit:
            raise RequestRejected(f"the call brings {num_requests} requests (prompts x n), more "
                                  f"than the {limit} that may ever wait (max_waiting_requests)",
                                  param="n")
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        if self._admission_closed is not None:
            raise AdmissionClosedError(self._admission_closed)
        if limit is None:
            return
        num_waiting = self.stats.num_waiting_reqs
        if num_waiting + num_requests > limit:
            raise QueueFullError(f"{num_waiting} requests are waiting and the call brings "
                                 f"{num_requests} more (max_waiting_requests is {limit})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    admission_checked: bool = False) -> RequestStream:
        """Queue a request now; returns the stream of its outputs.

        Raises QueueFullError, AdmissionClosedError or EngineDeadError (unless
        `admission_checked`) and ValueError for an id in use; the engine's own rejection
        (ValueError) is raised by the stream.
        """
        if not admission_checked:
            self.check_admission(1)
        if request_id in self._mailboxes:
            raise ValueError(f"request id {request_id!r} is already in use")
        mailbox = Mailbox()
        self._mailboxes[request_id] = mailbox
        if self._dead is not None:  # died since the admission check: fail it, never hang
            mailbox.put(EngineDeadError(str(self._dead)))
        self._num_unadmitted += 1
        self._host.send(Add(request_id, prompt_token_ids, params, time.monotonic()))
        return RequestStream(self, request_id, mailbox)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue a request (on first iteration) and yield its outputs until the finished one.

        Raises as add_request() and its stream do. Cancelling the consuming task, or closing the
        generator early, aborts the request.
        """
        stream = self.add_request(request_id, prompt_token_ids, params)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished)."""
        self._host.send(Abort(request_id))

    # -------------------------------------------------------------- the engine loop's events

    def _on_event(self, event: Event) -> None:
        """One event of the loop, on the thread that hears it (not the event loop's)."""
        if isinstance(event, Stepped):
            self._stats = event.stats
            # Stats first: a client holding its final output finds it counted in /metrics.
            if event.iteration_stats is not None:
                for stat_logger in self.stat_loggers:
                    try:
                        stat_logger(event.stats, event.iteration_stats)
                    except Exception:  # metrics must not stop the tokens
                        logger.exception("stat logger %r failed", stat_logger)
            if event.outputs:  # one wake-up of the event loop per step, not one per request
                self._call_on_loop(self._put_all, event.outputs)
        elif isinstance(event, Admitted):
            self._call_on_loop(self._admitted)
        elif isinstance(event, Deliver):
            self._call_on_loop(self._put, event.request_id, event.item)
        elif isinstance(event, Compiled):
            self._call_on_loop(self._compiled, event.ticket, event.error)
        elif isinstance(event, Died):
            self._fail_all(EngineDeadError(event.message))

    def _admitted(self) -> None:
        self._num_unadmitted -= 1

    def _put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        mailbox = self._mailboxes.get(request_id)
        if mailbox is not None:
            mailbox.put(item)

    def _put_all(self, outputs: Sequence[RequestOutput]) -> None:
        for output in outputs:
            self._put(output.request_id, output)

    def _compiled(self, ticket: int, error: BaseException | None) -> None:
        done = self._compiling.get(ticket)
        if done is None or done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def _call_on_loop(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        # RuntimeError: the event loop is closed, so nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _close_stream(self, request_id: str, finished: bool) -> None:
        self._mailboxes.pop(request_id, None)
        if not finished:  # cancelled or closed early: free its blocks before the next step
            self._host.send(Abort(request_id))

    def _fail_all(self, exc: EngineDeadError) -> None:
        """As the loop stops: every open request (and every later one) fails."""
        self._dead = exc  # add_request() sees this from now on
        self._call_on_loop(self._fail_mailboxes)  # runs after any add_request before it

    def _fail_mailboxes(self) -> None:
        assert self._dead is not None
        for mailbox in self._mailboxes.values():
            mailbox.put(EngineDeadError(str(self._dead)))
        for done in self._compiling.values():
            if not done.done():
                done.set_exception(EngineDeadError(str(self._dead)))


class RequestStream:
    """The outputs of one queued request, as an async iterator ending with the finished one.

    `aclose()` (idempotent) aborts the request if it has not finished; the engine frees its KV
    blocks before its next step.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, mailbox: Mailbox) -> None:
        self.request_id = request_id
        self._engine = engine
        self._mailbox = mailbox
        self._finished = False  # the last output (or an error) was received
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._mailbox.get()
        except BaseException:  # cancelled while waiting: the client went away
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            await self.aclose()
            raise item
        if item.finished:
            self._finished = True
            await self.aclose()
        return item

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._close_stream(self.request_id, self._finished)
