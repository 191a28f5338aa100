"""The engine loop: what owns an EngineCore and steps it, wherever it runs.

AsyncEngine (the HTTP server's engine) runs this loop on a thread of its own process or in a
process of its own (engine.core_process). Either way the loop talks to it through two ends:

- commands in (`next_command`): add a request, abort one, abort all, stop; drained before every
  step, so requests enter the scheduler only between steps. Grammar commands (compile, warm up)
  do not wait for the loop: the host runs them as they arrive (`run_grammar_command`);
- events out (`emit`): a request admitted or rejected, a step's outputs and stats, a grammar
  compiled, the loop's death.

Commands and events are frozen dataclasses of plain values, so the same loop serves a thread (a
queue and a callback) and a process (two pipes) alike.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from engine.core import EngineCore
from engine.outputs import RequestOutput
from engine.request import FinishReason, SamplingParams, StructuredOutputs
from engine.stats import IterationStats, SchedulerStats

logger = logging.getLogger("xyserve")

# ------------------------------------------------------------------------------------ commands

@dataclass(frozen=True)
class Add:
    request_id: str  # the engine id
    prompt_token_ids: list[int]  # tokenized prompt
    params: SamplingParams  # sampling and stopping
    arrival_time: float  # time.monotonic() when accepted


@dataclass(frozen=True)
class Abort:
    request_id: str  # the engine id


@dataclass(frozen=True)
class AbortAll:
    """Finish every unfinished request with finish_reason "abort" (shutdown deadline)."""


@dataclass(frozen=True)
class Compile:
    """Compile a grammar into the engine's cache, off the loop: a request that then brings it
    finds it compiled."""

    ticket: int  # echoed by the Compiled event
    structured_outputs: StructuredOutputs  # what to compile


@dataclass(frozen=True)
class WarmUpGrammars:
    """Build the structured-output compiler's tokenizer tables in the background now."""


@dataclass(frozen=True)
class Stop:
    """End the loop; open requests are failed by the front end."""


LoopCommand = Add | Abort | AbortAll | Stop  # drained by the loop between steps
GrammarCommand = Compile | WarmUpGrammars  # run as they arrive (run_grammar_command)
Command = LoopCommand | GrammarCommand


# -------------------------------------------------------------------------------------- events

@dataclass(frozen=True)
class Admitted:
    """An Add left the intake for the scheduler (or was rejected: Deliver follows)."""


@dataclass(frozen=True)
class Deliver:
    """One item for one request's stream, outside a step: a rejection or an abort output."""

    request_id: str  # the engine id
    item: RequestOutput | BaseException  # the output, or the error its stream raises


@dataclass(frozen=True)
class Stepped:
    """A step ran (or the intake was drained: outputs empty, iteration_stats None)."""

    outputs: list[RequestOutput]  # a delta for every request that changed
    stats: SchedulerStats  # queues and KV cache after the step
    iteration_stats: IterationStats | None  # the step's stats; None: no step ran


@dataclass(frozen=True)
class Compiled:
    ticket: int  # the Compile's
    error: BaseException | None  # why it cannot be compiled (RequestRejected), None: compiled


@dataclass(frozen=True)
class Died:
    message: str  # why the loop stopped


Event = Admitted | Deliver | Stepped | Compiled | Died


# ---------------------------------------------------------------------------------------- loop

class Intake:
    """The loop's commands, queued by other threads (thread-safe)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[LoopCommand] = queue.SimpleQueue()

    def put(self, command: LoopCommand) -> None:
        self._queue.put(command)

    def next(self, block: bool) -> LoopCommand | None:
        """run_engine_loop's `next_command`."""
        try:
            return self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return None


def run_engine_loop(core: EngineCore, next_command: Callable[[bool], LoopCommand | None],
                    emit: Callable[[Event], None]) -> None:
    """Step `core` until a Stop command; the last event is always Died (an exception in the
    loop is logged and emitted so; the function never raises).

    next_command(block): the next command, waiting for one when `block` (the engine is idle);
    None when there is none.
    """
    if core.config.pin_threads:
        from engine import platform  # torch: only once an engine loop runs

        if platform.pin_kernel_threads():
            logger.info("kernel threads pinned, one per CPU")
    try:
        while True:
            drained = _drain(core, next_command, emit)
            if drained is None:
                emit(Died("the engine is shutting down"))
                return
            ran, aborted = drained
            if ran:  # the queues changed: the front end's admission counts the waiting
                emit(Stepped([], core.make_stats(), None))
            # An abort that left the engine idle still gets a (empty) step, so its stats reach
            # the stat loggers now rather than with the next request.
            if core.has_unfinished_requests() or aborted:
                outputs = core.step()
                emit(Stepped(outputs, core.make_stats(), core.last_stats))
    except BaseException as exc:
        logger.exception("engine loop died")
        emit(Died(f"engine loop died: {exc!r}"))


def _drain(core: EngineCore, next_command: Callable[[bool], LoopCommand | None],
           emit: Callable[[Event], None]) -> tuple[bool, bool] | None:
    """Run the queued commands; returns whether any ran and whether any was an abort, None on
    Stop."""
    ran = aborted = False
    command = next_command(not core.has_unfinished_requests())
    while command is not None:
        ran = True
        if isinstance(command, Add):
            emit(Admitted())
            try:
                core.add_request(command.request_id, command.prompt_token_ids, command.params,
                                 command.arrival_time)
            except ValueError as exc:
                emit(Deliver(command.request_id, exc))
        elif isinstance(command, Abort):
            core.abort_requests([command.request_id])
            aborted = True
        elif isinstance(command, AbortAll):
            _abort_all(core, emit)
            aborted = True
        else:
            return None
        command = next_command(False)
    return ran, aborted


def _abort_all(core: EngineCore, emit: Callable[[Event], None]) -> None:
    requests = core.unfinished_requests()
    core.abort_requests([request_id for request_id, _, _ in requests])
    for request_id, num_prompt_tokens, num_output_tokens in requests:
        emit(Deliver(request_id, RequestOutput(
            request_id=request_id, new_token_ids=(), new_text="", new_logprobs=None,
            finish_reason=FinishReason.ABORT, num_prompt_tokens=num_prompt_tokens,
            num_output_tokens=num_output_tokens)))
    if requests:
        logger.warning("aborted %d unfinished requests", len(requests))


def route(core: EngineCore, command: Command, intake: Intake,
          emit: Callable[[Event], None]) -> None:
    """A command as its host receives it: a grammar command run now (run_grammar_command), any
    other queued for the loop."""
    if isinstance(command, GrammarCommand):
        run_grammar_command(core, command, emit)
    else:
        intake.put(command)


def run_grammar_command(core: EngineCore, command: GrammarCommand,
                        emit: Callable[[Event], None]) -> None:
    """Run a grammar command now, from whichever thread received it, never on the loop: a
    compile on a worker thread of its own (the compiler is thread-safe and caches), its Compiled
    event emitted from there, so a request that brings the grammar, queued after, finds it
    compiled; a warm-up in the compiler's background thread."""
    if isinstance(command, WarmUpGrammars):
        if core.info.tokenizer is not None:
            core.grammar_compiler().warm_up()
        return

    def work() -> None:
        try:
            core.grammar_compiler().compile(command.structured_outputs)
        except ValueError as exc:
            emit(Compiled(command.ticket, exc))
        else:
            emit(Compiled(command.ticket, None))

    threading.Thread(target=work, name="xyserve-grammar", daemon=True).start()
