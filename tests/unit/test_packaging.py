"""The package says what is true: every module vpool imports is a declared dependency, the
Python it asks for runs the code, and every package-data glob matches a file."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _imported_top_level(folder: Path) -> set[str]:
    modules: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"vpool", "__future__", "tests", "benchmarks"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-") for req in requirements}


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get(module, [])}


def test_every_module_vpool_imports_is_a_declared_dependency() -> None:
    declared = _requirement_names(PROJECT["dependencies"])
    engine = _requirement_names(PROJECT["optional-dependencies"]["cpu"]) | {"vllm"}
    engine |= _requirement_names(PROJECT["optional-dependencies"]["ray"])  # the ray launcher's SDK
    undeclared = {}
    for module in _imported_top_level(ROOT / "vpool"):
        dists = _distributions(module) or {module}
        if not dists & (declared | engine):
            undeclared[module] = dists
    assert not undeclared, f"imported but not declared: {undeclared}"


def test_every_module_the_benchmarks_import_is_declared_for_them() -> None:
    declared = _requirement_names(PROJECT["dependencies"]) | _requirement_names(
        PROJECT["optional-dependencies"]["bench"]
    )
    local = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    missing = {
        module: _distributions(module)
        for module in _imported_top_level(ROOT / "benchmarks") - local
        if not (_distributions(module) or {module}) & declared
    }
    assert not missing, f"benchmarks import what no extra declares: {missing}"


def test_the_python_asked_for_has_what_the_code_uses() -> None:
    assert PROJECT["requires-python"] == ">=3.11"  # asyncio.timeout (registry, upstream)
    uses_timeout = [p for p in (ROOT / "vpool").rglob("*.py") if "asyncio.timeout(" in p.read_text()]
    assert uses_timeout


def test_every_package_data_glob_matches_a_file() -> None:
    for package, globs in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in globs:
            assert list((ROOT / package).glob(pattern)), f"{package}: {pattern} matches nothing"
