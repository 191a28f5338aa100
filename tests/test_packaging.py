"""pyproject.toml declares every package the product imports (not only through other packages)
and ships every C source the product compiles."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import pathlib
import sys

import pytest
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]
PRODUCT = ("server", "engine", "npu_sim", "native_build", "cluster")
OWN = {*PRODUCT, "benchmarks", "tests"}


def imported_top_levels() -> dict[str, str]:
    """Each third-party top-level module the product imports -> a file importing it."""
    found: dict[str, str] = {}
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in OWN and top not in sys.stdlib_module_names:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared() -> None:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower().replace("_", "-")
                for r in [*project["dependencies"],
                          *(r for extra in project["optional-dependencies"].values()
                            for r in extra)]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, where in imported_top_levels().items():
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = (sorted(names), where)
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
    runtime = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert {"jinja2", "pyyaml", "llguidance", "matplotlib"} <= runtime


def test_every_c_source_ships_in_the_package_data() -> None:
    """native_build compiles the C sources on first use, from the installed package: each one
    (and each header) must be package data, or an installed xyserve runs its slower paths."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    missing = []
    for package in PRODUCT:
        for path in [*(REPO / package).rglob("*.c"), *(REPO / package).rglob("*.h")]:
            owner = ".".join(path.parent.relative_to(REPO).parts)
            if not any(fnmatch.fnmatch(path.name, pattern) for pattern in data.get(owner, [])):
                missing.append(str(path.relative_to(REPO)))
    assert not missing, f"C sources not in [tool.setuptools.package-data]: {missing}"
