"""Test harness: run the real `xyserve serve` CLI as a subprocess on a free loopback port, and
check OpenAI-shaped errors. Fixtures (conftest.py) use `run_server`; tests use the helpers."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from engine.core import EngineCore

MakeCore = Callable[[], EngineCore]  # builds a fresh engine core of the tiny model

TINY_NAME = "tiny"  # --served-model-name of the tiny-model servers
API_KEY = "test-secret-key"
STARTUP_TIMEOUT_S = 120.0
# Small pool, small blocks: 256 x 16 = 4096 tokens of KV, plenty for the 512-token tiny model.
TINY_ENGINE_ARGS = ["--num-kv-blocks", "256", "--block-size", "16", "--max-model-len", "512"]


@dataclass
class ServerProcess:
    """A running `xyserve serve`."""

    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path  # its stdout + stderr
    model: str  # the served model name
    api_key: str | None = None

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """An OpenAI SDK client of this server (no retries: tests see every status)."""
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        kwargs.setdefault("timeout", 60.0)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one series of /metrics (0.0 when absent)."""
        return metric_value(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def xyserve_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m server`."""
    script = pathlib.Path(sys.executable).with_name("xyserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "server"]


@contextlib.contextmanager
def run_server(model: str, log_dir: pathlib.Path, *extra: str, served_name: str | None = None,
               api_key: str | None = None) -> Iterator[ServerProcess]:
    """Start `xyserve serve --model <model> ...`, wait until /health answers 200, stop it after."""
    port = free_port()
    args = [*xyserve_command(), "serve", "--model", model, "--port", str(port), *extra]
    if served_name:
        args += ["--served-model-name", served_name]
    if api_key:
        args += ["--api-key", api_key]
    log_path = log_dir / f"xyserve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path,
                           served_name or model, api_key)
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully (lifespan runs)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"xyserve exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"xyserve did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """Assert an OpenAI-shaped error response; returns its `error` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_serves(server: ServerProcess) -> None:
    """The server still answers a normal request."""
    with server.http() as http:
        response = http.post("/v1/completions",
                             json={"prompt": "Hello", "max_tokens": 2, "model": server.model})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
