"""Every PromQL expression of the Grafana dashboard returns data from a real Prometheus.

A real `xyserve serve` (tiny model, n-gram speculative decoding on, so the speculative-decoding
panels have data too) and a real Prometheus run on loopback; Prometheus scrapes xyserve every
second with a config derived from docker/prometheus.yml. After a known load, each
expression in docker/grafana/dashboards/xyserve.json (Grafana's variables substituted) is
evaluated through Prometheus' HTTP API and must return at least one finite value, so a panel
with a misspelt metric, label or function fails here.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from tests.server.harness import ServerProcess, free_port, run_server

REPO = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "xyserve.json"
PROMETHEUS_YML = REPO / "docker" / "prometheus.yml"
NAME = "tiny-prom"  # the served model name, and so the model_name label
# Grafana's built-in variables. $__rate_interval spans the whole test (it is well under a
# minute), so rates and quantiles cover all of the load whenever they are evaluated.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1s", "__range": "1m",
                    "__range_s": "60", "__range_ms": "60000"}
STOP_TOKEN = 1234  # forced by logit_bias and listed in stop_token_ids: finishes with "stop"
REPEAT_TOKEN = 4321  # forced by logit_bias without a stop: the output repeats it, so n-gram
#   drafts (which look up the text's own suffix) are proposed and accepted
TIMEOUT_S = 20.0
PROCESS_ON_DASHBOARD = ("process_cpu_seconds_total", "process_resident_memory_bytes",
                        "process_open_fds", "xyserve:engine_process_cpu_seconds_total",
                        "xyserve:engine_process_resident_memory_bytes")


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = response.json()
        return body

    def series(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """The (labels, value) an instant query returns; raises ValueError on a PromQL error."""
        body = self.query(expr)
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(sample["metric"], float(sample["value"][1])) for sample in data["result"]]

    def values(self, expr: str) -> list[float]:
        return [value for _, value in self.series(expr)]

    def wait_for(self, expr: str, want: float) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        got: list[float] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(ValueError, httpx.TransportError):
                got = self.values(expr)
                if got == [want]:
                    return
            time.sleep(0.2)
        pytest.fail(f"Prometheus: {expr} is {got}, not [{want}] after {TIMEOUT_S} s\n"
                    f"{self.log_path.read_text(errors='replace')}")


def scrape_config(xyserve_port: int) -> dict[str, Any]:
    """docker/prometheus.yml with the xyserve target on loopback, scraped every second."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "xyserve"]
    assert jobs, "docker/prometheus.yml has no `xyserve` scrape job"
    for job in jobs:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        assert job["static_configs"], job
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{xyserve_port}"]
    config["scrape_configs"] = jobs  # nothing else (the compose file's hosts do not exist here)
    return config


