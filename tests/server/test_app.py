"""The app and the CLI without a server process: CORS, defaults, config validation."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from server.app import build_app
from server.cli import build_parser, main
from server.config import ServerConfig
from tests.server.harness import MakeCore


def test_cli_defaults_come_from_the_config_dataclasses() -> None:
    args = build_parser().parse_args(["serve"])
    server, engine = ServerConfig(), EngineConfig()
    assert (args.host, args.port, args.api_key, args.served_model_name) == (
        server.host, server.port, server.api_key, server.served_model_name)
    assert args.max_waiting_requests == server.max_waiting_requests
    assert args.log_level == server.log_level and args.cors_origins == ""
    assert (args.model, args.dtype, args.seed) == (engine.model, engine.dtype, engine.seed)
    assert args.block_size == CacheConfig().block_size
    assert args.num_kv_blocks == CacheConfig().num_kv_blocks
    scheduler = SchedulerConfig()
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len) == (
        scheduler.max_num_seqs, scheduler.max_num_batched_tokens, scheduler.max_model_len)


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--max-num-seqs", "0"],
                                  ["--max-waiting-requests", "0"], ["--block-size", "10"]])
def test_cli_rejects_bad_values_before_loading(argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_server_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_waiting_requests"):
        ServerConfig(max_waiting_requests=0)
    with pytest.raises(ValueError, match="log_level"):
        ServerConfig(log_level="loud")
    assert ServerConfig(host="::1", port=9).url == "http://[::1]:9"


def test_cors_only_when_origins_are_configured(make_core: MakeCore) -> None:
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    with_cors = build_app(AsyncEngine(make_core()),
                          ServerConfig(cors_origins=("http://ui.example",)))
    with TestClient(with_cors) as http:
        response = http.options("/v1/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://ui.example"
    without = build_app(AsyncEngine(make_core()), ServerConfig())
    with TestClient(without) as http:
        response = http.get("/health", headers={"Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in response.headers


def test_openapi_schema_documents_the_routes(make_core: MakeCore) -> None:
    app = build_app(AsyncEngine(make_core()), ServerConfig())
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                 "/version", "/tokenize", "/detokenize", "/metrics"):
        assert path in paths
