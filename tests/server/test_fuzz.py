"""Fuzzing: schemathesis generates requests for every operation of the server's own OpenAPI
schema (/openapi.json of a running tiny-model server), valid ones (positive) and invalid ones
(negative), and sends them over HTTP.

Checks on every response: never a 5xx; every 4xx has OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`; a 2xx to a valid request conforms to the
schema (status, content type, body), and a stream ends with `data: [DONE]` and no error event.
After the run the server holds no request and no KV block, and a greedy request returns exactly
what it returned before the run.

    XYSERVE_FUZZ_EXAMPLES  cases per operation and mode (default 25, derandomized so `make test`
                           is repeatable; `make fuzz` runs 1000 with fresh random seeds)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.harness import TINY_NAME, ServerProcess, run_server
from tests.server.test_disconnect import wait_until_idle

EXAMPLES = int(os.environ.get("XYSERVE_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = "XYSERVE_FUZZ_EXAMPLES" not in os.environ
CASE_TIMEOUT_S = 60.0
GREEDY = {"model": TINY_NAME, "prompt": "The meaning of life is", "max_tokens": 16,
          "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    # A short max_model_len bounds the work of any one generated request (n <= 128 choices of at
    # most 64 tokens), so the run's time depends on the case count, not on luck.
    with run_server(str(tiny_llama_dir), server_logs, "--num-kv-blocks", "64", "--block-size",
                    "16", "--max-model-len", "64", served_name=TINY_NAME) as server:
        yield server


def problems_with(case: schemathesis.Case, response: Any, mode: GenerationMode) -> list[str]:
    """What is wrong with `response` to `case` (empty: nothing)."""
    status = response.status_code
    if status >= 500:
        return [f"{status}: {response.text[:300]}"]
    if 400 <= status < 500:
        try:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert isinstance(error["message"], str) and error["message"]
            assert isinstance(error["type"], str) and error["type"]
            assert error["param"] is None or isinstance(error["param"], str)
            assert error["code"] is None or isinstance(error["code"], str)
        except (ValueError, KeyError, TypeError, AssertionError):
            return [f"{status} not in OpenAI's error shape: {response.text[:300]}"]
        return []
    problems = []
    if mode is GenerationMode.POSITIVE:
        try:
            case.validate_response(response, checks=[status_code_conformance,
                                                     content_type_conformance,
                                                     response_schema_conformance])
        except (AssertionError, FailureGroup) as exc:
            problems.append(f"{status} does not conform to the schema: {str(exc)[:500]}")
    content_type = {k.lower(): v for k, v in response.headers.items()}.get("content-type", [""])
    if content_type[0].startswith("text/event-stream"):
        # schemathesis stops reading a long stream after max_stream_events: then only the
        # events read so far are checked.
        events = [e for e in response.text.split("\n\n") if e]
        ends = getattr(response, "stream_cut_short", False) or events[-1:] == ["data: [DONE]"]
        if not ends or any(e.startswith('data: {"error"') for e in events):
            problems.append(f"a broken stream: {response.text[-300:]}")
    return problems


def fuzz_operation(operation: Any, mode: GenerationMode, url: str,
                   statuses: Counter[str], failures: list[str]) -> int:
    """Run EXAMPLES cases of one operation in one mode; returns how many ran."""
    ran = 0

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                         derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck),
                         phases=[Phase.explicit, Phase.generate])
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal ran
        ran += 1
        response = case.call(base_url=url, timeout=CASE_TIMEOUT_S)
        statuses[str(response.status_code)] += 1
        for problem in problems_with(case, response, mode):
            body = json.dumps(case.body, default=repr)[:300] if case.body is not None else ""
            failures.append(f"{operation.label} [{mode.value}] {body} -> {problem}")

    # Unsatisfiable: nothing to vary (e.g. no negative form of a GET without parameters).
    with contextlib.suppress(hypothesis.errors.Unsatisfiable):
        run()
    return ran


def greedy_text(server: ServerProcess) -> str:
    with server.http() as http:
        response = http.post("/v1/completions", json=GREEDY)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_fuzz_every_operation(server: ServerProcess) -> None:
    before = greedy_text(server)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
            "POST /detokenize", "GET /v1/models/{model_id}", "GET /health"} <= labels
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    counts = {}
    for operation in operations:
        # Invalid requests need something to make invalid: a body or a path parameter.
        negatable = bool(list(operation.body)) or bool(operation.path_parameters)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:1 + negatable]:
            counts[f"{operation.label} [{mode.value}]"] = fuzz_operation(
                operation, mode, server.url, statuses, failures)
    total = sum(counts.values())
    print(f"\nfuzz: {total} cases over {len(operations)} operations "
          f"(up to {EXAMPLES} per operation and mode): {counts}; statuses "
          f"{dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:20])
    assert total >= len(operations)
    wait_until_idle(server, timeout_s=30.0)
    assert greedy_text(server) == before
    assert "Traceback" not in server.log()
