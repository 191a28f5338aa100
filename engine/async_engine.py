"""AsyncEngine: the asyncio face of EngineCore, for the HTTP server.

One engine thread owns the EngineCore and runs its loop (torch releases the GIL, so the event
loop keeps answering /health and /metrics under full load). The event loop talks to it through:

- the intake: a thread-safe queue of commands (add, abort), drained before every step, so
  requests enter the scheduler only between steps;
- one mailbox per request, filled on the event loop (via `call_soon_threadsafe`) and drained by
  its RequestStream. A mailbox holds at most one output: a delta that arrives before the consumer
  took the previous one is merged into it (vLLM's RequestOutputCollector), so a client that reads
  slower than the engine writes costs one pending delta, never a growing queue.

A client that goes away cancels its `generate()` task; the cancellation aborts the request, and its
KV blocks are freed before the next step. If the engine loop dies, every open request and every
later one fails with EngineDeadError at once; `close_admission()` (graceful shutdown) refuses new
requests while the open ones finish, and `abort_all()` ends those still running at a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.mailbox import Mailbox
from engine.outputs import EngineInfo, RequestOutput
from engine.request import FinishReason, RequestRejected, SamplingParams
from engine.stats import IterationStats, SchedulerStats

logger = logging.getLogger("xyserve")

StatLogger = Callable[[SchedulerStats, IterationStats], None]
IDLE_POLL_S = 0.05  # wall seconds the idle engine thread waits on the intake before rechecking


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class AdmissionClosedError(RuntimeError):
    """The engine takes no new requests (the server is shutting down); the open ones go on."""


@dataclass(frozen=True)
class _Add:
    request_id: str  # the engine id
    prompt_token_ids: list[int]  # tokenized prompt
    params: SamplingParams  # sampling and stopping
    arrival_time: float  # time.monotonic() when accepted


@dataclass(frozen=True)
class _Abort:
    request_id: str  # the engine id


@dataclass(frozen=True)
class _AbortAll:
    """Finish every unfinished request with finish_reason "abort" (shutdown deadline)."""


class AsyncEngine:
    """Runs an EngineCore on its own thread; `generate()` streams each request's outputs."""

    def __init__(self, core: EngineCore, max_waiting_requests: int | None = None,
                 stat_loggers: Sequence[StatLogger] = ()) -> None:
        self._core = core  # touched by the engine thread only, after start()
        self.max_waiting_requests = max_waiting_requests  # None = unbounded
        # Called on the engine thread after every step; must be quick and thread-safe.
        self.stat_loggers = list(stat_loggers)
        self._intake: queue.SimpleQueue[_Add | _Abort | _AbortAll | None] = queue.SimpleQueue()
        self._mailboxes: dict[str, Mailbox] = {}  # open requests (event-loop side)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: EngineDeadError | None = None  # why the engine loop stopped, once it has
        self._admission_closed: str | None = None  # why new requests are refused, once they are
        self._num_unadmitted = 0  # adds sent to the intake, not yet in the scheduler
        self._stats = core.make_stats()  # refreshed by the engine thread every step

    @property
    def info(self) -> EngineInfo:
        """The model served, its limits and its tokenizer."""
        return self._core.info

    @property
    def config(self) -> EngineConfig:
        return self._core.config

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will call generate()."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="xyserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine thread (in-flight requests end with an error)."""
        self._stopping.set()
        self._intake.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def is_alive(self) -> bool:
        """The engine loop runs (and has not failed)."""
        return self._dead is None and self._thread is not None and self._thread.is_alive()

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
        self._intake.put(_AbortAll())

    def warm_up_grammars(self) -> None:
        """Build the structured-output compiler's tokenizer tables in the background now
        (~1 s), rather than when the first constrained request comes (no-op without a
        tokenizer)."""
        if self._core.info.tokenizer is not None:
            self._core.grammar_compiler().warm_up()

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile params.structured_outputs on a worker thread (cached), so the engine loop
        finds it compiled when the request is queued. Raises RequestRejected, naming the field,
        when it cannot be compiled."""
        if params.structured_outputs is not None:
            compiler = self._core.grammar_compiler()
            await asyncio.to_thread(compiler.compile, params.structured_outputs)

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
        self._intake.put(_Add(request_id, prompt_token_ids, params, time.monotonic()))
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
        self._intake.put(_Abort(request_id))

    # --------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        if self._core.config.pin_threads:
            from engine import platform  # torch: only once an engine thread runs

            if platform.pin_kernel_threads():
                logger.info("kernel threads pinned, one per CPU")
        try:
            while not self._stopping.is_set():
                aborted = self._drain_intake(block=not self._core.has_unfinished_requests())
                # An abort that left the engine idle still gets a (empty) step, so its stats
                # reach the stat loggers now rather than with the next request.
                if self._core.has_unfinished_requests() or aborted:
                    self._step()
        except BaseException as exc:
            logger.exception("engine loop died")
            self._fail_all(EngineDeadError(f"engine loop died: {exc!r}"))
            return
        self._fail_all(EngineDeadError("the engine is shutting down"))

    def _drain_intake(self, block: bool) -> bool:
        """Run the queued commands; returns whether any was an abort."""
        aborted = False
        try:
            command = self._intake.get(timeout=IDLE_POLL_S) if block else self._intake.get_nowait()
            while True:
                if isinstance(command, _Add):
                    self._add(command)
                elif isinstance(command, _Abort):
                    self._core.abort_requests([command.request_id])
                    aborted = True
                elif isinstance(command, _AbortAll):
                    self._abort_all()
                    aborted = True
                command = self._intake.get_nowait()
        except queue.Empty:
            pass
        self._stats = self._core.make_stats()
        return aborted

    def _add(self, command: _Add) -> None:
        self._call_on_loop(self._admitted)
        try:
            self._core.add_request(command.request_id, command.prompt_token_ids, command.params,
                                  command.arrival_time)
        except ValueError as exc:
            self._deliver(command.request_id, exc)

    def _admitted(self) -> None:
        self._num_unadmitted -= 1

    def _abort_all(self) -> None:
        requests = self._core.unfinished_requests()
        self._core.abort_requests([request_id for request_id, _, _ in requests])
        for request_id, num_prompt_tokens, num_output_tokens in requests:
            self._deliver(request_id, RequestOutput(
                request_id=request_id, new_token_ids=(), new_text="", new_logprobs=None,
                finish_reason=FinishReason.ABORT, num_prompt_tokens=num_prompt_tokens,
                num_output_tokens=num_output_tokens))
        if requests:
            logger.warning("aborted %d unfinished requests", len(requests))

    def _step(self) -> None:
        outputs = self._core.step()
        self._stats = self._core.make_stats()
        # Stats first: a client holding its final output finds it counted in /metrics.
        iteration_stats = self._core.last_stats
        if iteration_stats is not None:
            for stat_logger in self.stat_loggers:
                stat_logger(self._stats, iteration_stats)
        if outputs:  # one wake-up of the event loop per step, not one per request
            self._call_on_loop(self._put_all, outputs)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._call_on_loop(self._put, request_id, item)

    def _put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        mailbox = self._mailboxes.get(request_id)
        if mailbox is not None:
            mailbox.put(item)

    def _put_all(self, outputs: Sequence[RequestOutput]) -> None:
        for output in outputs:
            self._put(output.request_id, output)

    def _call_on_loop(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        # RuntimeError: the event loop is closed, so nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _close_stream(self, request_id: str, finished: bool) -> None:
        self._mailboxes.pop(request_id, None)
        if not finished:  # cancelled or closed early: free its blocks before the next step
            self._intake.put(_Abort(request_id))

    def _fail_all(self, exc: EngineDeadError) -> None:
        """Engine thread, as it stops: every open request (and every later one) fails."""
        self._dead = exc  # add_request() sees this from now on
        self._call_on_loop(self._fail_mailboxes)  # runs after any add_request before it

    def _fail_mailboxes(self) -> None:
        for mailbox in self._mailboxes.values():
            mailbox.put(EngineDeadError(str(self._dead)))


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
