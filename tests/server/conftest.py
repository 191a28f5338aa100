"""Real servers for the server tests: `xyserve serve` subprocesses on free loopback ports.

Each fixture starts the real CLI (the console script of this venv), waits for /health and stops
the process at the end of the session. The tiny random-weight model keeps them fast (~2 s to
start, ~2 ms a token); `default_server` runs the default model for the slow equivalence tests.
Clients are the real OpenAI SDK, httpx and curl.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import openai
import pytest

from engine.config import EngineConfig
from engine.core import EngineCore
from tests.server.harness import (
    API_KEY,
    TINY_ENGINE_ARGS,
    TINY_NAME,
    MakeCore,
    ServerProcess,
    run_server,
)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    """The main test server: tiny model, no API key, default queue limit."""
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS,
                    served_name=TINY_NAME) as server:
        yield server


@pytest.fixture(scope="session")
def auth_server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    """Tiny model behind --api-key."""
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS, served_name=TINY_NAME,
                    api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="session")
def small_queue_server(tiny_llama_dir: pathlib.Path,
                       server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    """Tiny model, one request running and one waiting at most: the third concurrent one is 429."""
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS,
                    "--max-num-seqs", "1", "--max-waiting-requests", "1",
                    served_name=TINY_NAME) as server:
        yield server


@pytest.fixture(scope="session")
def default_server(default_model_dir: pathlib.Path,
                   server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    """The default model (tests using it are marked slow). A small KV pool starts faster."""
    with run_server("smollm2-135m-instruct", server_logs, "--num-kv-blocks", "16") as server:
        yield server


@pytest.fixture
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return tiny_server.client()


@pytest.fixture
def make_core(tiny_llama_dir: pathlib.Path) -> MakeCore:
    """For in-process apps (build_app + TestClient): a fresh tiny-model EngineCore per call."""
    def build() -> EngineCore:
        return EngineCore.load(EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_kv_blocks=64,
                                                        block_size=16))
    return build
