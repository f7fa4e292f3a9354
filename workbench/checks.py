"""The checks of a spec that pydantic cannot express: the structure of grid, zip, exclude and
``--set`` keys, and the rules that span keys of one run (``n_head`` divides ``n_embd``, a data
file longer than a block, ...). Each problem names the file, the key and the bad value."""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workbench.datasets import KNOWN_DATASETS
from workbench.spec import (
    ATTENTION_KINDS,
    MODEL_KINDS,
    RunConfig,
    check_dotted_key,
    clip,
    describe_error,
    format_problem,
    section_keys,
)


@dataclass(frozen=True)
class Source:
    """Where a value was written: the file (or ``--set``) and the dotted key there."""

    origin: str
    key: str


@dataclass(frozen=True)
class Override:
    """``--set KEY=VALUE`` parsed."""

    key: str
    value: Any
    text: str


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def structure_problems(raw: dict[str, Any], origin: str, overrides: list[Override]) -> list[str]:
    """Checks of grid/zip/exclude/--set keys that pydantic cannot express; tolerant of bad
    shapes (pydantic reports those)."""
    problems: list[str] = []
    grid = raw.get("grid")
    zips = raw.get("zip")
    if isinstance(grid, dict) and not grid:
        problems.append(format_problem(origin, "grid", "empty (remove it or add a key)"))
    if isinstance(zips, list) and not zips:
        problems.append(format_problem(origin, "zip", "empty (remove it or add a group)"))
    if isinstance(raw.get("variants"), dict) and not raw["variants"]:
        problems.append(format_problem(origin, "variants", "empty (remove it or add a variant)"))
    groups: list[tuple[str, dict[str, Any]]] = [("grid.", _mapping(grid))]
    groups += [(f"zip[{i}].", _mapping(g)) for i, g in enumerate(zips or []) if zips is not None]
    for i, g in enumerate(zips if isinstance(zips, list) else []):
        if isinstance(g, dict) and not g:
            problems.append(format_problem(origin, f"zip[{i}]", "empty (remove it or add a key)"))
    seen: dict[str, str] = {}
    for prefix, group in groups:
        for key, values in group.items():
            where = f"{prefix}{key}"
            problem = check_dotted_key(str(key))
            if problem:
                problems.append(format_problem(origin, where, problem))
            if isinstance(values, list) and not values:
                problems.append(format_problem(origin, where, "empty list of values"))
            for i, value in enumerate(values if isinstance(values, list) else []):
                if isinstance(value, (list, dict)):  # every config value is a single one
                    problems.append(
                        format_problem(origin, f"{where}[{i}]", "expected a single value", value)
                    )
            if key in seen:
                problems.append(format_problem(origin, where, f"also varied by {seen[key]}"))
            seen[key] = where
        lengths = {len(v) for v in group.values() if isinstance(v, list)}
        if prefix.startswith("zip") and len(lengths) > 1:
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in group.items() if isinstance(v, list))
            problems.append(
                format_problem(origin, prefix[:-1], f"lists differ in length ({sizes})")
            )
    seeds = raw.get("seeds")
    integers = [s for s in seeds if type(s) is int] if isinstance(seeds, list) else []
    if len(integers) != len(set(integers)):
        problems.append(format_problem(origin, "seeds", "repeated seed", seeds))
    names = set(_mapping(raw.get("variants")))
    normal: dict[str, list[str]] = {}
    for name in map(str, names):
        normal.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    for same in (sorted(group) for group in normal.values() if len(group) > 1):
        spelled = " and ".join(ascii(name) for name in same)  # escapes show how they differ
        message = f"{spelled} differ only in their Unicode form (NFC), so they read alike"
        problems.append(format_problem(origin, "variants", message))
    excludes = raw.get("exclude")
    for i, entry in enumerate(excludes if isinstance(excludes, list) else []):
        if isinstance(entry, dict) and not entry:
            problems.append(format_problem(origin, f"exclude[{i}]", "empty assignment"))
        for key, value in _mapping(entry).items():
            where = f"exclude[{i}].{key}"
            if key == "variant":
                if not isinstance(value, str) or value not in names:
                    allowed = clip(", ".join(sorted(names))) or "none defined"
                    message = f"no such variant (allowed: {allowed})"
                    problems.append(format_problem(origin, where, message, value))
            elif isinstance(value, (list, dict)):  # it would equal no run's value: excluding none
                message = "expected one value (for several, write one exclude entry per value)"
                problems.append(format_problem(origin, where, message, value))
            elif key != "seed" and (problem := check_dotted_key(str(key))):
                problems.append(format_problem(origin, where, problem))
    for name in _mapping(raw.get("reference")):
        if names and name not in names:
            allowed = clip(", ".join(sorted(names))) or "none defined"
            problems.append(
                format_problem(origin, f"reference.{name}", f"no such variant (allowed: {allowed})")
            )
    for override in overrides:
        problem = check_dotted_key(override.key)
        if problem:
            problems.append(format_problem("--set", override.key, problem))
    return problems


