"""Small specs written into a test's folder (shared by the spec, grid and CLI tests)."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import yaml

BASE: dict[str, Any] = {
    "experiment": "t",
    "train": {"max_iters": 100, "eval_interval": 10},
    "model": {"kind": "bigram"},
}


def spec_dict(**sections: Any) -> dict[str, Any]:
    """BASE with the given top-level keys merged in (sections merge key by key)."""
    spec = copy.deepcopy(BASE)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(name), dict):
            spec[name].update(value)
        else:
            spec[name] = value
    return spec


def write_spec(directory: Path, spec: dict[str, Any] | str, name: str = "spec.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(spec) if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path