@contextlib.contextmanager
def run_prometheus(binary: str, config: dict[str, Any],
                   workdir: pathlib.Path) -> Iterator[Prometheus]:
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    promtool = shutil.which("promtool", path=str(pathlib.Path(binary).parent))
    if promtool is not None:
        check = subprocess.run([promtool, "check", "config", str(config_path)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n"
                            f"{log_path.read_text(errors='replace')}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {TIMEOUT_S} s")
            time.sleep(0.1)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------ the dashboard

@dataclass(frozen=True)
class Query:
    where: str  # panel title and refId
    expr: str  # PromQL with Grafana variables
    legend_labels: tuple[str, ...]  # labels its legend shows ({{label}}): each series has them


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL target, in panels and rows at any depth."""
    found: list[Query] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            where = node.get("title", where) if node.get("type") != "row" else where
            expr = node.get("expr")
            if isinstance(expr, str):
                legend = re.findall(r"\{\{\s*(\w+)\s*\}\}", node.get("legendFormat", ""))
                found.append(Query(f"{where} [{node.get('refId', '?')}]", expr, tuple(legend)))
            for key, value in node.items():
                if key != "templating":
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(dashboard.get("panels", []), "dashboard")
    return found


def template_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, metric selector, label) of each `label_values(metric, label)` variable."""
    found = []
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", text or "")
        assert match, f"variable {variable['name']}: unsupported query {text!r}"
        found.append((variable["name"], match.group(1), match.group(2)))
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}, ${name:format}, [[name]]); an unknown one is
    left as is (Prometheus then rejects the query)."""
    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return values.get(name, match.group(0))
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def check(prometheus: Prometheus, expr: str, legend_labels: tuple[str, ...] = ()) -> str | None:
    """Why `expr` shows nothing useful in a panel (an error, no series, no finite value, a
    series without a label its legend names); None if it is fine."""
    try:
        series = prometheus.series(expr)
    except ValueError as exc:
        return str(exc)
    if not series:
        return "no data"
    if not any(math.isfinite(value) for _, value in series):
        return f"no finite value: {series}"
    unlabelled = [labels for labels, _ in series if not set(legend_labels) <= labels.keys()]
    if unlabelled:
        return f"series without the legend's labels {legend_labels}: {unlabelled}"
    return None


# ------------------------------------------------------------------------------ the load

def send_load(server: ServerProcess) -> int:
    """Requests of every kind, concurrently; returns the number of engine requests sent."""
    body = {"model": NAME, "ignore_eos": True}
    calls: list[tuple[str, dict[str, Any], int]] = [  # (path, body, engine requests)
        *[("/v1/completions", {**body, "prompt": f"Load {i}", "max_tokens": 12, "n": 2}, 2)
          for i in range(6)],
        *[("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"Hi {i}"}],
                                    "max_tokens": 10, "stream": True}, 1) for i in range(3)],
        ("/v1/completions", {"model": NAME, "prompt": "Stop", "max_tokens": 5,
                             "logit_bias": {str(STOP_TOKEN): 100},
                             "stop_token_ids": [STOP_TOKEN]}, 1),
        # Speculative decoding: a prompt that repeats itself (greedy), and an output that does.
        ("/v1/completions", {**body, "prompt": " ".join(["one two three four"] * 8),
                             "max_tokens": 24, "temperature": 0}, 1),
        ("/v1/completions", {**body, "prompt": "Again and again", "max_tokens": 24,
                             "logit_bias": {str(REPEAT_TOKEN): 100}}, 1),
        # Structured outputs: one grammar compiled, then found cached.
        *[("/v1/chat/completions", {"model": NAME, "max_tokens": 8,
                                    "messages": [{"role": "user", "content": "JSON"}],
                                    "response_format": {"type": "json_object"}}, 1)
          for _ in range(2)],
    ]

    def call(path: str, json_body: dict[str, Any]) -> None:
        response = httpx.post(f"{server.url}{path}", json=json_body, timeout=60)
        assert response.status_code == 200, response.text

    def dropped() -> None:  # a client that gives up: its request is aborted
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", timeout=0.2,
                       json={**body, "prompt": "Long", "max_tokens": 400})

    def refused() -> None:  # HTTP errors for the errors panel: 400 and 404
        assert httpx.post(f"{server.url}/v1/completions", timeout=10,
                          json={**body, "prompt": "x", "temperature": -1}).status_code == 400
        assert httpx.get(f"{server.url}/v1/no-such-route", timeout=10).status_code == 404

    with ThreadPoolExecutor(max_workers=len(calls) + 2) as pool:
        futures = [pool.submit(call, path, json_body) for path, json_body, _ in calls]
        futures.append(pool.submit(dropped))
        futures.append(pool.submit(refused))
        for future in futures:
            future.result()
    return sum(n for _, _, n in calls) + 1


# ------------------------------------------------------------------------------ the test

@pytest.fixture(scope="module")
def stack(prometheus_binary: str, tiny_llama_dir: pathlib.Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Prometheus]]:
    workdir = tmp_path_factory.mktemp("prometheus")
    with run_server(str(tiny_llama_dir), workdir, "--num-kv-blocks", "256", "--block-size", "16",
                    "--max-model-len", "512", "--speculative", "ngram",
                    served_name=NAME) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with run_prometheus(prometheus_binary, scrape_config(port), workdir) as prometheus:
            yield server, prometheus


def test_every_dashboard_query_returns_data(stack: tuple[ServerProcess, Prometheus]) -> None:
    server, prometheus = stack
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 20, queries
    prometheus.wait_for('up{job="xyserve"}', 1.0)  # scraped once before the load
    num_requests = send_load(server)
    # Scraped after the last request finished.
    prometheus.wait_for(f'sum(xyserve:request_success_total{{model_name="{NAME}"}})',
                        float(num_requests))
    # The repeating requests had drafts verified and accepted (the speculative panels' data).
    for counter in ("spec_decode_num_drafts_total", "spec_decode_num_accepted_tokens_total"):
        expr = f'xyserve:{counter}{{model_name="{NAME}"}}'
        assert prometheus.values(expr) and prometheus.values(expr)[0] > 0, counter

    values = dict(GRAFANA_BUILTINS)
    for variable, selector, label in template_queries(dashboard):
        assert check(prometheus, f"count by ({label}) ({selector})") is None, variable
        values[variable] = NAME  # (no regex metacharacters in it)
    failures = []
    for query in queries:
        promql = substitute(query.expr, values)
        why = check(prometheus, promql, query.legend_labels)
        if why is not None:
            failures.append(f"{query.where}: {promql}\n    -> {why}")
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures)

    # The check catches a typo: a misspelt metric has no data.
    query = next(q for q in queries if "xyserve:generation_tokens_total" in q.expr)
    typo = query.expr.replace("generation_tokens_total", "generaton_tokens_total")
    assert check(prometheus, substitute(typo, values)) == "no data", query.where
    # Every family xyserve exports is on the dashboard (of the standard process_* series, the
    # CPU, memory and file-descriptor ones; of the engine process's, CPU and memory).
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    families = [f for f in re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE)
                if not f.startswith(("process_", "xyserve:engine_process_"))
                or f in PROCESS_ON_DASHBOARD]
    all_exprs = "\n".join(query.expr for query in queries)
    missing = [f for f in families if not re.search(re.escape(f) + r"(?![\w:])|"
                                                    + re.escape(f) + r"_(bucket|sum|count)\b",
                                                    all_exprs)]
    assert len(families) >= 25 and not missing, f"not on the dashboard: {missing}"
    for family in ("xyserve:spec_decode_num_accepted_tokens_per_pos_total",
                   "xyserve:prefix_cache_hits_total", "xyserve:cache_config_info",
                   "http_requests_total", *PROCESS_ON_DASHBOARD):
        assert family in families, family
    # The new panels' data is what the load made: an error status and a prefix-cache lookup.
    errors = prometheus.series('sum by (handler, status) (http_requests_total{status=~"[45].."})')
    assert {(labels["handler"], labels["status"]) for labels, _ in errors} >= {
        ("/v1/completions", "400"), ("none", "404")}
    assert prometheus.values(f'xyserve:prefix_cache_queries_total{{model_name="{NAME}"}}')[0] > 0