def validate_run(
    config_raw: dict[str, Any], sources: dict[str, Source], spec_path: Path
) -> tuple[RunConfig | None, list[str]]:
    def where(key: str) -> Source:
        return sources.get(key) or sources.get(key.split(".")[0]) or Source(str(spec_path), key)

    try:
        config = RunConfig.model_validate(config_raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            source = where(key)
            unknown = error["type"] == "extra_forbidden"
            allowed = section_keys(key.split(".")[0]) if unknown else None
            problems.append(
                format_problem(
                    source.origin,
                    source.key,
                    describe_error(error, allowed),
                    error.get("input", ...),
                    error["type"] != "missing" and not unknown,
                )
            )
        return None, problems

    problems = []
    for key, message, value in _semantic_problems(config, spec_path):
        source = where(key)
        problems.append(format_problem(source.origin, source.key, message, value))
    if problems:
        return None, problems
    if config.data.path is not None:  # resolved so that any working folder finds it later
        resolved = str((spec_path.parent / config.data.path).resolve())
        data = config.data.model_copy(update={"path": resolved})
        config = config.model_copy(update={"data": data})
    return config, []


def _semantic_problems(config: RunConfig, spec_path: Path) -> list[tuple[str, str, Any]]:
    """Rules that span several keys: (dotted key to blame, message, bad value)."""
    problems: list[tuple[str, str, Any]] = []
    model, train, data = config.model, config.train, config.data
    if model.kind is None:
        problems.append(
            (
                "model.kind",
                f"missing; set it under model: or in each variant "
                f"(allowed: {', '.join(MODEL_KINDS)})",
                None,
            )
        )
    if model.kind in ("multi_head", "transformer") and model.n_embd % model.n_head:
        problems.append(
            ("model.n_head", f"must divide model.n_embd ({model.n_embd})", model.n_head)
        )
    if (
        model.kind in ATTENTION_KINDS
        and train.attention in ("torch", "native")
        and model.dropout > 0
    ):
        problems.append(
            (
                "train.attention",
                f"computes no attention dropout (model.dropout is {model.dropout}): "
                "use auto or sdpa",
                train.attention,
            )
        )
    if train.eval_interval > train.max_iters:
        problems.append(
            (
                "train.eval_interval",
                f"must be <= train.max_iters ({train.max_iters})",
                train.eval_interval,
            )
        )
    if train.min_lr > train.learning_rate:
        problems.append(
            (
                "train.min_lr",
                f"must be <= train.learning_rate ({train.learning_rate})",
                train.min_lr,
            )
        )
    if data.dataset is None and data.path is None:
        problems.append(("data", "set data.dataset or data.path", None))
    elif data.dataset is not None and data.path is not None:
        problems.append(("data.path", "set data.dataset or data.path, not both", data.path))
    elif data.dataset is not None and data.dataset not in KNOWN_DATASETS:
        allowed = ", ".join(KNOWN_DATASETS)
        problems.append(
            (
                "data.dataset",
                f"unknown data set (allowed: {allowed}, or data.path: FILE)",
                data.dataset,
            )
        )
    elif data.path is not None and not (spec_path.parent / data.path).is_file():
        problems.append(
            ("data.path", f"no such file (looked in {spec_path.parent.resolve()})", data.path)
        )
    elif data.path is not None:
        length = _text_length(spec_path.parent / data.path)
        shortest = min(
            int(length * (1 - data.val_fraction)), length - int(length * (1 - data.val_fraction))
        )
        if length < 0:
            problems.append(("data.path", "not a UTF-8 text file", data.path))
        elif shortest <= train.block_size:
            problems.append(
                (
                    "data.path",
                    f"too short: a split has {shortest} characters, not more than "
                    f"train.block_size ({train.block_size})",
                    data.path,
                )
            )
    return [(k, m, v if v is not None else ...) for k, m, v in problems]


@functools.lru_cache(maxsize=64)
def _text_length_cached(path: str, mtime_ns: int, size: int) -> int:
    try:
        return len(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError):
        return -1


def _text_length(path: Path) -> int:
    """Characters in a UTF-8 file, -1 if it is not one (read once per version of the file)."""
    stat = path.stat()
    return _text_length_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
