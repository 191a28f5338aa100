"""500 and 503: apps built in-process over a real engine (tiny model) whose failures we control.

No fault hooks in the engine: a stub AsyncEngine subclass raises or reports an engine error for
marked prompts, and the 503 case stops the real engine thread.
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine, RequestStream
from engine.outputs import RequestOutput
from engine.request import FinishReason, SamplingParams
from server.app import build_app
from server.config import ServerConfig
from server.errors import INTERNAL_ERROR_MESSAGE
from tests.server.harness import MakeCore, assert_error

CRASH = "please crash"  # prompt that makes the stub engine raise
FAIL = "please fail"  # prompt that makes it report finish_reason "error" after one token


class ScriptedStream:
    """A request stream that yields fixed outputs (the engine reports an error after one)."""

    def __init__(self, outputs: list[RequestOutput]) -> None:
        self._outputs = iter(outputs)

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            return next(self._outputs)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        pass


class FaultyEngine(AsyncEngine):
    """A real AsyncEngine, except for the marked prompts."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    admission_checked: bool = False) -> RequestStream:
        text = self.info.tokenizer.decode(prompt_token_ids)
        if CRASH in text:
            raise RuntimeError("secret internal detail")
        if FAIL in text:
            n = len(prompt_token_ids)
            return ScriptedStream([  # type: ignore[return-value]
                RequestOutput(request_id, (42,), "x", None, None, n, 1),
                RequestOutput(request_id, (), "", None, FinishReason.ERROR, n, 1)])
        return super().add_request(request_id, prompt_token_ids, params, admission_checked)


def test_500_without_traceback_then_serves(make_core: MakeCore) -> None:
    app = build_app(FaultyEngine(make_core()), ServerConfig())
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.post("/v1/completions", json={"prompt": CRASH})
        error = assert_error(response, 500)
        assert error["message"] == INTERNAL_ERROR_MESSAGE
        assert "secret" not in response.text
        ok = http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_engine_error_finish_is_500_or_error_event(make_core: MakeCore) -> None:
    app = build_app(FaultyEngine(make_core()), ServerConfig())
    with TestClient(app) as http:
        assert_error(http.post("/v1/completions", json={"prompt": FAIL}), 500)
        with http.stream("POST", "/v1/completions", json={"prompt": FAIL, "stream": True}) as s:
            assert s.status_code == 200  # the stream had started: the error is an event
            events = [e for e in s.iter_text() if e]
        body = "".join(events)
        assert '"text":"x"' in body.replace(" ", "")
        assert 'data: {"error": {' in body and '"type": "server_error"' in body
        assert body.endswith("data: [DONE]\n\n")
        assert http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2}).is_success


def test_503_once_the_engine_is_dead(make_core: MakeCore) -> None:
    engine = AsyncEngine(make_core())
    app = build_app(engine, ServerConfig())
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        http.portal.call(engine.shutdown)  # type: ignore[union-attr]
        assert not engine.is_alive
        assert_error(http.get("/health"), 503)
        assert_error(http.post("/v1/completions", json={"prompt": "x"}), 503)
        assert_error(http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "stream": True}), 503)
