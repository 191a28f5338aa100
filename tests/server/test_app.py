"""The app and the CLI without a server process: CORS, defaults, config validation."""

from __future__ import annotations

import gc

import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from server.app import build_app
from server.cli import build_configs, build_parser, main
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


def test_cli_speculative_defaults_and_options_build_the_config() -> None:
    _, engine = build_configs(build_parser().parse_args(["serve"]))
    assert engine.speculative_config == SpeculativeConfig()  # off, defaults from the dataclass
    assert not engine.speculative_config.enabled
    argv = ["serve", "--speculative", "tree", "--num-speculative-tokens", "6", "--ngram-min", "2",
            "--ngram-max", "3", "--num-speculative-branches", "2", "--spec-token-cost", "0.1"]
    _, engine = build_configs(build_parser().parse_args(argv))
    assert engine.speculative_config == SpeculativeConfig(
        speculative="tree", num_speculative_tokens=6, ngram_min=2, ngram_max=3,
        num_speculative_branches=2, spec_token_cost=0.1)
    argv = ["serve", "--speculative", "draft-model", "--draft-model", "/models/draft"]
    _, engine = build_configs(build_parser().parse_args(argv))
    assert engine.speculative_config == SpeculativeConfig(speculative="draft-model",
                                                          draft_model="/models/draft")


@pytest.mark.parametrize(("argv", "message"), [
    (["--draft-model", "d"], "--draft-model needs --speculative draft-model"),
    (["--speculative", "ngram", "--draft-model", "d"],
     "--draft-model applies only with --speculative draft-model, not ngram"),
    (["--speculative", "draft-model"], "--speculative draft-model needs --draft-model PATH"),
    (["--num-speculative-tokens", "8"], "--num-speculative-tokens needs --speculative"),
    (["--speculative", "ngram", "--num-speculative-branches", "5"],
     "--num-speculative-branches applies only with --speculative tree, not ngram"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
    (["--speculative", "tree", "--ngram-min", "5", "--ngram-max", "2"], "ngram_min"),
    (["--speculative", "ngram", "--spec-token-cost", "-1"], "spec_token_cost"),
])
def test_cli_rejects_bad_speculative_options(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *argv]) == 2  # before loading anything, as other config errors
    err = capsys.readouterr().err
    assert err.startswith("xyserve serve: error: ") and message in err
    assert err.count("\n") == 1  # one line


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


def test_startup_objects_are_frozen_out_of_the_cyclic_gc(make_core: MakeCore) -> None:
    gc.unfreeze()
    with TestClient(build_app(AsyncEngine(make_core()), ServerConfig())):
        assert gc.get_freeze_count() > 0  # (a full collection would otherwise walk them all)
    gc.unfreeze()
