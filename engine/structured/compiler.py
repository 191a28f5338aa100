"""Structured outputs compiled by llguidance, once per distinct constraint.

Why llguidance (measured against xgrammar on this model's tokenizer, 2 cores; the numbers and the
command are in benchmarks/results/2026-12-02-grammar-engines.md): a JSON schema compiles in
~1 ms against ~35-50 ms, which matters because every request may bring a schema of its own; its
masks cost ~60 us a token against ~5 us, both well under 1% of a decode step and computed while
the model runs anyway (engine.structured.masks); it has no dependencies, where xgrammar's wheel
pulls in triton on Linux; and it takes Lark grammars with embedded JSON schemas, which the tool
call grammars use.

`GrammarCompiler.compile` is called by EngineCore.add_request (the engine thread): a constraint
that cannot be compiled is a RequestRejected naming the request field, before anything is queued.
The compiled grammar is a pristine matcher that each request copies (`new_matcher`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.request import RequestRejected
from engine.stats import GrammarStats
from engine.structured.matcher import GrammarMatcher
from engine.structured.params import JSON_OPTIONS, StructuredOutputs

MAX_CACHED_GRAMMARS = 256  # distinct constraints kept compiled (LRU)
MAX_ERROR_CHARS = 400  # a compile error quoted in a 400 at most


@dataclass(frozen=True)
class CompiledGrammar:
    """A constraint compiled for one tokenizer: copy it into a matcher per request."""

    key: tuple[str, str]  # (kind, spec) of the StructuredOutputs it came from
    pristine: Any  # llguidance.LLMatcher at the start of the grammar; never advanced

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.pristine.deep_copy())


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer; caches; counts compile time and hits.

    The llguidance tokenizer takes ~1 s to build: `warm_up()` starts that on a thread of its own
    (the server calls it at start), else the first compile builds it. Thread-safe: the server
    compiles a request's constraint on a worker thread before queueing it (so a slow schema
    never stalls the engine loop), and the engine thread then finds it cached.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        """tokenizer: the model's Hugging Face (fast) tokenizer; vocab_size: the model's logits
        width (tokens beyond the tokenizer's are never allowed); eos_token_ids: the ids a
        finished grammar allows (and nothing else)."""
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._ready = threading.Event()
        self._building = threading.Lock()
        self._lock = threading.Lock()  # guards the cache and the stats
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._compile_s: list[float] = []  # compile times since the last take_stats()
        self._num_hits = 0  # cache hits since the last take_stats()

    def warm_up(self) -> None:
        """Build the llguidance tokenizer in the background (idempotent)."""
        if not self._ready.is_set() and not self._building.locked():
            threading.Thread(target=self._tokenizer_now, name="xyserve-grammar-init",
                             daemon=True).start()

    def compile(self, constraint: StructuredOutputs) -> CompiledGrammar:
        """The compiled grammar of `constraint` (cached). Raises RequestRejected naming
        `constraint.param` when it cannot be compiled."""
        key = (constraint.kind, constraint.spec)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self._num_hits += 1
                return compiled
        from llguidance import LLMatcher

        tokenizer = self._tokenizer_now()
        start_s = time.perf_counter()
        try:
            matcher = LLMatcher(tokenizer, grammar_text(constraint), log_level=0)
        except Exception as exc:  # a schema that is not JSON, GBNF the translator refuses, ...
            raise _rejected(constraint, str(exc)) from None
        if matcher.is_error():
            raise _rejected(constraint, matcher.get_error())
        compiled = CompiledGrammar(key, matcher)
        with self._lock:
            self._compile_s.append(time.perf_counter() - start_s)
            self._cache[key] = compiled
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def take_stats(self) -> GrammarStats | None:
        """Compiles and cache hits since the last call (None when there were none)."""
        with self._lock:
            if not self._compile_s and not self._num_hits:
                return None
            stats = GrammarStats(tuple(self._compile_s), self._num_hits)
            self._compile_s, self._num_hits = [], 0
        return stats

    def _tokenizer_now(self) -> Any:
        if not self._ready.is_set():
            with self._building:
                if self._ll_tokenizer is None:
                    import llguidance.hf

                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids)
                    self._ready.set()
        return self._ll_tokenizer


def grammar_text(constraint: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON or Lark form) of a constraint."""
    from llguidance import LLMatcher

    kind, spec = constraint.kind, constraint.spec
    if kind == "json":
        return str(LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS))
    if kind == "json_object":
        return str(LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS))
    if kind == "regex":
        return str(LLMatcher.grammar_from_regex(spec))
    if kind == "choice":
        # Lark string literals take JSON's escapes.
        choices = json.loads(spec)
        return str(LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)))
    if "::=" in spec:  # GBNF (llama.cpp, xgrammar's EBNF): llguidance translates it
        from llguidance.gbnf_to_lark import gbnf_to_lark

        spec = gbnf_to_lark(spec)
    return str(LLMatcher.grammar_from_lark(spec))


def _rejected(constraint: StructuredOutputs, error: str) -> RequestRejected:
    error = error.strip()
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + "..."
    what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
            "choice": "choice list", "grammar": "grammar"}[constraint.kind]
    return RequestRejected(f"{constraint.param}: the {what} cannot be compiled: {error}",
                           param=constraint.param, code="invalid_grammar")
