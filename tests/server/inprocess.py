"""In-process servers for tests that reach into the engine: the real app over a real engine,
served by uvicorn on a free loopback port from a thread of the test process.

Tests use it where they must touch the engine from outside the HTTP API: inject a fault into a
step (monkeypatching the runner or the scheduler of this very engine, no hook in the product
code) or look at the per-request mailboxes while a client reads slowly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from tests.server.harness import free_port


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, timeout_s: float = 30.0,
                    send_buffer_bytes: int | None = None) -> Iterator[str]:
    """Serve `app` (its lifespan starts the engine) at the yielded base URL until exit.

    send_buffer_bytes: SO_SNDBUF of the listening socket, which accepted connections inherit
    (a small one turns off the kernel's buffer autotuning, so back-pressure reaches the app soon).
    """
    port = free_port()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
