"""Building, caching and loading the C libraries xyserve calls through ctypes.

Five libraries: the CPU fast path's kernels (npu_sim.kernels.native, which needs torch), the
timing-only simulator's launch sums (npu_sim.launch_sums) and tiling candidates' pricing
(npu_sim.gemm_cycles), the engine's token-id loops
(engine.token_ids: prompt checks and prefix-cache hashes) and the scheduler's decode walks
(engine.decode_walks, on the Python C API). A package of its own below both
`engine` and `npu_sim`, importing neither, no torch and no numpy: the KV-cache manager stays
free of the simulator, and a simulation that computes nothing never loads torch.

A library is built with the system C compiler (`cc`, or $CC; -march=native unless
XYSERVE_NATIVE_GENERIC=1, then without it where that fails) into the user's cache
(`$XDG_CACHE_HOME/xyserve`, default `~/.cache/xyserve`), keyed by its sources, the flags and the
CPU, so a later process loads it at once. Without a compiler, or with XYSERVE_NATIVE_KERNELS=0,
`loaded()` is None and the callers take their Python path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_ARCH_FLAGS = (("-march=native",), ())  # the first that compiles
# XYSERVE_NATIVE_GENERIC=1 builds without -march=native: the portable loops that stand in for
# the AVX2 / F16C intrinsics (simd.h) run here too, so tests can check them on any machine.


@dataclass(frozen=True, eq=False)  # (loaded libraries are kept by identity)
class Library:
    """One shared library built from C sources of this package."""

    stem: str  # the cached file's name before its key
    sources: tuple[pathlib.Path, ...]  # compiled together
    headers: tuple[pathlib.Path, ...]  # included by the sources: read for the cache key
    flags: tuple[str, ...]  # the compiler's, before the -march ones
    signatures: dict[str, tuple[object, list[object]]]  # function -> (restype, argtypes)
    what: str  # what it is, for the log
    # Its functions use the Python C API: built against this interpreter's headers and loaded
    # as a ctypes.PyDLL (called with the GIL held; an exception they set is raised).
    python_api: bool = False


_lock = threading.Lock()
_state: dict[Library, ctypes.CDLL | None] = {}
_switched_off = False  # within disabled(): every library reads as None


def enabled() -> bool:
    """Whether the environment allows native code (XYSERVE_NATIVE_KERNELS != 0)."""
    return os.environ.get("XYSERVE_NATIVE_KERNELS", "1") != "0"


def loaded(library: Library) -> ctypes.CDLL | None:
    """`library` loaded (built first if needed), or None where native code is disabled or it
    cannot be built here. Thread-safe; built once per process."""
    if _switched_off:
        return None
    found = _state.get(library, False)
    if found is not False:
        return found  # type: ignore[return-value]
    with _lock:
        if library not in _state:
            _state[library] = load(library) if enabled() else None
        return _state[library]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block every library reads as None, as without a compiler (the Python paths
    run); for comparisons and tests. Not thread-safe: it switches process-wide state."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


def load(library: Library) -> ctypes.CDLL | None:
    """Build `library` unless its cache has it, and load it; None, with a warning, where no
    build works. A build that works only without -march=native warns that it is slower."""
    source = b"".join(path.read_bytes() for path in (*library.sources, *library.headers))
    compiler = os.environ.get("CC", "cc")
    failures: list[str] = []  # why each build tried before failed, in order
    generic = os.environ.get("XYSERVE_NATIVE_GENERIC", "0") == "1"
    # (the headers' directory names the interpreter: part of the key, as the flags are)
    python = (f"-I{sysconfig.get_paths()['include']}",) if library.python_api else ()
    for arch in _ARCH_FLAGS[1:] if generic else _ARCH_FLAGS:
        flags = (*library.flags, *python, *arch)
        key = hashlib.sha256(b"\0".join([source, " ".join((compiler, *flags)).encode(),
                                         platform.machine().encode(), _cpu_id().encode()]))
        path = _cache_dir() / f"{library.stem}-{key.hexdigest()[:16]}.so"
        if not path.exists():
            why = _build(compiler, flags, path, library.sources)
            if why:
                failures.append(why)
                continue
            logger.info("built %s: %s", library.what, path)
        try:
            handle = (ctypes.PyDLL if library.python_api else ctypes.CDLL)(str(path))
        except OSError as exc:
            failures.append(str(exc))
            continue
        for name, (restype, argtypes) in library.signatures.items():
            fn = getattr(handle, name)
            fn.restype, fn.argtypes = restype, argtypes
        if failures:  # a faster build failed: say so, it costs speed
            logger.warning("%s built with %s only (portable loops, slower) after: %s",
                           library.what, " ".join(arch) or "no -march", failures[-1])
        return handle
    logger.warning("running without %s (slower): %s", library.what,
                   failures[-1] if failures else "no build tried")
    return None


def _cpu_id() -> str:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "xyserve"


def _build(compiler: str, flags: tuple[str, ...], path: pathlib.Path,
           sources: tuple[pathlib.Path, ...]) -> str:
    """Compile into `path`; returns "" on success, else why not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        done = subprocess.run([compiler, *flags, "-o", tmp, *map(str, sources), "-lm"],
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            return f"{compiler} failed: {done.stderr.strip()[-500:]}"
        os.replace(tmp, path)
        return ""
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot build with {compiler}: {exc}"
