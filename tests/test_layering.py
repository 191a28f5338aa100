"""The layering DESIGN.md promises, checked on what a fresh interpreter actually imports.

`server -> engine -> npu_sim`, never backwards; the scheduler, the KV-cache manager and the
boundary types are pure Python (no simulator, no torch, no numpy, no HTTP); the benchmarks reach
the server over HTTP only. Each check imports modules in a subprocess (this test process has
loaded everything already) and lists the top-level packages that came with them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE_ENGINE = ("engine.scheduler", "engine.kv_cache", "engine.outputs", "engine.request",
               "engine.admission",
               "engine.stats", "engine.chunks", "engine.config", "engine.token_tree",
               "engine.arch", "engine.arch_presets", "engine.spec.adaptive", "engine.spec.types")


def forbidden(modules: tuple[str, ...] | str, packages: set[str]) -> set[str]:
    """Which of `packages` importing `modules` loads (empty = the layering holds)."""
    return loaded_packages(*((modules,) if isinstance(modules, str) else modules)) & packages


def loaded_packages(*modules: str) -> set[str]:
    """Top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout))


def test_scheduler_and_boundary_types_are_pure() -> None:
    assert not forbidden(PURE_ENGINE, {"npu_sim", "torch", "numpy", "transformers", "server",
                                       "benchmarks"})


def test_lowering_needs_the_simulator_but_not_torch() -> None:
    assert "npu_sim" in loaded_packages("engine.lowering")
    assert not forbidden("engine.lowering", {"torch", "transformers", "server", "benchmarks"})


@pytest.mark.parametrize("module", ["npu_sim.device", "npu_sim.trace", "npu_sim.cost",
                                    "npu_sim.kernels"])
def test_simulator_knows_nothing_of_requests(module: str) -> None:
    assert not forbidden(module, {"engine", "server", "benchmarks"})


def test_engine_never_imports_the_server() -> None:
    modules = ("engine.async_engine", "engine.llm", "engine.core", "engine.runner")
    assert not forbidden(modules, {"server", "benchmarks"})


def test_the_http_front_end_runs_without_torch() -> None:
    """`xyserve serve`'s first process is the HTTP front end; the model, and torch with it, live
    in the engine process (engine.core_process): 125 MB resident instead of 314."""
    modules = ("server.cli", "server.app", "engine.async_engine", "engine.core_process")
    assert not forbidden(modules, {"torch", "npu_sim"})


def test_simulator_is_timing_only() -> None:
    """`xyserve simulate` runs the engine without weights: no torch, no transformers, no HTTP."""
    modules = ("cluster.simulation", "cluster.cli", "engine.timing_runner")
    assert not forbidden(modules, {"torch", "transformers", "server", "benchmarks"})


def test_benchmarks_reach_the_server_over_http_only() -> None:
    modules = ("benchmarks.load.run", "benchmarks.load.args")
    assert not forbidden(modules, {"server", "engine", "npu_sim", "torch"})


def test_npu_names_the_engine_keeps_match_the_simulator() -> None:
    """The engine names the default chip and the primitives as plain strings (to stay pure)."""
    from engine.config import DEFAULT_NPU, NPU_STACKS, NPU_WEIGHTS
    from engine.stats import NPU_PRIMITIVES
    from npu_sim.hardware import PRESETS
    from npu_sim.host import DEFAULT_STACK, STACKS
    from npu_sim.tasks import NPU_WEIGHT_FORMATS, Primitive

    assert DEFAULT_NPU in PRESETS
    assert set(NPU_PRIMITIVES) == {p.value for p in Primitive}
    assert set(NPU_STACKS) == set(STACKS) and NPU_STACKS[0] == DEFAULT_STACK
    assert ("auto", *NPU_WEIGHT_FORMATS) == NPU_WEIGHTS


def test_bench_default_url_is_the_servers() -> None:
    from benchmarks.load.args import DEFAULT_BASE_URL
    from server.config import ServerConfig

    assert ServerConfig().url == DEFAULT_BASE_URL


def test_cluster_simulates_with_the_engine_never_the_server() -> None:
    modules = ("cluster.cli", "cluster.cluster_sim", "cluster.sweep_cli", "cluster.sweep_exec",
               "cluster.capacity")
    assert not forbidden(modules, {"server", "benchmarks", "torch", "transformers"})
