"""engine.token_ids: the C vocabulary check and chained block hashes give Python's answers.

Each case runs twice, with the C library (where this machine builds it) and without
(native_build.disabled(): the Python loops), against a plain reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
from collections.abc import Iterator

import pytest

import native_build
from engine import token_ids
from engine.arch_presets import resolve_arch
from engine.config import EngineConfig
from engine.request import RequestRejected, SamplingParams
from engine.timing_runner import build_timing_engine

VOCAB_SIZE = 32_000


def _reference_hashes(parent: bytes, packed: bytes, block_bytes: int) -> list[bytes]:
    hashes = []
    for offset in range(0, len(packed) - block_bytes + 1, block_bytes):
        parent = hashlib.sha256(parent + packed[offset:offset + block_bytes]).digest()
        hashes.append(parent)
    return hashes


def _both_paths() -> list[bool]:
    """Whether each run is native: both where the library builds here, else Python only."""
    return [False, True] if native_build.loaded(token_ids._LIBRARY) is not None else [False]


def test_the_c_library_and_openssl_are_found_where_a_compiler_is() -> None:
    """Not a silent fallback: on a machine with `cc` and OpenSSL (CPython's hashlib links it),
    the native hashes are the ones taken."""
    library = native_build.loaded(token_ids._LIBRARY)
    if library is None:
        pytest.skip("no C compiler here (the Python loops run)")
    if next(token_ids._libcrypto_paths(), None) is None:
        pytest.skip("no libcrypto here (the Python hashes run)")
    assert token_ids._openssl_sha256(library) is not None


@pytest.mark.parametrize("native", _both_paths())
def test_chained_hashes_are_hashlibs(native: bool) -> None:
    rng = random.Random(0)
    for parent in (b"xyserve-prefix-cache-v1", bytes(range(32)), b""):
        for block_bytes in (8, 128):
            for num_bytes in (0, 7, block_bytes, 3 * block_bytes + 5, 37 * block_bytes):
                packed = rng.randbytes(num_bytes)
                with _python_only(not native):
                    got = token_ids.chain_hashes(parent, packed, block_bytes)
                assert got == _reference_hashes(parent, packed, block_bytes), (
                    parent, block_bytes, num_bytes)


@pytest.mark.parametrize("native", _both_paths())
@pytest.mark.parametrize("num_ids", [0, 1, 63, 64, 1000])
def test_first_outside_finds_the_first_id_outside_the_vocabulary(native: bool,
                                                                 num_ids: int) -> None:
    rng = random.Random(num_ids)
    inside = [rng.randrange(VOCAB_SIZE) for _ in range(num_ids)] + [0, VOCAB_SIZE - 1]
    bad_values = (-1, VOCAB_SIZE, VOCAB_SIZE + 1, -2**63, 2**63 - 1, 2**64, -2**70)
    with _python_only(not native):
        assert token_ids.first_outside(inside, VOCAB_SIZE) is None
        assert token_ids.first_outside(tuple(inside), VOCAB_SIZE) is None
        for bad in bad_values:
            for at in {0, len(inside) // 2, len(inside)}:
                ids = [*inside[:at], bad, *inside[at:], VOCAB_SIZE + 7]  # the first bad counts
                assert token_ids.first_outside(ids, VOCAB_SIZE) == bad, (bad, at)


@pytest.mark.parametrize("native", _both_paths())
def test_an_engine_rejects_a_long_prompt_naming_its_bad_id(native: bool) -> None:
    """A prompt long enough for the C check: rejected with the id named, nothing queued; a
    good one beside it is served."""
    config = EngineConfig.from_kwargs(model="llama-2-7b", block_size=16, num_kv_blocks=256)
    core = build_timing_engine(config, resolve_arch("llama-2-7b"), "llama-2-7b")
    with _python_only(not native):
        with pytest.raises(RequestRejected, match="prompt: token id 1000000000 is outside"):
            core.add_request("bad", [5] * 500 + [10**9] + [5] * 10, SamplingParams(max_tokens=1))
        assert not core.has_unfinished_requests()
        core.add_request("good", [5] * 511, SamplingParams(max_tokens=1, ignore_eos=True))
    assert core.has_unfinished_requests()


@contextlib.contextmanager
def _python_only(python_only: bool) -> Iterator[None]:
    """native_build.disabled() where `python_only`, else nothing."""
    with native_build.disabled() if python_only else contextlib.nullcontext():
        yield


def test_pack_is_structs_for_every_length_also_once_its_packers_are_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_ids, "_MAX_PACKERS", 3)
    monkeypatch.setattr(token_ids, "_PACKERS", {})
    rng = random.Random(2)
    for num_ids in (0, 1, 128, 5, 128, 1155, 7, 1, 128):
        ids = [rng.randrange(-2**63, 2**63) for _ in range(num_ids)]
        assert token_ids.pack(ids) == struct.pack(f"{num_ids}q", *ids)
        assert len(token_ids._PACKERS) <= 3
    assert token_ids.pack([1, 2**63]) is None  # (beyond int64)
    assert token_ids.pack([1, "2"]) is None  # type: ignore[list-item]
