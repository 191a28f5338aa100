"""The scheduler's walks over a step's decode rows in C (engine/decode_walks.c).

A running request one token behind makes a decode row every step: the scheduler schedules it
(`Scheduler._schedule_decodes`) and applies its sampled token (`Scheduler._update_decodes`).
A simulated production trace has millions of them (4M rows in 78k steps of the Azure
conversation trace), ~0.7 us each in Python: a third of the simulation. The C walks do the
common rows (a slot in the block table, or a block the pool has; one token, no stop rule due)
through the Python C API, the same reads and writes in the same order, and hand every other
row back to the Python callbacks they are given, in its place: the same state and rows
(tests/engine/test_scheduler.py runs the scheduler's equality tests with and without them).
Where no C compiler is found, or XYSERVE_NATIVE_KERNELS=0, `walks()` is None and the
scheduler walks in Python.
"""

from __future__ import annotations

import ctypes
import pathlib

import native_build

_O = ctypes.py_object
_N = ctypes.c_ssize_t
_LIBRARY = native_build.Library(
    "decode_walks", (pathlib.Path(__file__).with_name("decode_walks.c"),), (),
    ("-O2", "-fPIC", "-shared"),
    {"xy_schedule_decodes": (_O, [_O, _N, _N, _O, _O, _O, _O]),
     "xy_update_decodes": (_O, [_O, _O, _O, _O, _N, _O, ctypes.c_int, _O, _O])},
    "the scheduler's C decode walks", python_api=True)


def walks() -> ctypes.CDLL | None:
    """The library (a ctypes.PyDLL: xy_schedule_decodes, xy_update_decodes, see
    decode_walks.c), or None where it cannot be built or native code is off."""
    return native_build.loaded(_LIBRARY)
