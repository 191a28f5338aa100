"""The engine process's events on the pipe to the front end (engine.core_process).

A step's event (Stepped: a delta per running request and the step's stats) crosses every step,
so it goes as MessagePack, decoded by msgspec straight into its frozen dataclasses (vLLM's
engine core ships its outputs the same way). Pickle rebuilt 16 RequestOutputs and the stats in
~25 us (a 2-core Xeon; several times that with the engine's kernels on both cores), on the thread
that then hands the tokens to the event loop. The step's simulated-NPU trace (`trace: Any`, numpy
arrays inside) rides along pickled, in a MessagePack extension. Every other event (admissions,
errors, grammar compiles) is rare and stays pickled whole.

    frame = b"S" + msgpack(Stepped)  |  b"P" + pickle(event)
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import msgspec

from engine.engine_loop import Event, Stepped

_STEPPED, _PICKLED = b"S", b"P"
_TRACE_EXT = 1  # the extension code of a pickled StepTrace


def _decode_ext(code: int, data: memoryview) -> Any:
    if code != _TRACE_EXT:
        raise ValueError(f"unknown MessagePack extension {code} in an engine event")
    return pickle.loads(data)


class EventWire:
    """Encodes events in the engine process and decodes them in the front end; one per side
    and thread (msgspec's encoders keep a buffer)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Stepped, ext_hook=_decode_ext)

    def encode(self, event: Event) -> bytes:
        if not isinstance(event, Stepped):
            return _PICKLED + pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
        stats = event.iteration_stats
        if stats is not None and stats.trace is not None:
            trace = msgspec.msgpack.Ext(_TRACE_EXT, pickle.dumps(
                stats.trace, protocol=pickle.HIGHEST_PROTOCOL))
            event = dataclasses.replace(event,
                                        iteration_stats=dataclasses.replace(stats, trace=trace))
        return _STEPPED + self._encoder.encode(event)

    def decode(self, frame: bytes) -> Event:
        """The event `frame` holds. Raises msgspec.DecodeError or pickle's errors on a frame
        this class did not write."""
        body = memoryview(frame)[1:]
        if frame[:1] == _STEPPED:
            return self._decoder.decode(body)
        return pickle.loads(body)  # type: ignore[no-any-return]
