"""IncrementalDetokenizer against the real SmolLM2 tokenizer (byte-level BPE, from its GGUF)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.request import SamplingParams

IM_END = 2  # <|im_end|>, a special token of SmolLM2


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer: Any) -> Any:
    """The real SmolLM2 tokenizer (tests/conftest.py loads it once per session)."""
    return smollm2_tokenizer


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int = 1
) -> tuple[list[str], bool]:
    """Feed ids `chunk` at a time; the deltas (flush included unless stopped) and stopped."""
    deltas: list[str] = []
    for i in range(0, len(ids), chunk):
        text, stopped = detok.update(ids[i : i + chunk])
        deltas.append(text)
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


def detok_for(tok: Any, prompt: str = "", **params: Any) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tok, encode(tok, prompt), SamplingParams(**params))


# ---------------------------------------------------------------- text == full decode


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_random_sequences_match_full_decode(tok: Any, skip: bool) -> None:
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(200):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        ids.insert(rng.randrange(len(ids) + 1), IM_END)  # a special token somewhere
        detok = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
        deltas, stopped = stream(detok, ids, chunk=rng.randrange(1, 4))
        assert not stopped
        assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)


def test_multibyte_characters_split_across_tokens(tok: Any) -> None:
    text = " Hello, 日本語のテキスト 😀🎉 café naïve Ærøskøbing — ok"
    ids = encode(tok, text)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the text should split a character across tokens"
    detok = detok_for(tok, "Say something:")
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == text == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # nothing emitted mid-character
    assert "" in deltas[:-1]  # some token produced no text until its character completed


def test_first_token_keeps_its_leading_space(tok: Any) -> None:
    detok = detok_for(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(stream(detok, encode(tok, " Hello there"))[0]) == " Hello there"


def test_prompt_ending_inside_a_character_does_not_leak(tok: Any) -> None:
    ids = encode(tok, "Hi 日本")
    cut = next(i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i]))
    prompt, output = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    assert "".join(stream(detok, output)[0]) == tok.decode(output)


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok: Any) -> None:
    ids = encode(tok, " 😀")
    detok = detok_for(tok)
    assert detok.update(ids[:-1]) == ("", False)
    assert detok.flush() == tok.decode(ids[:-1])
    assert detok.text.endswith("\ufffd")


# ---------------------------------------------------------------- stop strings


def test_stop_string_spanning_two_tokens_is_excluded(tok: Any) -> None:
    ids = encode(tok, " The quick brown fox jumps over")
    detok = detok_for(tok, stop=("ck bro",))
    deltas, stopped = stream(detok, ids)
    assert stopped and detok.stopped
    assert "".join(deltas) == detok.text == " The qui"
    assert detok.update(encode(tok, " more")) == ("", True)  # nothing after a stop
    assert detok.flush() == "" and detok.text == " The qui"


def test_include_stop_str_in_output_cuts_right_after_it(tok: Any) -> None:
    ids = encode(tok, " The quick brown fox jumps over")
    detok = detok_for(tok, stop=("ck bro",), include_stop_str_in_output=True)
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == " The quick bro"


def test_stop_inside_one_token_with_text_after_it(tok: Any) -> None:
    ids = encode(tok, " alphabet soup")
    detok = detok_for(tok, stop=("pha",))
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == " al"


def test_first_completed_stop_wins(tok: Any) -> None:
    ids = encode(tok, " The quick brown fox")
    deltas, _ = stream(detok_for(tok, stop=("brown fox", "quick", "The quick brown")), ids)
    assert "".join(deltas) == " The "
    deltas, _ = stream(detok_for(tok, stop=("fox", "brown fox")), ids)  # same end: longer one
    assert "".join(deltas) == " The quick "


def test_possible_stop_prefix_is_held_back_then_flushed(tok: Any) -> None:
    detok = detok_for(tok, stop=("lo there",))
    text, stopped = detok.update(encode(tok, " Hello"))
    assert (text, stopped) == (" Hel", False)  # "lo" could start "lo there"
    text, stopped = detok.update(encode(tok, " th"))
    assert (text, stopped) == ("", False)  # "lo th" still could
    text, stopped = detok.update(encode(tok, "ink"))
    assert (text, stopped) == ("lo think", False)  # no longer
    assert detok.update(encode(tok, " lo")) == (" ", False)
    assert detok.flush() == "lo"
    assert detok.text == " Hello think lo"


def test_streamed_text_never_includes_text_after_the_stop(tok: Any) -> None:
    rng = random.Random(1)
    words = ["alpha", " beta", " gamma", "\n\n", " END", " delta", " 日本", "!"]
    for _ in range(100):
        text = "".join(rng.choice(words) for _ in range(12))
        ids = encode(tok, text)
        full = tok.decode(ids)
        stops = ("\n\n", " END")
        detok = detok_for(tok, stop=stops)
        deltas, stopped = stream(detok, ids, chunk=rng.randrange(1, 3))
        cut = min((i for i in (full.find(s) for s in stops) if i >= 0), default=len(full))
        assert "".join(deltas) == full[:cut]
        assert stopped == (cut < len(full))


def test_stop_strings_wait_for_min_tokens(tok: Any) -> None:
    ids = encode(tok, " stop here and stop there")
    detok = detok_for(tok, stop=("stop",), min_tokens=2)
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == " stop here and "


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_is_left_out_unless_included(tok: Any, include: bool) -> None:
    ids = encode(tok, " Hi. Bye")
    period = ids.index(encode(tok, ".")[0])
    detok = detok_for(tok, include_stop_str_in_output=include)
    detok.update(ids[:period])
    detok.update(ids[period : period + 1], stop_terminated=True)
    assert detok.text + detok.flush() == (" Hi." if include else " Hi")


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok: Any, skip: bool) -> None:
    ids = [*encode(tok, " Done"), IM_END, *encode(tok, "\nmore")]
    deltas, _ = stream(detok_for(tok, skip_special_tokens=skip), ids)
    assert "".join(deltas) == (" Done\nmore" if skip else " Done<|im_end|>\nmore")
