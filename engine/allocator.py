"""The C library's heap, tuned for a server: few heaps, large temporaries kept, freed pages given
back on demand (glibc's mallopt / malloc_trim through ctypes; no-ops elsewhere). Plain ctypes,
no torch: the HTTP front end uses it too.
"""

from __future__ import annotations

import ctypes
import os

MALLOC_ARENAS = 2  # glibc heaps ("arenas") at most: the main one and one for all other threads.
#   glibc gives threads up to 8 per core, and malloc_trim cannot shrink the top of any but the
#   main one: measured on the default model, 20 bodies of 4 MiB left ~400 MiB resident that
#   trims gave back only 17-65 MiB of; with two heaps, 240-364 MiB (with one, 723 MiB: left at
#   two so the engine loop's allocations rarely wait on the other threads'; the GIL serializes
#   most of them anyway)


def limit_malloc_arenas() -> bool:
    """At most MALLOC_ARENAS glibc heaps from now on; the heaps threads already have stay, so a
    server calls this before any thread starts (before loading the model). Skipped where the
    user set MALLOC_ARENA_MAX or the C library has no mallopt. Returns whether it applied."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        m_arena_max = -8  # glibc's mallopt parameter number
        return bool(ctypes.CDLL(None).mallopt(m_arena_max, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


def keep_freed_tensor_memory() -> bool:
    """Let glibc serve tensors of up to 32 MiB from the heap and keep up to 256 MiB it frees,
    in at most MALLOC_ARENAS heaps (limit_malloc_arenas).

    By default glibc maps every allocation above a (dynamic) threshold afresh and gives freed
    heap tops back to the OS, so a step's large temporaries (gathered K/V, GEMM outputs of a long
    chunk) page-fault on every launch: measured here, gathering 11 MB of K cost 5.4 ms that way
    and 0.6 ms with the memory kept. Process-wide; skipped where the user set MALLOC_* tunables
    or the C library has no mallopt. Returns whether it applied.
    """
    if any(k.startswith(("MALLOC_MMAP_THRESHOLD", "MALLOC_TRIM_THRESHOLD", "MALLOC_ARENA_MAX"))
           for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 256 << 20)
                    and limit_malloc_arenas())
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc's malloc_trim), once the model is built:
    loading frees more than it keeps (the checkpoint's tensors, the unfused originals, the plain
    copies the fast path never reads), and glibc would otherwise keep it all, above the trim
    threshold that keep_freed_tensor_memory raised. Thread-safe (glibc locks each arena it
    trims). Returns whether any memory went back (malloc_trim's answer; False also where the C
    library has none: can_release_freed_memory)."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def can_release_freed_memory() -> bool:
    """Whether the C library has malloc_trim (glibc), that is whether release_freed_memory can
    ever give anything back."""
    try:
        return hasattr(ctypes.CDLL(None), "malloc_trim")
    except OSError:
        return False
