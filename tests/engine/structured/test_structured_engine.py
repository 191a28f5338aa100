"""Structured outputs in the engine: every output matches its constraint, greedy or sampled, with
or without speculative decoding, while unconstrained requests in the same batch are untouched.

The tiny random-weight model has no idea of JSON: whatever it produces is the grammar's doing.
Strings and numbers are bounded in the schemas so that every document ends within max_tokens.
"""

from __future__ import annotations

import json
import pathlib
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.request import RequestRejected
from engine.structured import StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "kind", "tags"],
    "additionalProperties": False,
}
PROMPT = "Describe a pet as JSON:"
MAX_TOKENS = 96


def make_llm(model_dir: pathlib.Path, **options: object) -> LLM:
    return LLM(model=str(model_dir), dtype="float32", block_size=16, num_kv_blocks=128,
               max_model_len=512, **options)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: pathlib.Path) -> LLM:
    return make_llm(tiny_llama_dir)


def params(constraint: StructuredOutputs | None, temperature: float = 0.0,
           seed: int | None = None, **extra: object) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
                          structured_outputs=constraint, **extra)


def test_json_schema_greedy_and_sampled_always_validate(llm: LLM) -> None:
    constraint = StructuredOutputs.json(SCHEMA)
    batch = [params(constraint)] + [params(constraint, 1.0, seed) for seed in range(15)]
    outs = llm.generate([PROMPT] * len(batch), batch)
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert len({o.outputs[0].text for o in outs}) > 1  # sampling does sample


def test_unconstrained_rows_are_untouched(llm: LLM) -> None:
    free = SamplingParams(max_tokens=24, temperature=0.0)
    free_sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=7)
    alone = llm.generate([PROMPT, PROMPT], [free, free_sampled])
    mixed = llm.generate([PROMPT] * 4, [free, params(StructuredOutputs.json(SCHEMA)),
                                        free_sampled, params(StructuredOutputs.regex("[ab]{4}"))])
    assert [o.outputs[0].token_ids for o in alone] == \
        [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    assert re.fullmatch("[ab]{4}", mixed[3].outputs[0].text)


@pytest.mark.parametrize(("constraint", "pattern"), [
    (StructuredOutputs.regex(r"[0-9]{3}-[a-z]{2}"), r"[0-9]{3}-[a-z]{2}"),
    (StructuredOutputs.choice(["yes", "no", 'say "hi"']), r'yes|no|say "hi"'),
    (StructuredOutputs.grammar('start: "x=" NUM\nNUM: /[1-9][0-9]?/'), r"x=[1-9][0-9]?"),
    (StructuredOutputs.grammar('root ::= "a" ("b" | "c")'), r"a[bc]"),  # GBNF
])
def test_regex_choice_and_grammars(llm: LLM, constraint: StructuredOutputs, pattern: str) -> None:
    outs = llm.generate([PROMPT] * 4, [params(constraint, t, s) for t, s in
                                       ((0.0, None), (1.0, 1), (1.0, 2), (0.7, 3))])
    for out in outs:
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"


def test_min_tokens_never_breaks_a_finished_grammar(llm: LLM) -> None:
    out = llm.generate(PROMPT, params(StructuredOutputs.choice(["ok"]), min_tokens=5))[0]
    assert out.outputs[0].text.startswith("ok")


@pytest.mark.parametrize("constraint", [
    StructuredOutputs.json({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
    StructuredOutputs.regex("(unclosed"),
    StructuredOutputs.grammar("start: undefined_rule"),
])
def test_uncompilable_constraints_are_rejected_naming_the_field(
        llm: LLM, constraint: StructuredOutputs) -> None:
    constraint = StructuredOutputs(constraint.kind, constraint.spec, param="guided_x")
    with pytest.raises(RequestRejected) as info:
        llm.generate(PROMPT, params(constraint))
    assert info.value.param == "guided_x"
    assert str(info.value).startswith("guided_x: ")


def test_bad_shapes_fail_when_built() -> None:
    with pytest.raises(ValueError, match="must be a JSON schema"):
        StructuredOutputs("json", "[1]")
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputs.choice([])


def test_compiles_are_cached_and_counted(llm: LLM) -> None:
    core = llm.engine
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}
    for _ in range(3):
        core.add_request(f"cache-{_}", [1, 2, 3], params(StructuredOutputs.json(schema)))
    while core.has_unfinished_requests():
        core.step()
    compiler = core.grammar_compiler()
    assert compiler.take_stats() is None  # the steps took them
    # one compile, two hits, reported with the steps
    core.add_request("cache-x", [1, 2, 3], params(StructuredOutputs.json(schema)))
    core.step()
    stats = core.last_stats
    assert stats is not None and stats.grammar is not None
    assert stats.grammar.compile_s == () and stats.grammar.num_cache_hits == 1
    while core.has_unfinished_requests():
        core.step()


@pytest.mark.parametrize("method", ["ngram", "tree"])
def test_speculative_decoding_keeps_outputs_valid_and_unchanged(
        tiny_llama_dir: pathlib.Path, llm: LLM, method: str) -> None:
    spec = make_llm(tiny_llama_dir, speculative=method, spec_token_cost=0.0)
    constraint = StructuredOutputs.json(SCHEMA)
    batch = [params(constraint)] + [params(constraint, 1.0, s) for s in range(5)]
    outs = spec.generate([PROMPT] * len(batch), batch)
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    # greedy speculation is exact: the same tokens as without drafts
    assert outs[0].outputs[0].token_ids == llm.generate(PROMPT, batch[0])[0].outputs[0].token_ids
