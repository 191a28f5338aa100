"""Logging of `xyserve serve`: one format for xyserve's and uvicorn's lines, text or JSON, each
line of an HTTP request carrying its id; uvicorn's access lines without /metrics scrapes (by
default); and vLLM's periodic stats line while the engine is busy.

    2026-12-02 23:10:01,123 INFO uvicorn.access [request_id=3f2a...]: 127.0.0.1:50412 - "POST
        /v1/chat/completions HTTP/1.1" 200
    {"time": "2026-12-02T23:10:01.123", "level": "INFO", "logger": "uvicorn.access",
     "message": "...", "request_id": "3f2a...", "method": "POST", "path": "/v1/...", "status": 200}
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any

from engine.stats import IterationStats, SchedulerStats
from server.config import LogFormat
from server.observe import current_request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
LOGGERS = ("xyserve", "uvicorn", "uvicorn.error", "uvicorn.access")

logger = logging.getLogger("xyserve")


class RequestIdFilter(logging.Filter):
    """Puts the current HTTP request's id on every record (`request_id`, and `request_tag` for
    the text format); drops uvicorn's access lines of /metrics unless asked to keep them."""

    def __init__(self, log_metrics_scrapes: bool = False) -> None:
        super().__init__()
        self.log_metrics_scrapes = log_metrics_scrapes

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.log_metrics_scrapes and _access_path(record) == "/metrics":
            return False
        request_id = current_request_id()
        record.request_id = request_id
        record.request_tag = f" [request_id={request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line; uvicorn's access lines also as fields (method, path, status)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if _access_path(record) is not None:
            client, method, path, _, status = record.args  # type: ignore[misc]
            line.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _access_path(record: logging.LogRecord) -> str | None:
    """The path of a uvicorn access line (its args: client, method, path, http version, status),
    without the query; None for other records."""
    args = record.args
    if record.name != "uvicorn.access" or not isinstance(args, tuple) or len(args) != 5:
        return None
    return str(args[2]).split("?", 1)[0]


def configure(level: str, log_format: LogFormat, log_metrics_scrapes: bool = False,
              ) -> dict[str, Any]:
    """Set up xyserve's and uvicorn's loggers; returns the dictConfig for uvicorn.Config's
    `log_config` (so that uvicorn keeps this set-up rather than installing its own)."""
    formatter: dict[str, Any] = ({"()": JsonFormatter} if log_format == "json"
                                 else {"format": TEXT_FORMAT})
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter,
                                   "log_metrics_scrapes": log_metrics_scrapes}},
        "formatters": {"xyserve": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "xyserve",
                                "filters": ["request_id"], "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                    for name in LOGGERS},
        "root": {"handlers": ["stderr"], "level": level.upper()},  # other libraries' lines
    }
    logging.config.dictConfig(config)
    return config


class StatsLogLine:
    """vLLM's periodic stats line, every `interval_s` while the engine works: throughput over
    the window, queues, KV-cache usage, prefix-cache hit rate. A stat logger of the AsyncEngine
    (called after each step, on the thread that hears the engine loop); an idle engine writes
    nothing."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._window_start_s: float | None = None  # start of the first step since the last line
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._prefix = (0, 0)  # cumulative prefix-cache (queries, hits) at the last line

    def __call__(self, scheduler_stats: SchedulerStats, stats: IterationStats) -> None:
        now_s = time.monotonic()
        if stats.num_scheduled_tokens == 0 and self._window_start_s is None:
            return  # idle (an abort between steps): nothing to report
        if self._window_start_s is None:
            self._window_start_s = now_s - stats.step_s
        self._prompt_tokens += stats.num_prompt_tokens
        self._generation_tokens += stats.num_generation_tokens
        elapsed_s = now_s - self._window_start_s
        if elapsed_s < self.interval_s:
            return
        s = scheduler_stats
        queries = s.prefix_cache_queries - self._prefix[0]
        hits = s.prefix_cache_hits - self._prefix[1]
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                    "tokens/s, Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                    "Prefix cache hit rate: %.1f%%", self._prompt_tokens / elapsed_s,
                    self._generation_tokens / elapsed_s, s.num_running_reqs, s.num_waiting_reqs,
                    100 * s.kv_cache_usage, 100 * hits / queries if queries else 0.0)
        self._prefix = (s.prefix_cache_queries, s.prefix_cache_hits)
        self._window_start_s = None if not (s.num_running_reqs or s.num_waiting_reqs) else now_s
        self._prompt_tokens = self._generation_tokens = 0
