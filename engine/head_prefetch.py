"""Head templates built ahead on another core, for the timing-only runner.

The first step of each token count pays for lowering its layers' kernels (the GEMM tiling
searches among them) and for summing their launches into the template every step of that count
shares: ~0.7 ms a count, ~1,100 counts in the Azure conversation trace, a tenth of its run. A
head template depends on the token count alone, not on the run, so a worker process forked from
the runner's builds one for every count a step can have, in the order steps tend to meet them,
while the run goes on on its own core. The runner adopts those that have arrived when it first
meets their count (npu_sim.device.Device.adopt_head_template) and builds the others itself. The
worker runs the same code on the same inputs (forked: the same objects, caches and libraries),
so a template is the same whichever process built it, bit for bit.

Forking needs Linux; `xyserve simulate` asks for a worker only where a second core is free
(engine.cpus.second_core_free; cluster.cluster_sim.ClusterSimulation's `prefetch_heads`).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from engine.config import SchedulerConfig
from npu_sim.step_sums import StepTemplate

_BATCH = 16  # templates a message carries (~8 KB each: a message per count would cost more)


def head_counts(config: SchedulerConfig) -> list[int]:
    """Every token count a step can have under `config`, those steps tend to meet first first:
    the decode batches' (up to max_num_seqs), then a capped prompt chunk's beside them
    (mixed_prefill_cap + decodes), then the rest in order."""
    budget = config.max_num_batched_tokens
    decodes = range(1, min(config.max_num_seqs, budget) + 1)
    cap = config.mixed_prefill_cap
    capped = range(cap + 1, min(cap + config.max_num_seqs, budget) + 1)
    return list(dict.fromkeys([*decodes, *capped, *range(1, budget + 1)]))


class HeadPrefetcher:
    """A forked worker building `build(count)` for each of `counts` in turn, and a thread here
    receiving what it sends (so that it never waits on this process); `take` hands a count's
    template to the runner. The worker exits when it is done, when `close` stops it, or with
    this process."""

    def __init__(self, build: Callable[[int], StepTemplate], counts: Sequence[int]) -> None:
        """build(count): the head template of `count` tokens, without its launches (the head's
        kernels stay in the worker: StepTemplate.launches empty)."""
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_build_all, args=(build, counts, sender),
                                        name="xyserve-head-prefetch", daemon=True)
        self._process.start()
        sender.close()  # (the worker's end: this process only reads)
        self._ready: dict[int, StepTemplate] = {}  # (filled by the thread; dict ops are atomic)
        self._receiver = threading.Thread(target=self._receive, args=(receiver,),
                                          name="xyserve-head-prefetch", daemon=True)
        self._receiver.start()

    def take(self, num_tokens: int) -> StepTemplate | None:
        """The head template of `num_tokens` tokens if the worker has sent it (handed out
        once), else None: the caller builds it."""
        return self._ready.pop(num_tokens, None)

    def join(self, timeout_s: float | None = None) -> None:
        """Wait until every template the worker builds has arrived (or the worker is gone)."""
        self._receiver.join(timeout_s)

    def close(self) -> None:
        """Stop the worker (if still at work) and let go of what it sent."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._receiver.join()
        self._ready.clear()

    def _receive(self, receiver: Connection) -> None:
        """The thread: each batch the worker sends into `_ready`, until its end closes. (The
        pickles are read with the GIL let go; a batch is unpickled in ~0.1 ms.)"""
        with receiver:
            try:
                while True:
                    self._ready.update(receiver.recv())
            except (EOFError, OSError):  # done, or stopped
                pass


def _build_all(build: Callable[[int], StepTemplate], counts: Sequence[int],
               sender: Connection) -> None:
    """The worker: every count's template, sent in batches of (count, template)."""
    batch: list[tuple[int, StepTemplate]] = []
    try:
        for count in counts:
            batch.append((count, build(count)))
            if len(batch) == _BATCH:
                sender.send(batch)
                batch = []
        sender.send(batch)
    except (BrokenPipeError, ConnectionResetError):  # the runner closed its end: nothing to do
        pass
