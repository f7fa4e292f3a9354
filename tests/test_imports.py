"""The direction of imports that docs/architecture.md states, checked on every module: the
layers below never import the ones above (a module-level or a function-level import alike)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"
LAYERS = ("models", "train", "sweep", "report", "cli")  # packages; the rest is the foundation
# What each part may not import (docs/architecture.md, "The picture").
FOUNDATION_ABOVE = {*LAYERS, "mlflow_model", "sampling"}
NEVER = {
    "models": {"train", "sweep", "report", "cli", "grid", "tracking", "store", "mlflow_model"},
    "train": {"sweep", "report", "cli", "tracking", "store", "mlflow_model", "sampling"},
    "report": {"models", "train", "sweep", "cli"},
    "sweep": {"cli"},
    "cli": set(),
    "__main__": set(),  # `python -m workbench`: the command line
    # a run's logged model and `workbench sample` stand on the ladder, nothing above it
    "mlflow_model": {"train", "sweep", "report", "cli"},
    "sampling": {"train", "sweep", "report", "cli"},
}


def part(module: str) -> str:
    """``workbench.sweep.jobs`` → ``sweep``; ``workbench.grid`` → ``grid``."""
    return module.split(".")[1] if "." in module else ""


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("workbench.")}


def test_imports_point_down() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        here = part(module)
        never = NEVER.get(here, FOUNDATION_ABOVE)
        wrong += [f"{module} imports {m}" for m in sorted(imports(path)) if part(m) in never]
    assert wrong == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule can fail: a models module that imported the sweep would be named."""
    planted = tmp_path / "ladder.py"
    planted.write_text("def f():\n    from workbench.sweep.jobs import Job\n")
    assert part(next(iter(imports(planted)))) in NEVER["models"]
