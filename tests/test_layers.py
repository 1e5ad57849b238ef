"""The layers hold: analysis is pure, the simulator knows nothing of the controller, and
the Kubernetes API double is apart from both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What pure statistics may import: no I/O, no clock, no logging, no canaryd.
ANALYSIS_ALLOWED = {
    "__future__", "math", "dataclasses", "enum", "collections", "typing", "functools",
    "numpy", "scipy", "analysis",
}  # fmt: skip
FORBIDDEN_IN_CORE = {"time", "datetime", "logging", "structlog", "os", "socket", "httpx", "asyncio"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "analysis").glob("*.py")), ids=lambda p: p.name)
def test_analysis_imports_only_pure_libraries(path: Path) -> None:
    assert imports(path) <= ANALYSIS_ALLOWED, imports(path) - ANALYSIS_ALLOWED


@pytest.mark.parametrize("path", sorted((ROOT / "simulator").glob("*.py")), ids=lambda p: p.name)
def test_simulator_does_not_import_the_controller(path: Path) -> None:
    assert "canaryd" not in imports(path)


def test_the_state_machine_does_no_io_and_reads_no_clock() -> None:
    found = imports(ROOT / "canaryd" / "rollout.py")
    assert not found & (FORBIDDEN_IN_CORE - {"datetime"}), found
    source = (ROOT / "canaryd" / "rollout.py").read_text()
    for call in ("datetime.now", "time.time", "time.monotonic", "utcnow"):
        assert call not in source


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "canaryd").glob("*.py") if p.name != "playground.py"),
    ids=lambda p: p.name,
)
def test_the_controller_does_not_use_the_api_double(path: Path) -> None:
    """The Kubernetes API double serves the tests and the playground only."""
    assert "kubedouble" not in imports(path)


@pytest.mark.parametrize("path", sorted((ROOT / "kubedouble").glob("*.py")), ids=lambda p: p.name)
def test_the_api_double_knows_nothing_of_the_controller(path: Path) -> None:
    assert not imports(path) & {"canaryd", "simulator", "analysis"}, imports(path)
