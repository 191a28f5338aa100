"""The engine tests' prompt set: 16 prompts of the default model (plain text, code, a long
prompt over a small token budget, chat templates), shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import transformers

from engine import LLM
from engine.stats import SpecDecodingStats

BASE_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5,",
    "Translate to French: I love apples.",
    "The three primary colors are",
    "import numpy as np\nimport torch\n\nclass",
    "Q: What is 12 times 12?\nA:",
    "Hi",
    "The quick brown fox jumps over the lazy dog. " * 12,  # ~120 tokens, over the budget
    "Photosynthesis is the process by which",
    "SELECT name, age FROM users WHERE",
    "Les mots français les plus courants sont",
    ("In the beginning of the twentieth century, physics underwent two revolutions. " * 8
     + "The first of these was"),  # ~150 tokens
]
CHAT = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three fruits. " + "Be brief. " * 30}],
]


@pytest.fixture(scope="session")
def prompts(default_model_dir) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    ids = [tok(p).input_ids for p in BASE_PROMPTS]
    ids += [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for m in CHAT]
    assert len(ids) >= 16
    return [list(map(int, x)) for x in ids]




def _record_spec_stats(llm: LLM) -> list[SpecDecodingStats]:
    """Make `llm` append every step's SpecDecodingStats to the returned list."""
    seen: list[SpecDecodingStats] = []
    step = llm.engine.step

    def recording_step() -> Any:
        outputs = step()
        stats = llm.engine.last_stats
        if stats is not None and stats.spec is not None:
            seen.append(stats.spec)
        return outputs

    llm.engine.step = recording_step  # type: ignore[method-assign]
    return seen


@pytest.fixture
def record_spec_stats() -> Callable[[LLM], list[SpecDecodingStats]]:
    return _record_spec_stats
