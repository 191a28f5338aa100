"""engine.outputs.ScheduledChunks: a step's decode rows as columns read as the tuple of
ScheduledChunks it stands for, and the column readers on it and on plain tuples alike."""

from __future__ import annotations

import pytest

from engine.outputs import (
    ScheduledChunk,
    ScheduledChunks,
    decode_rows,
    start_positions,
    token_counts,
)

PREFILL = ScheduledChunk("c", 0, (5, 6, 7), (9,), True)
PARTIAL = ScheduledChunk("d", 4, (1, 2), (3, 4), False)


def _chunks() -> ScheduledChunks:
    return ScheduledChunks(["a", "b"], [10, 20], [101, 102], [(0, 1), (2,)], (PREFILL, PARTIAL))


def _as_tuple() -> tuple[ScheduledChunk, ...]:
    return (ScheduledChunk("a", 10, (101,), (0, 1), True),
            ScheduledChunk("b", 20, (102,), (2,), True), PREFILL, PARTIAL)


def test_reads_as_the_tuple_of_its_chunks() -> None:
    chunks, expected = _chunks(), _as_tuple()
    assert len(chunks) == 4 and chunks.num_decodes == 2 and chunks
    assert chunks == expected and expected == chunks and chunks == _chunks()
    assert tuple(chunks) == expected and list(chunks) == list(expected)
    assert chunks[0] == expected[0] and chunks[-1] is PARTIAL
    assert chunks[1:3] == expected[1:3]
    assert chunks.chunks() is chunks.chunks()  # made once
    assert repr(chunks).startswith("ScheduledChunks(ScheduledChunk(request_id='a'")
    assert chunks != _chunks()[:3] and chunks != "abcd"
    assert not ScheduledChunks([], [], [], [], ())
    with pytest.raises(TypeError):
        hash(chunks)


@pytest.mark.parametrize("columns", [True, False])
def test_column_readers_read_columns_or_chunks_alike(columns: bool) -> None:
    chunks = _chunks() if columns else _as_tuple()
    ids, others = decode_rows(chunks, 2)
    assert list(ids) == ["a", "b"] and tuple(others) == (PREFILL, PARTIAL)
    ids, others = decode_rows(chunks, 1)  # (fewer than the columns: chunk by chunk)
    assert list(ids) == ["a"] and tuple(others) == _as_tuple()[1:]
    assert start_positions(chunks) == [10, 20, 0, 4]
    assert token_counts(chunks) == [1, 1, 3, 2]
