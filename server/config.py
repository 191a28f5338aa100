"""Server configuration: a frozen dataclass, validated when built, the one source of defaults.

`xyserve serve` reads its HTTP-side defaults from here (the engine's come from engine/config.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP front end listens, authenticates and sheds load."""

    host: str = "127.0.0.1"  # interface to bind; the loopback keeps the server private by default
    port: int = 8000  # TCP port to listen on
    api_key: str | None = None  # when set, all routes but /health and /metrics need
    #   `Authorization: Bearer <api_key>`; None = no authentication
    served_model_name: str | None = None  # the name clients send and see; None = the --model value
    max_waiting_requests: int = 256  # queued (not yet running) engine requests beyond which new
    #   requests are refused with 429; a call bringing more than this (prompts x n) is a 400
    max_choices_per_request: int = 1024  # prompts x n of one call at most (400 beyond): the
    #   engine requests one call may queue (vLLM caps prompts per call at 1024 by default,
    #   VLLM_MAX_COMPLETION_PROMPTS)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed by CORS; () = no CORS headers,
    #   ("*",) = any origin
    retry_after_s: int = 1  # seconds a 429 response tells the client to wait (Retry-After)
    log_level: str = "info"  # logging level of xyserve and uvicorn
    log_format: LogFormat = "text"  # text lines, or one JSON object a line (server.logs)
    log_stats_interval_s: float = 10.0  # wall seconds between stats lines while the engine
    #   works (throughput, queues, KV cache; vLLM's); 0 = none
    log_metrics_scrapes: bool = False  # keep GET /metrics in the access log
    max_request_bytes: int = 4 << 20  # request bodies larger than this get 413 (4 MiB: ~100x
    #   the longest prompt of the default model as text or token ids)
    shutdown_timeout_s: float = 30.0  # on SIGTERM / SIGINT, wall seconds in-flight requests get
    #   to finish (new ones get 503) before the rest are aborted and the server exits
    header_timeout_s: float = 10.0  # wall seconds from a connection's first byte (or its opening)
    #   to the end of the request's headers; then 408 and the connection is closed
    body_timeout_s: float = 60.0  # wall seconds from the end of the headers to the end of the
    #   body (a 4 MiB body at ~0.5 Mbit/s); then 408 and the connection is closed
    max_connections: int = 1024  # open HTTP connections at most; one more is answered 503 and
    #   closed at once (each holds a socket and a file descriptor)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        _require(bool(self.host), "host", self.host, "must not be empty")
        _require(0 <= self.port <= 65535, "port", self.port, "must be in [0, 65535]")
        # A key that is blank, or starts or ends with blanks, could never be sent: HTTP trims
        # a header value's surrounding whitespace. (The message does not echo it: a secret.)
        if self.api_key is not None and (not self.api_key.strip()
                                         or self.api_key != self.api_key.strip()):
            raise ValueError("api_key must not be empty, whitespace, or start or end with "
                             "whitespace")
        _require(self.served_model_name is None or bool(self.served_model_name),
                 "served_model_name", self.served_model_name, "must not be empty when set")
        _require(self.max_waiting_requests >= 1, "max_waiting_requests",
                 self.max_waiting_requests, "must be at least 1")
        _require(all(self.cors_origins), "cors_origins", self.cors_origins,
                 "must not contain empty origins")
        _require(self.retry_after_s >= 0, "retry_after_s", self.retry_after_s,
                 "must be non-negative")
        _require(self.log_level in LOG_LEVELS, "log_level", self.log_level,
                 f"must be one of {', '.join(LOG_LEVELS)}")
        _require(self.log_format in LOG_FORMATS, "log_format", self.log_format,
                 f"must be one of {', '.join(LOG_FORMATS)}")
        _require(self.log_stats_interval_s >= 0, "log_stats_interval_s",
                 self.log_stats_interval_s, "must be non-negative")
        _require(self.max_request_bytes >= 1, "max_request_bytes", self.max_request_bytes,
                 "must be at least 1")
        _require(self.shutdown_timeout_s >= 0, "shutdown_timeout_s", self.shutdown_timeout_s,
                 "must be non-negative")
        _require(self.max_choices_per_request >= 1, "max_choices_per_request",
                 self.max_choices_per_request, "must be at least 1")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, value, "must be positive")
        _require(self.max_connections >= 1, "max_connections", self.max_connections,
                 "must be at least 1")

    @property
    def url(self) -> str:
        """The base URL clients use (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{name} {why}, got {value!r}")
