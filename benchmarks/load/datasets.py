"""Benchmark workloads: lists of `BenchRequest` (a prompt text and how many tokens to generate).

- `random`: prompts of random tokens, input and output lengths drawn uniformly from
  `[len * (1 - range_ratio), len * (1 + range_ratio)]`, seeded (vLLM's `random` dataset).
- `sharegpt`: the first human turn of each ShareGPT conversation as the prompt, the length of the
  first reply as the output length (filtered as vLLM does: no tiny or overlong pairs). For
  /v1/chat/completions (`multi_turn`), the conversation up to its last human turn that has a reply
  (earlier turns as user / assistant messages), that reply's length as the output length.
- `shared-prefix`: one (or a few) long common system prompts, each followed by a short question
  (SGLang's generated-shared-prefix dataset): the workload prefix caching is for.

Lengths are in tokens of the benchmarked model's tokenizer; the prompt is sent as text, so the
server's own count (its usage) is what the metrics use.
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass
from typing import Any

DATASETS = ("random", "sharegpt", "shared-prefix")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")  # what `xyserve bench` can load
Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class BenchRequest:
    prompt: str  # sent as the completions prompt (chat: the last user message's content)
    prompt_len: int  # its length in tokens, as the client tokenizer counts them
    output_len: int  # max_tokens of the request
    history: tuple[Message, ...] = ()  # chat: the messages before the prompt (multi-turn)

    @property
    def messages(self) -> list[Message]:
        """The chat messages: the history, then the prompt as the user's turn."""
        return [*self.history, {"role": "user", "content": self.prompt}]


def load_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer: a local directory, an xyserve preset or a Hub name."""
    import transformers

    path = pathlib.Path(name_or_path)
    if not path.exists():
        from engine.models.loader import PRESETS, resolve_model_path

        if name_or_path in PRESETS:
            path = resolve_model_path(name_or_path)
    return transformers.AutoTokenizer.from_pretrained(str(path) if path.exists()
                                                      else name_or_path)


def _lengths(rng: random.Random, mean: int, range_ratio: float, num: int) -> list[int]:
    low = max(1, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num)]


class _RandomText:
    """Text of about n tokens made of random ordinary (non-special) tokens."""

    def __init__(self, tokenizer: Any, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(tokenizer.all_special_ids)
        self.vocab = [i for i in range(len(tokenizer)) if i not in special]

    def __call__(self, num_tokens: int) -> tuple[str, int]:
        ids = [self.rng.choice(self.vocab) for _ in range(num_tokens)]
        text = self.tokenizer.decode(ids)
        # Decoding and encoding again need not round-trip: trim to the length asked for.
        for _ in range(3):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) <= num_tokens:
                break
            text = self.tokenizer.decode(ids[:num_tokens])
        return text, len(ids)


def random_requests(tokenizer: Any, num_prompts: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    make = _RandomText(tokenizer, rng)
    inputs = _lengths(rng, input_len, range_ratio, num_prompts)
    outputs = _lengths(rng, output_len, range_ratio, num_prompts)
    out = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        text, n = make(n_in)
        out.append(BenchRequest(text, n, n_out))
    return out


def shared_prefix_requests(tokenizer: Any, num_prompts: int, prefix_len: int, question_len: int,
                           output_len: int, num_prefixes: int = 1,
                           seed: int = 0) -> list[BenchRequest]:
    """`num_prompts` prompts cycling over `num_prefixes` system prompts of `prefix_len` tokens,
    each followed by its own question of about `question_len` tokens."""
    rng = random.Random(seed)
    make = _RandomText(tokenizer, rng)
    prefixes = [make(prefix_len)[0] for _ in range(num_prefixes)]
    out = []
    for i in range(num_prompts):
        question, _ = make(question_len)
        prompt = prefixes[i % num_prefixes] + "\n\nQuestion " + str(i) + ": " + question
        n = len(tokenizer.encode(prompt, add_special_tokens=False))
        out.append(BenchRequest(prompt, n, output_len))
    return out


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
          "bing": "assistant", "bard": "assistant", "assistant": "assistant"}


def _turns(conversation: list[dict[str, Any]]) -> list[Message]:
    """The conversation as alternating user / assistant messages, starting with the user (turns
    of unknown roles, and a leading assistant turn, dropped)."""
    turns: list[Message] = []
    for turn in conversation:
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None or (not turns and role != "user"):
            continue
        if turns and turns[-1]["role"] == role:  # two in a row: keep the later
            turns.pop()
        turns.append({"role": role, "content": str(turn.get("value", ""))})
    return turns


def _history_and_reply(turns: list[Message],
                       multi_turn: bool) -> tuple[list[Message], str, str] | None:
    """(earlier messages, the prompt, its reply): the first exchange, or with multi_turn the
    last user turn that has a reply; None without one."""
    exchanges = [i for i in range(len(turns) - 1)
                 if turns[i]["role"] == "user" and turns[i + 1]["role"] == "assistant"]
    if not exchanges:
        return None
    i = exchanges[-1] if multi_turn else exchanges[0]
    return turns[:i], turns[i]["content"], turns[i + 1]["content"]


def sharegpt_requests(tokenizer: Any, path: str, num_prompts: int,
                      output_len: int | None = None, seed: int = 0,
                      multi_turn: bool = False) -> list[BenchRequest]:
    """Requests from a ShareGPT JSON file (a list of {"conversations": [{"from", "value"}]});
    multi_turn: each request carries its conversation's earlier turns (chat endpoint)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    picked = [_history_and_reply(_turns(d.get("conversations", [])), multi_turn) for d in data]
    exchanges = [p for p in picked if p is not None]
    random.Random(seed).shuffle(exchanges)
    out: list[BenchRequest] = []
    for history, prompt, reply in exchanges:
        if len(out) == num_prompts:
            break
        n_in = sum(len(tokenizer.encode(m["content"], add_special_tokens=False))
                   for m in [*history, {"content": prompt}])
        n_out = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        # vLLM's filter: too short to mean anything, or too long for common context windows.
        if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > 2048:
            continue
        out.append(BenchRequest(prompt, n_in, n_out, tuple(history)))
    if not out:
        raise ValueError(f"no usable conversation in {path}")
    return out
