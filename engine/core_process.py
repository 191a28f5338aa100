"""The engine loop in a process of its own (what `xyserve serve` runs, as vLLM's V1 engine core).

Why: in one process the engine loop and the event loop share one GIL. A step's Python (the
scheduler, input preparation, sampling, outputs: ~1.3 ms of a 10 ms decode step of 16 streams)
and the event loop's work for the previous step's tokens (SSE chunks, socket writes: ~0.7 ms)
then take turns instead of running side by side, and each handoff of the GIL waits for a wake-up.
Measured on a 2-core Xeon, decode-heavy (16 closed-loop streams): served throughput +6-7% (the
median of 8 rounds alternated between two servers, every round ahead), and the HTTP front end,
which no longer imports torch, holds 125 MB instead of 314
(benchmarks/results/2026-12-05-engine-process.md).

How: the child is spawned (a fresh interpreter: no inherited OpenMP teams or locks), loads the
model on its main thread, and runs engine.engine_loop.run_engine_loop there; commands come down
one pipe (read by a thread of the child's, which runs grammar commands at once and queues the
rest for the loop), events go up another (frozen dataclasses, a step's as MessagePack, the rest
pickled: engine.event_wire), read in the parent by one thread that hands them to AsyncEngine.
The child ignores SIGINT / SIGTERM (the parent drains and stops it: a Ctrl-C reaches the whole
process group) and ends when its command pipe closes, so it never outlives the parent.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.engine_loop import (
    Command,
    Died,
    Event,
    Intake,
    Stop,
    route,
    run_engine_loop,
)
from engine.event_wire import EventWire
from engine.outputs import EngineInfo
from engine.stats import SchedulerStats

if TYPE_CHECKING:
    from engine.core import EngineCore

logger = logging.getLogger("xyserve")

STOP_TIMEOUT_S = 30.0  # wall seconds a stopped child may take to exit before it is killed


@dataclass(frozen=True)
class _Ready:
    """The child's first message once its model is loaded."""

    info: EngineInfo  # the engine's (with its tokenizer)
    config: EngineConfig  # the engine's (resolved)
    stats: SchedulerStats  # before the first step


@dataclass(frozen=True)
class _Failed:
    """The child's first message when its model could not be loaded."""

    error: BaseException  # what EngineCore.load raised


class ProcessHost:
    """The engine loop in a child process (engine.async_engine.LoopHost)."""

    def __init__(self, config: EngineConfig,
                 process_setup: Callable[[], None] | None = None) -> None:
        """Spawn the child and wait for its model to load. process_setup: called first in the
        child (picklable). Raises what EngineCore.load raised there, or RuntimeError when the
        child died before it could say."""
        context = multiprocessing.get_context("spawn")
        commands_out, commands_in = context.Pipe(duplex=False)
        events_out, events_in = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, name="xyserve-engine", daemon=True,
                                        args=(config, process_setup, commands_out, events_in))
        self._process.start()
        commands_out.close()  # the child's ends: closed here, so either side sees the other go
        events_in.close()
        self._commands = commands_in
        self._events = events_out
        self._send_lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        try:
            first = self._events.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited while loading the model (exit code "
                               f"{self._process.exitcode})") from None
        if isinstance(first, _Failed):
            self._process.join()
            raise first.error
        self.info: EngineInfo = first.info
        self.config: EngineConfig = first.config
        self.initial_stats: SchedulerStats = first.stats
        self.pid: int | None = self._process.pid

    def start(self, on_event: Callable[[Event], None]) -> None:
        self._receiver = threading.Thread(target=self._receive, args=(on_event,),
                                          name="xyserve-engine-events", daemon=True)
        self._receiver.start()

    def _receive(self, on_event: Callable[[Event], None]) -> None:
        wire = EventWire()
        while True:
            try:
                event = wire.decode(self._events.recv_bytes())
            except (EOFError, OSError):  # the child is gone without its last word
                self._process.join(STOP_TIMEOUT_S)
                on_event(Died(f"the engine process exited (exit code {self._process.exitcode})"))
                return
            try:
                on_event(event)
            except Exception:  # one event's handling failed: the next ones still flow
                logger.exception("handling the engine's %s event failed", type(event).__name__)
            if isinstance(event, Died):
                return

    def send(self, command: Command) -> None:
        with self._send_lock, contextlib.suppress(OSError):  # (gone: the receiver says so)
            self._commands.send(command)

    def join(self) -> None:
        if self._receiver is not None:
            self._receiver.join()
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0f s: killed",
                           STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()
        self._commands.close()
        self._events.close()

    def is_alive(self) -> bool:
        return self._process.is_alive()


def load_engine(config: EngineConfig) -> EngineCore:
    """The engine process's core: loaded, then everything alive frozen out of the cyclic GC.
    The model's objects live as long as the process, and full passes over them (~300k objects
    for the default model) took 87-107 ms with the GIL held: a stall of every stream."""
    from engine.core import EngineCore

    core = EngineCore.load(config)
    gc.collect()
    gc.freeze()
    return core


def _child_main(config: EngineConfig, process_setup: Callable[[], None] | None,
                commands: multiprocessing.connection.Connection,
                events: multiprocessing.connection.Connection) -> None:
    """The child: load the model, then run the engine loop until Stop or the parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if process_setup is not None:
        process_setup()
    from engine.allocator import limit_malloc_arenas

    limit_malloc_arenas()  # before the loader's and OpenMP's threads take heaps of their own
    try:
        core = load_engine(config)
    except Exception as exc:  # every load failure goes to the parent, to be raised there
        events.send(_Failed(exc))
        return
    events.send(_Ready(core.info, core.config, core.make_stats()))
    lock = threading.Lock()  # grammar compiles emit from their own threads
    wire = EventWire()

    def emit(event: Event) -> None:
        with lock, contextlib.suppress(OSError):  # (the parent is gone: nobody to tell)
            events.send_bytes(wire.encode(event))

    # Commands are read as they come, by a thread of their own: grammar commands run at once
    # (not when the loop next drains, a whole step later), the rest wait for the loop.
    intake = Intake()

    def read() -> None:
        while True:
            try:
                command = commands.recv()
            except (EOFError, OSError):  # the parent is gone
                command = Stop()
            route(core, command, intake, emit)
            if isinstance(command, Stop):
                return

    threading.Thread(target=read, name="xyserve-commands", daemon=True).start()
    run_engine_loop(core, intake.next, emit)
