"""benchmarks.load.stream: the load client's transport against small servers that answer as
real ones do, and as broken ones do."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable

import pytest

from benchmarks.load import stream
from benchmarks.load.stream import StreamEnd, post_stream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def answering(response: bytes, then_wait_s: float = 0.0) -> Handler:
    """A server that reads the request, writes `response`, waits `then_wait_s`, and closes."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(then_wait_s)
        writer.close()

    return handler


def exchange(handler: Handler, on_body: Callable[[bytes], bool] | None = None,
             timeout_s: float = 5.0, headers: dict[str, str] | None = None,
             tls: ssl.SSLContext | None = None) -> tuple[StreamEnd, list[bytes]]:
    """post_stream to a server running `handler` (over TLS with `tls`, the server's context);
    returns how it ended and the body's pieces."""
    pieces: list[bytes] = []

    def keep(piece: bytes) -> bool:
        pieces.append(piece)
        return on_body(piece) if on_body else False

    async def main() -> StreamEnd:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        try:
            return await post_stream(f"{'https' if tls else 'http'}://127.0.0.1:{port}"
                                     "/v1/completions",
                                     b'{"prompt": "x"}', headers or {}, keep, timeout_s)
        finally:
            server.close()

    return asyncio.run(main()), pieces


def test_a_chunked_stream_arrives_whole_and_the_request_is_as_sent() -> None:
    seen: list[tuple[bytes, bytes]] = []
    events = [b"data: " + json.dumps({"i": i}).encode() + b"\n\n" for i in range(5)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        body = chunked(*events)
        for i in range(0, len(body), 7):  # cut anywhere, chunk framing included
            writer.write(body[i:i + 7])
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    end, pieces = exchange(handler, headers={"Authorization": "Bearer k"})
    assert end == StreamEnd(200, "", "")
    assert b"".join(pieces) == b"".join(events)
    head, body = seen[0]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n") and body == b'{"prompt": "x"}'
    assert b"Authorization: Bearer k\r\n" in head and b"Connection: close\r\n" in head


def test_an_error_status_brings_its_body() -> None:
    body = b'{"error": {"message": "model not found"}}'
    end, pieces = exchange(answering(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
    assert (end.status, end.error) == (404, "") and "model not found" in end.error_body
    assert pieces == []


def test_a_stream_cut_short_is_an_error() -> None:
    end, pieces = exchange(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     + chunked(b"data: {}\n\n")[:-5]))  # no last chunk
    assert end.status == 200 and "closed the connection before the response ended" in end.error
    assert pieces == [b"data: {}\n\n"]


def test_a_body_that_ends_with_the_connection_is_whole() -> None:
    end, pieces = exchange(answering(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: [DONE]\n\n"))
    assert end == StreamEnd(200, "", "") and b"".join(pieces) == b"data: [DONE]\n\n"


def test_a_server_gone_quiet_times_out() -> None:
    end, _ = exchange(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                then_wait_s=3), timeout_s=0.5)
    assert end.error.startswith("TimeoutError")


def test_the_reader_may_stop_early() -> None:
    # the rest never comes: the reader has what it wants
    end, pieces = exchange(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     + b"%x\r\ndata: a\n\n\r\n" % len(b"data: a\n\n"),
                                     then_wait_s=3),
                           on_body=lambda piece: True, timeout_s=10)
    assert end == StreamEnd(200, "", "") and pieces == [b"data: a\n\n"]


def test_not_http_at_all_is_an_error() -> None:
    end, _ = exchange(answering(b"SSH-2.0-OpenSSH_9.6\r\n"))
    assert end.error


def test_no_server_and_no_url_raise() -> None:
    async def main(url: str) -> StreamEnd:
        return await post_stream(url, b"{}", {}, lambda piece: False, 5.0)

    with pytest.raises(OSError):
        asyncio.run(main("http://127.0.0.1:9/v1/completions"))  # discard: nothing listens
    with pytest.raises(ValueError, match="not an http"):
        asyncio.run(main("ftp://example/v1"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An https URL goes over TLS (here a self-signed certificate the test trusts)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    monkeypatch.setattr(stream, "_tls_context", lambda: ssl.create_default_context(cafile=cert))

    end, pieces = exchange(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     + chunked(b"data: [DONE]\n\n")), tls=server_tls)
    assert end == StreamEnd(200, "", "") and pieces == [b"data: [DONE]\n\n"]
