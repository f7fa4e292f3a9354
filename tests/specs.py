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


# A spec that trains for real, in seconds: two rungs, one seed, 40 steps on the CPU.
SMOKE: dict[str, Any] = {
    "experiment": "t",
    "data": {"dataset": "tinyshakespeare"},
    "train": {"max_iters": 40, "eval_interval": 20, "eval_iters": 4, "device": "cpu"},
    "model": {"n_embd": 16, "n_head": 2},
    "variants": {
        "bigram": {"model": {"kind": "bigram"}},
        "multi_head": {"model": {"kind": "multi_head"}},
    },
    "seeds": [1],
}


def write_spec(
    directory: Path, spec: dict[str, Any] | str | None = None, name: str = "spec.yaml", **top: Any
) -> Path:
    """The one way tests write a spec: a dict, YAML text (dedented), or by default ``SMOKE`` with
    the top-level keys ``top`` replaced (``seeds=[1, 2]``, ``train={...}``)."""
    if spec is None:
        spec = {**copy.deepcopy(SMOKE), **top}
    elif top:
        raise TypeError("top-level keys replace SMOKE's; give them without a spec")
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(spec) if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path
