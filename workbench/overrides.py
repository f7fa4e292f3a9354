"""``--set KEY=VALUE``: parsed, applied to the spec's top level (``experiment``, ``seeds``), and
which of a run's values it changed (they go into the run's name)."""

from __future__ import annotations

import copy
from typing import Any

from workbench.checks import Override
from workbench.errors import SpecError
from workbench.spec import SECTIONS, shown
from workbench.yamlio import parse_value


def parse_overrides(items: list[str]) -> list[Override]:
    problems, overrides = [], []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {shown(item)}: expected KEY=VALUE, e.g. train.max_iters=200")
            continue
        overrides.append(Override(key=key, value=parse_value(text), text=item))
    if problems:
        raise SpecError(problems)
    return overrides


def apply_top_level(raw: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """``--set seeds=[1,2]`` or ``--set experiment=x`` change the spec itself."""
    top = [o for o in overrides if "." not in o.key]
    if not top:
        return raw
    allowed = ("experiment", "seeds")
    bad = [o for o in top if o.key not in allowed]
    if bad:
        raise SpecError(
            [
                f"--set: {o.key}: unknown key (allowed: {', '.join(allowed)}, or a dotted key "
                "such as train.max_iters)"
                for o in bad
            ]
        )
    raw = copy.deepcopy(raw)
    for o in top:
        raw[o.key] = o.value
    return raw


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1 and 1.0 are, true and 1 are not."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def changed_by_set(as_written: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """The ``--set`` values of one run that differ from what its spec gives it (as YAML values;
    the last ``--set`` of a key wins)."""
    final = {o.key: o.value for o in overrides}
    changed = {}
    for key, value in final.items():
        section, _, name = key.partition(".")
        written = as_written.get(section) or {}
        before = written[name] if name in written else SECTIONS[section].model_fields[name].default
        if not _same(before, value):
            changed[key] = value
    return changed
