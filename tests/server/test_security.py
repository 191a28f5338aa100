"""Security: with --api-key, every route but /health and /metrics needs the key (each route of the
server's own OpenAPI schema is tried, and the docs, and a streaming request); the key never
appears in the server log or in a response; CORS is off unless --cors-origins is given; the
server binds the loopback interface unless told otherwise.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from server.app import build_app
from server.cli import build_parser
from server.config import ServerConfig
from tests.server.harness import (
    API_KEY,
    TINY_ENGINE_ARGS,
    TINY_NAME,
    MakeCore,
    ServerProcess,
    assert_error,
    run_server,
)

OPEN_PATHS = {"/health", "/metrics"}
# A request that works (with the key) for each operation of the schema.
BODIES: dict[str, Any] = {
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: pathlib.Path, server_logs: pathlib.Path) -> Iterator[ServerProcess]:
    """Behind --api-key, logging everything (debug), where a leaked key would show."""
    with run_server(str(tiny_llama_dir), server_logs, *TINY_ENGINE_ARGS, "--log-level", "debug",
                    served_name=TINY_NAME, api_key=API_KEY) as server:
        yield server


def operations(server: ServerProcess) -> list[tuple[str, str]]:
    schema = httpx.get(f"{server.url}/openapi.json",
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    return [(method.upper(), path) for path, item in schema["paths"].items() for method in item]


def send(server: ServerProcess, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    url = server.url + path.replace("{model_id}", TINY_NAME)
    return httpx.request(method, url, json=BODIES.get(path), headers=headers, timeout=30)


def test_every_route_but_health_and_metrics_needs_the_key(server: ServerProcess) -> None:
    ops = operations(server)
    assert {path for _, path in ops} >= {*BODIES, "/v1/models", "/v1/models/{model_id}",
                                         "/version", *OPEN_PATHS}
    for method, path in ops:
        if path in OPEN_PATHS:
            assert send(server, method, path, None).status_code == 200, path
            continue
        for key in (None, "wrong-key", API_KEY + "x", API_KEY[:-1], "x"):
            response = send(server, method, path, key)
            error = assert_error(response, 401)
            assert error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        assert send(server, method, path, API_KEY).status_code == 200, (method, path)
    # Outside the schema: the schema and docs themselves, and paths that do not exist.
    for path in ("/openapi.json", "/docs", "/redoc", "/no/such/route", "/v1"):
        assert_error(httpx.get(server.url + path), 401)
    assert httpx.get(f"{server.url}/openapi.json",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    # Other schemes, or the key where it does not belong, do not count.
    for headers in ({"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY},
                    {"X-API-Key": API_KEY}, {"Cookie": f"api_key={API_KEY}"}):
        assert_error(httpx.get(f"{server.url}/v1/models", headers=headers), 401)
    assert_error(httpx.get(f"{server.url}/v1/models", params={"api_key": API_KEY}), 401)


def test_streaming_needs_the_key(server: ServerProcess) -> None:
    body = {**BODIES["/v1/chat/completions"], "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 401
        assert not response.headers["content-type"].startswith("text/event-stream")
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]


def test_the_key_is_never_logged_or_echoed(server: ServerProcess) -> None:
    seen: list[str] = []
    for key in (API_KEY, API_KEY + "x", "x" + API_KEY):  # right, and near misses
        for path in ("/v1/models", "/v1/completions", "/no/such/route"):
            headers = {"Authorization": f"Bearer {key}"}
            seen.append(httpx.post(server.url + path, json={"prompt": key, "max_tokens": 1},
                                   headers=headers).text)
            seen.append(httpx.get(server.url + path, headers=headers).text)
    assert not any(API_KEY in text for text in seen), seen
    log = server.log()
    assert "DEBUG" in log or "debug" in log  # the log is as chatty as it gets
    assert API_KEY not in log
    # The key given on the command line is not printed either (argument echo, config dumps).
    assert "test-secret" not in log


def test_cors_is_off_by_default(server: ServerProcess) -> None:
    headers = {"Origin": "https://evil.example", "Authorization": f"Bearer {API_KEY}"}
    response = httpx.get(f"{server.url}/v1/models", headers=headers)
    assert response.status_code == 200
    assert not any(h.startswith("access-control-") for h in response.headers)
    preflight = httpx.options(f"{server.url}/v1/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_when_configured(make_core: MakeCore) -> None:
    origin = "https://app.example"
    config = ServerConfig(cors_origins=(origin,), api_key=API_KEY)
    with TestClient(build_app(AsyncEngine(make_core()), config)) as http:
        # A browser's preflight carries no key: CORS answers it before authentication.
        preflight = http.options("/v1/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        # The request itself still needs the key; the browser may read the 401.
        refused = http.get("/v1/models", headers={"Origin": origin})
        assert_error(refused, 401)
        assert refused.headers["access-control-allow-origin"] == origin
        allowed = http.get("/v1/models", headers={"Origin": origin,
                                                   "Authorization": f"Bearer {API_KEY}"})
        assert allowed.status_code == 200
        other = http.get("/v1/models", headers={"Origin": "https://evil.example",
                                                 "Authorization": f"Bearer {API_KEY}"})
        assert "access-control-allow-origin" not in other.headers


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    found = set()
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(address)
    return found


def test_binds_loopback_by_default(server: ServerProcess) -> None:
    assert ServerConfig().host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    port = int(server.url.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only, not 0.0.0.0
