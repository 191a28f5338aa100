"""Token ids in bulk: a request's vocabulary check and the prefix cache's chained block hashes.

Both run once per request over its whole prompt (a thousand ids is common): in Python that is
~20 us for the check (min and max, two passes) and ~35 us for the hashes (a pack, then a
hashlib call per 16-token block), ~1 s of a simulated trace of 20,000 requests. A small C
library (engine/token_ids.c, built and loaded by native_build) does each in one call
over the ids packed as int64s, the hashes with the SHA-256 of the OpenSSL that hashlib runs on:
the same digests, bit for bit (tests/engine/test_token_ids.py). Short inputs, a machine without
a C compiler or OpenSSL, and XYSERVE_NATIVE_KERNELS=0 take the Python loops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import struct
from collections.abc import Callable, Iterator, Sequence

import native_build

DIGEST_BYTES = 32  # SHA-256

_P, _I = ctypes.c_void_p, ctypes.c_int64
_LIBRARY = native_build.Library(
    "token_ids", (pathlib.Path(__file__).with_name("token_ids.c"),), (),
    ("-O2", "-fPIC", "-shared"),
    {"xy_first_outside": (_I, [ctypes.c_char_p, _I, _I]),
     "xy_hash_blocks": (ctypes.c_int, [_P, ctypes.c_char_p, _I, ctypes.c_char_p, _I, _I, _P])},
    "the engine's C token-id loops")

# `pack`'s packers by number of ids: a block's, and prompts' (bounded: lengths are many)
_PACKERS: dict[int, Callable[..., bytes]] = {}
_MAX_PACKERS = 1024

# Below these sizes a ctypes call (~1.5 us) costs more than Python's own loop saves.
_NATIVE_MIN_IDS = 64
_NATIVE_MIN_BLOCKS = 4


class _Sha256Fns(ctypes.Structure):
    """token_ids.c's sha256_fns: OpenSSL's SHA256_Init, SHA256_Update, SHA256_Final."""

    _fields_ = [("init", _P), ("update", _P), ("final", _P)]


def pack(token_ids: Sequence[int]) -> bytes | None:
    """The ids as native int64s (what the hashes cover); None where one is not an integer or
    does not fit in 64 bits."""
    packer = _PACKERS.get(len(token_ids))
    if packer is None:  # (a format parsed once per length: struct.pack parses it every call)
        if len(_PACKERS) >= _MAX_PACKERS:
            _PACKERS.clear()
        packer = _PACKERS[len(token_ids)] = struct.Struct(f"{len(token_ids)}q").pack
    try:
        return packer(*token_ids)
    except struct.error:
        return None


def first_outside(token_ids: Sequence[int], vocab_size: int,
                  packed: bytes | None = None) -> int | None:
    """The first id of `token_ids` outside [0, vocab_size), or None when there is none.
    packed: `pack(token_ids)` where the caller has it (a long input is packed here else)."""
    if len(token_ids) >= _NATIVE_MIN_IDS:
        library = native_build.loaded(_LIBRARY)
        if library is not None:
            if packed is None:
                packed = pack(token_ids)
            if packed is not None:  # (else an id beyond int64 or not an int: the walk below)
                index = library.xy_first_outside(packed, len(token_ids), vocab_size)
                return None if index < 0 else token_ids[index]
    # min / max first: two C passes, then a Python walk only where one is out
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return None
    return next((t for t in token_ids if not 0 <= t < vocab_size), None)


def chain_hashes(parent: bytes, packed: bytes, block_bytes: int) -> list[bytes]:
    """SHA-256 digests of the whole `block_bytes` blocks of `packed`, chained: block b's is
    sha256(parent_b + block b), where parent_0 = `parent` and parent_b is block b-1's digest.
    A partial last block is left out."""
    num_blocks = len(packed) // block_bytes
    if num_blocks >= _NATIVE_MIN_BLOCKS:
        library = native_build.loaded(_LIBRARY)
        sha = None if library is None else _openssl_sha256(library)
        if sha is not None:
            out = ctypes.create_string_buffer(DIGEST_BYTES * num_blocks)
            if not library.xy_hash_blocks(ctypes.byref(sha), parent, len(parent), packed,
                                          num_blocks, block_bytes, out):
                raw = out.raw
                return [raw[i:i + DIGEST_BYTES]
                        for i in range(0, DIGEST_BYTES * num_blocks, DIGEST_BYTES)]
    sha256 = hashlib.sha256
    hashes: list[bytes] = []
    for offset in range(0, num_blocks * block_bytes, block_bytes):
        parent = sha256(parent + packed[offset:offset + block_bytes]).digest()
        hashes.append(parent)
    return hashes


@functools.cache
def _openssl_sha256(library: ctypes.CDLL) -> _Sha256Fns | None:
    """OpenSSL's SHA-256 functions, from the libcrypto hashlib loaded (else the system's), or
    None where none is found or `library`'s digests with them are not hashlib's (checked on
    one input)."""
    for path in _libcrypto_paths():
        try:
            crypto = ctypes.CDLL(path)
            fns = _Sha256Fns(*(ctypes.cast(getattr(crypto, name), _P).value
                               for name in ("SHA256_Init", "SHA256_Update", "SHA256_Final")))
        except (OSError, AttributeError):
            continue
        if _agrees(library, fns):
            return fns
    return None


def _libcrypto_paths() -> Iterator[str]:
    """Where libcrypto may be: the one mapped into this process (hashlib's), then, only if
    that one fails, the system's by name (ctypes.util.find_library runs ldconfig)."""
    try:
        maps = pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    mapped = {line.split(maxsplit=5)[-1] for line in maps.splitlines()}
    yield from sorted(p for p in mapped if os.path.basename(p).startswith("libcrypto."))
    import ctypes.util  # (here: it imports subprocess and shutil)

    found = ctypes.util.find_library("crypto")
    if found:
        yield found


def _agrees(library: ctypes.CDLL, fns: _Sha256Fns) -> bool:
    """Whether `library` with `fns` gives hashlib's chained digests on a probe."""
    parent, packed = b"probe", bytes(range(256)) * 2
    out = ctypes.create_string_buffer(DIGEST_BYTES * 4)
    if library.xy_hash_blocks(ctypes.byref(fns), parent, len(parent), packed, 4, 128, out):
        return False
    expected = b""
    for offset in range(0, 512, 128):
        parent = hashlib.sha256(parent + packed[offset:offset + 128]).digest()
        expected += parent
    return out.raw == expected
