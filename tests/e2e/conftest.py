"""The engine tests' prompt set: 16 prompts of the default model (plain text, code, a long
prompt over a small token budget, chat templates), shared by the end-to-end tests."""

from __future__ import annotations

import pytest
import transformers

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


