"""benchmarks/spec_decode.py without servers: the prompts, the layer-skip draft, the counters,
the report and the simulated-NPU time per token."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch

from benchmarks.spec_decode import (
    WORKLOADS,
    acceptance_between,
    quick,
    report,
    server_args,
    targets,
)
from benchmarks.spec_decode_npu import Acceptance, npu_time_per_token
from benchmarks.spec_decode_workloads import (
    PLAIN_QUESTIONS,
    chat_requests,
    code_snippets,
    echo_requests,
    layer_skip_draft,
    prose_paragraphs,
)


class FakeTokenizer:
    """Chat template and token counts of a whitespace tokenizer."""

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool,
                            add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<a>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any:
        return type("Encoded", (), {"input_ids": text.split()})()


def test_echo_prompts_quote_repository_code_and_prose() -> None:
    snippets, paragraphs = code_snippets(), prose_paragraphs()
    assert len(snippets) >= 16 and len(paragraphs) >= 8
    for code, name in snippets:
        assert code.startswith("def ") and name in code
    requests = echo_requests(FakeTokenizer(), 6, 192)
    assert len(requests) == 6 and all(r.output_len == 192 for r in requests)
    assert "Rename the variable" in requests[0].prompt and "```python\ndef " in requests[0].prompt
    assert requests[1].prompt.startswith("<user>Quote the following paragraph exactly")
    assert all(r.prompt.endswith("<a>") and r.prompt_len > 20 for r in requests)
    # deterministic, and the same prompts for every configuration
    assert [r.prompt for r in requests] == [r.prompt for r in echo_requests(FakeTokenizer(), 6,
                                                                            192)]


def test_chat_prompts_are_the_questions() -> None:
    requests = chat_requests(FakeTokenizer(), 32, 128)
    assert len({r.prompt for r in requests}) == 32 == len(PLAIN_QUESTIONS)
    assert len(chat_requests(FakeTokenizer(), 40, 128)) == 40  # cycles


def test_quick_workloads_are_small() -> None:
    assert {(w.name, w.concurrency) for w in WORKLOADS} == {
        (n, c) for n in ("echo-heavy", "plain-chat") for c in (1, 16)}
    assert all(quick(w).num_prompts <= 4 and quick(w).output_len <= 48 for w in WORKLOADS)


def test_server_args() -> None:
    assert server_args("none", 4, None) == ["--no-enable-prefix-caching"]
    assert server_args("ngram", 5, None)[-4:] == ["--speculative", "ngram",
                                                  "--num-speculative-tokens", "5"]
    d = pathlib.Path("/tmp/draft")
    assert server_args("draft-model", 4, d)[-2:] == ["--draft-model", str(d)]
    with pytest.raises(ValueError):
        server_args("draft-model", 4, None)


def test_layer_skip_draft_keeps_the_first_layers(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    src.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(4, 2), "model.norm.weight": torch.ones(2)}
    tensors.update({f"model.layers.{i}.mlp.down_proj.weight": torch.full((2, 2), float(i))
                    for i in range(12)})
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 12, "vocab_size": 4}))
    (src / "tokenizer.json").write_text("{}")
    draft = layer_skip_draft(src, 3, tmp_path / "out")
    kept = load_file(str(draft / "model.safetensors"))
    assert sorted(k for k in kept if "layers" in k) == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert json.loads((draft / "config.json").read_text())["num_hidden_layers"] == 3
    assert (draft / "tokenizer.json").is_file()
    assert layer_skip_draft(src, 3, tmp_path / "out") == draft  # built once
    with pytest.raises(ValueError):
        layer_skip_draft(src, 13, tmp_path / "out")


EXPOSITION = """# TYPE xyserve:spec_decode_num_drafts_total counter
xyserve:spec_decode_num_drafts_total{{model_name="m"}} {drafts}
# TYPE xyserve:spec_decode_num_draft_tokens_total counter
xyserve:spec_decode_num_draft_tokens_total{{model_name="m"}} {tokens}
# TYPE xyserve:spec_decode_num_accepted_tokens_total counter
xyserve:spec_decode_num_accepted_tokens_total{{model_name="m"}} {accepted}
# TYPE xyserve:spec_decode_num_accepted_tokens_per_pos_total counter
xyserve:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="0"}} {p0}
xyserve:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="1"}} {p1}
"""


def test_acceptance_from_counter_deltas() -> None:
    before = EXPOSITION.format(drafts=10, tokens=20, accepted=5, p0=4, p1=1)
    after = EXPOSITION.format(drafts=30, tokens=60, accepted=35, p0=24, p1=11)
    acc = acceptance_between(before, after, num_decode_tokens=100)
    assert acc.accepted_per_pos == (20, 10)
    assert acc.rate == pytest.approx(30 / 40)
    assert acc.mean_accepted_length == pytest.approx(1 + 30 / 20)
    assert acc.expected_accepted == pytest.approx(30 / 20)
    assert acc.mean_draft_len == 2
    # 20 verifies yielded 50 tokens; the other 50 decode tokens came one per plain slot
    assert acc.draft_share == pytest.approx(20 / 70)
    none = acceptance_between("", "", 100)  # a server without speculation
    assert none.rate == 0 and none.mean_accepted_length == 1 and none.draft_share == 0


def test_npu_time_per_token() -> None:
    good = Acceptance(100, 400, 300, (90, 80, 70, 60), 400)  # every slot verifies
    assert good.draft_share == 1.0
    t = npu_time_per_token(good, 1)
    assert t["tokens_per_step"] == pytest.approx(4.0) and t["spec_len"] == 4
    # a verify of 5 tokens costs little more than a decode at batch 1 (weight-bound)
    assert t["decode_step_ms"] < t["verify_step_ms"] < 1.5 * t["decode_step_ms"]
    assert t["speedup"] == pytest.approx(t["decode_ms_per_token"] / t["spec_ms_per_token"])
    assert 2.5 < t["speedup"] < 4.0
    draft = npu_time_per_token(good, 1, draft_layer_fraction=0.2)
    assert draft["draft_layers"] == 6 and draft["speedup"] < t["speedup"]
    useless = Acceptance(100, 400, 0, (0, 0, 0, 0), 100)
    assert npu_time_per_token(useless, 16)["speedup"] < 1.0  # verify work for nothing
    off = Acceptance(0, 0, 0, (), 100)  # adaptive drafting switched everything off
    assert npu_time_per_token(off, 16)["speedup"] == pytest.approx(1.0)


def _run(tok_s: float, texts: list[str], rate: float = 0.5) -> dict[str, Any]:
    return {"output_throughput": tok_s, "itl_ms": {"p50": 10.0, "p99": 30.0},
            "tpot_ms": {"mean": 12.0}, "acceptance_rate": rate, "mean_accepted_length": 2.5,
            "foreign_cpu_load": 0.01, "texts": texts}


def test_report_states_targets() -> None:
    data = {
        "date": "2026-01-01 00:00", "command": "python benchmarks/spec_decode.py",
        "machine": {"model": "cpu", "cores": 2, "memory_gib": 24, "torch_threads": 2},
        "versions": {"torch": "2"}, "model": "m", "num_speculative_tokens": 4,
        "draft_layers": 6, "target_layers": 30, "configs": ["none", "ngram", "tree"],
        "runs": {"echo-heavy@c1": {"none": _run(10, ["a", "b"]), "ngram": _run(16, ["a", "b"]),
                                   "tree": _run(14, ["a", "c"])},
                 "plain-chat@c16": {"none": _run(100, ["x"]), "ngram": _run(97, ["x"]),
                                    "tree": _run(90, ["x"])}},
        "npu": [{"workload": "echo-heavy", "config": "ngram", "batch": 1, "model": "llama-2-7b",
                 "chip": "910b2", "context": 1024, "acceptance_rate": 0.5,
                 "expected_accepted": 1.5, "spec_len": 4, "draft_share": 0.9,
                 "decode_step_ms": 14.4, "verify_step_ms": 15.0,
                 "decode_ms_per_token": 14.4, "spec_ms_per_token": 7.0, "speedup": 2.06,
                 "speedup_all": 2.2}],
    }
    t = targets(data)
    assert t["ngram"] == {"echo_c1": 1.6, "chat_c16": 0.97, "echo_met": True, "chat_met": True}
    assert t["tree"]["echo_met"] is False and t["tree"]["chat_met"] is False
    text = report(data)
    assert "| echo-heavy | 1 | ngram | 16.0 | 1.60x |" in text
    assert "| echo-heavy | 1 | tree | 14.0 | 1.40x |" in text and "| 1/2 |" in text
    assert "| ngram | 1.60x | met | 0.97x | met |" in text
    assert "| tree | 1.40x | NOT met | 0.90x | NOT met |" in text
    assert "llama-2-7b on one 910b2" in text and "| 1.04 | 14.400 | 7.000 | 2.06x | 2.20x |" in text
