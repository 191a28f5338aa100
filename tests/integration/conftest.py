"""Fixtures of the integration tests: a real Prometheus (Debian's `prometheus` package, installed
here when missing and we are root) beside a real `xyserve serve`."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

APT_TIMEOUT_S = 600


def _install_prometheus() -> str | None:
    """`apt-get install prometheus`; returns why it failed, None on success."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=APT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(command)}` failed: {exc}"
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            return f"`{' '.join(command)}` exited with {done.returncode}: " + " | ".join(tail)
    return None


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """The `prometheus` executable; installed with apt-get when missing (as root)."""
    path = shutil.which("prometheus")
    if path is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("needs a real Prometheus: `prometheus` is not on PATH, and installing "
                        "Debian's package needs apt-get as root")
        failure = _install_prometheus()
        path = shutil.which("prometheus")
        if path is None:
            pytest.skip(f"needs a real Prometheus; installing Debian's `prometheus` failed: "
                        f"{failure or 'no prometheus on PATH afterwards'}")
    return path
