"""A tiny-model `xyserve serve` for the bench client's tests (the real CLI, a free port)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.server.harness import TINY_ENGINE_ARGS, ServerProcess, run_server


@pytest.fixture(scope="module")
def bench_server(tiny_llama_dir: pathlib.Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with run_server(str(tiny_llama_dir), tmp_path_factory.mktemp("bench-logs"),
                    *TINY_ENGINE_ARGS, served_name="tiny") as server:
        yield server
