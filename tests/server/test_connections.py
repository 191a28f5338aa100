"""Slow and malformed clients: a request must arrive within --header-timeout / --body-timeout or
its connection is closed (408 where a response is still possible), and --max-connections bounds
the open connections (one more gets 503 at once). Clients are raw sockets where they must
misbehave, httpx where they behave.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from server.connections import MAX_HEAD_BYTES
from tests.server.harness import (
    TINY_ENGINE_ARGS,
    TINY_NAME,
    ServerProcess,
    assert_serves,
    free_port,
    run_server,
    xyserve_command,
)

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 8
SLACK_S = 3.0  # scheduling slack on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS,
                    "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout",
                    str(BODY_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS),
                    served_name=TINY_NAME) as server:
        yield server
        assert "Traceback" not in server.log()


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(HEADER_TIMEOUT_S + BODY_TIMEOUT_S + SLACK_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never
    does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_headers_sent_a_byte_at_a_time_get_408(server: ServerProcess) -> None:
    sock = connect(server)
    start = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        for byte in b"X-Slow: " + b"a" * 100:  # a header byte every 0.25 s: never ends in time
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
            if time.monotonic() - start > HEADER_TIMEOUT_S + SLACK_S:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still writing: as it should
    response = read_until_closed(sock)
    elapsed = time.monotonic() - start
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert b'"code": "request_timeout"' in response and b"header_timeout_s" in response
    assert HEADER_TIMEOUT_S - 0.5 <= elapsed < HEADER_TIMEOUT_S + SLACK_S
    sock.close()


@pytest.mark.parametrize("body_head", [
    # chunked, the final (empty) chunk never comes
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    # a Content-Length larger than what is sent
    b"Content-Length: 100\r\nContent-Type: application/json\r\n\r\n" + b'{"prompt": "x"',
])
def test_a_body_that_never_ends_gets_408(server: ServerProcess, body_head: bytes) -> None:
    sock = connect(server)
    start = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + body_head)
    response = read_until_closed(sock)
    elapsed = time.monotonic() - start
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert b"body_timeout_s" in response
    assert BODY_TIMEOUT_S - 0.5 <= elapsed < BODY_TIMEOUT_S + SLACK_S
    sock.close()
    assert_serves(server)


def test_a_silent_connection_is_closed(server: ServerProcess) -> None:
    sock = connect(server)
    start = time.monotonic()
    assert read_until_closed(sock) == b""  # nothing was asked: closed without a response
    assert time.monotonic() - start < HEADER_TIMEOUT_S + SLACK_S
    sock.close()


def test_forty_slow_clients_are_all_closed_and_others_still_served(
        server: ServerProcess) -> None:
    """40 slowloris connections: those over --max-connections are refused at once, the rest
    are closed at the header deadline; meanwhile (and after) the server serves."""
    async def slow_client() -> bytes:
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        received = b""

        async def read() -> None:
            nonlocal received
            while chunk := await reader.read(65536):
                received += chunk

        reading = asyncio.create_task(read())
        try:
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            for _ in range(40):  # a byte every 0.2 s, for up to 8 s
                if reading.done():
                    break
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.2)
            await asyncio.wait_for(reading, HEADER_TIMEOUT_S + SLACK_S)
        finally:
            writer.close()
        return received

    async def main() -> list[bytes]:
        return await asyncio.gather(*(slow_client() for _ in range(40)))

    start = time.monotonic()
    responses = asyncio.run(main())
    assert time.monotonic() - start < HEADER_TIMEOUT_S + 2 * SLACK_S
    statuses = sorted(r[:12] for r in responses)
    assert statuses.count(b"HTTP/1.1 503") >= 40 - MAX_CONNECTIONS, statuses
    assert set(statuses) <= {b"HTTP/1.1 503", b"HTTP/1.1 408"}, statuses
    assert_serves(server)


def test_connections_beyond_the_limit_get_503_at_once(server: ServerProcess) -> None:
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them all
        start = time.monotonic()
        response = httpx.get(f"{server.url}/v1/models", timeout=10)
        assert time.monotonic() - start < 1.0
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert_serves(server)


def test_slow_but_timely_clients_and_kept_alive_connections_are_served(
        server: ServerProcess) -> None:
    sock = connect(server)
    body = b'{"prompt": "Hello", "max_tokens": 2}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for i in range(0, len(request), 40):  # in pieces, well within the deadlines
        sock.sendall(request[i:i + 40])
        time.sleep(0.1)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    sock.close()
    # The next request on a kept-alive connection has its own clock, from its first byte: an
    # idle gap longer than the header deadline (shorter than uvicorn's keep-alive) is fine.
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/v1/models").status_code == 200
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        assert http.get("/v1/models").status_code == 200
        assert http.get("/v1/models").status_code == 200


@pytest.mark.parametrize("where", ["target", "headers", "kept-alive"])
def test_a_head_over_the_limit_gets_431_and_the_app_never_sees_it(server: ServerProcess,
                                                                    where: str) -> None:
    """A request line and headers past MAX_HEAD_BYTES: 431 and the connection closed, the
    request not served (the head is sent in one write, so the whole of it arrives at once)."""
    body = b'{"prompt": "Hello", "max_tokens": 2}'
    big = b"a" * (MAX_HEAD_BYTES + 1)
    target = b"/v1/completions?pad=" + big if where == "target" else b"/v1/completions"
    extra = b"X-Big: " + big + b"\r\n" if where != "target" else b""
    request = (b"POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (target, extra, len(body), body))
    sock = connect(server)
    if where == "kept-alive":  # a first request is served; the second, too large, is refused
        small = request.replace(extra, b"")
        sock.sendall(small)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(request)  # (refused while we were still writing)
    response = read_until_closed(sock)
    if where == "kept-alive":  # (what is left of the first response may come first)
        response = response[response.find(b"HTTP/1.1 431 "):]
    assert response.startswith(b"HTTP/1.1 431 "), response[:200]
    assert b'"code": "request_header_fields_too_large"' in response
    assert b'"choices"' not in response  # the completion never ran
    sock.close()
    assert_serves(server)


def test_a_header_that_never_ends_is_refused_once_over_the_limit(server: ServerProcess) -> None:
    """The parser holds a header until its end: one sent fast and never ended is refused as
    soon as the bytes awaiting a head pass the limit, long before the header deadline."""
    sock = connect(server)
    start = time.monotonic()
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(2 * MAX_HEAD_BYTES // 1024):
            sock.sendall(b"a" * 1024)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused while we were still writing
    response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 431 "), response[:200]
    assert time.monotonic() - start < HEADER_TIMEOUT_S
    sock.close()
    assert_serves(server)


def test_a_small_head_with_a_large_body_in_one_write_is_served(server: ServerProcess) -> None:
    """The bytes awaiting a head count only while it is incomplete: a body that comes in the
    same write as its head is not taken for one."""
    body = b'{"prompt": "Hello", "max_tokens": 2}' + b" " * (2 * MAX_HEAD_BYTES)
    sock = connect(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_a_head_at_the_limit_is_served(server: ServerProcess) -> None:
    pad = "a" * (MAX_HEAD_BYTES - 4096)  # the rest of the head well within the remaining 4 KiB
    response = httpx.post(f"{server.url}/v1/completions", headers={"X-Pad": pad}, timeout=30,
                          json={"model": TINY_NAME, "prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["choices"]


def test_a_second_server_on_a_taken_port_fails_before_loading_the_model(
        tiny_llama_dir: pathlib.Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        start = time.monotonic()
        result = subprocess.run([*xyserve_command(), "serve", "--model", str(tiny_llama_dir),
                                 "--port", str(port), *TINY_ENGINE_ARGS],
                                capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on http://127.0.0.1:{port}" in result.stderr
    assert "engine ready" not in result.stderr  # failed before the model was loaded
    assert "Traceback" not in result.stderr
    assert elapsed < 30.0
