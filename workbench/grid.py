"""Expand a spec into its runs: variants x grid x zip groups x seeds, minus excludes.

Precedence, lowest first: the spec's sections, the variant, grid/zip values, then ``--set``.
Every value remembers where it came from, so a bad one is reported at the line the user wrote.
Expansion is deterministic: the same spec always gives the same runs, names and keys.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workbench.checks import Override, Source, structure_problems, validate_run
from workbench.datasets import DEFAULT_DATASET, data_checksum
from workbench.errors import SpecError
from workbench.naming import RUN_NAME_KEYS, name_value, run_name_labels
from workbench.overrides import apply_top_level, changed_by_set, parse_overrides
from workbench.spec import (
    DEFAULT_SEEDS,
    SECTIONS,
    RunConfig,
    Spec,
    clip,
    format_problem,
    shown,
    spec_problems,
)
from workbench.yamlio import load_yaml_file

RUN_KEY_LENGTH = 16
MAX_RUNS = 100_000  # a grid larger than this is refused before it is expanded
EXECUTION_ONLY = ("train.threads", "train.attention")  # left out of run keys


@dataclass(frozen=True)
class Run:
    """One grid point: what to train and how to recognise it later."""

    name: str
    variant: str
    seed: int
    key: str
    config: RunConfig
    varying: dict[str, Any]
    data_sha256: str
    reference_val_loss: float | None = None  # a published figure for this variant, if any
    changed: dict[str, Any] = field(default_factory=dict)  # --set values unlike the spec's
    variant_index: int = 0  # the variant's position in the spec's ``variants``

    @property
    def tokens(self) -> int:
        train = self.config.train
        return train.max_iters * train.batch_size * train.block_size


@dataclass
class Plan:
    """The expanded spec."""

    spec_path: Path
    spec: Spec
    runs: list[Run]
    varying_keys: list[str]
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped, same as)
    excluded: int = 0
    made_by: str = ""  # what --set and --only made of the spec (``iters=200 only=bigram*``)

    @property
    def experiment(self) -> str:
        return self.spec.experiment


def expand(spec_path: Path, sets: list[str] | None = None, only: list[str] | None = None) -> Plan:
    """Load, validate and expand a spec; raises SpecError listing every problem at once.

    Problems of shape (unknown keys, types, grid keys) are all reported together; rules that
    span keys (``n_embd`` divisible by ``n_head``, ...) are checked per run once the shape holds.
    """
    overrides = parse_overrides(sets or [])
    origin = str(spec_path)
    raw = load_yaml_file(spec_path)
    if not isinstance(raw, dict):
        raise SpecError([f"{origin}: expected a mapping at the top level (got {shown(raw)})"])
    raw = apply_top_level(raw, overrides)
    overrides = [o for o in overrides if "." in o.key]
    problems = structure_problems(raw, origin, overrides)
    spec: Spec | None = None
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        # Bad values inside sections are found again, with every other problem, per run below;
        # a bad shape (grid not a mapping, ...) or a structural problem (unknown grid key, zip
        # lists of different lengths, ...) stops here: the runs could not be merged.
        stop = bool(problems) or any(not _inside_section(tuple(e["loc"])) for e in exc.errors())
        problems = spec_problems(exc, origin) + problems
        if stop:
            raise SpecError(problems) from None
    if problems and spec is not None:
        raise SpecError(problems)

    axes = _axes(raw, origin)
    _check_size(raw, axes, origin)
    points = _grid_points(axes)
    varying = [k for k in _varying_keys(axes) if k not in {o.key for o in overrides}]
    runs: list[Run] = []
    excluded = 0
    checksums: dict[tuple[str | None, str | None], str] = {}  # each file hashed once per expand
    shown_keys = varying + [k for k in dict.fromkeys(o.key for o in overrides) if k not in varying]
    labels = run_name_labels(shown_keys)
    for index, (variant, layers) in enumerate(_variants(raw)):
        for point in points:
            for seed in raw.get("seeds", DEFAULT_SEEDS):
                config_raw, sources = _merge(raw, origin, layers, point, overrides)
                as_written, _ = _merge(raw, origin, layers, point, [])
                config_raw["seed"] = seed
                if _excluded(raw.get("exclude") or [], variant, config_raw):
                    excluded += 1  # before validation: exclude can drop invalid combinations
                    continue
                config, errors = validate_run(config_raw, sources, spec_path)
                if errors:
                    problems.extend(errors)
                    continue
                assert config is not None
                changed = changed_by_set(as_written, overrides)
                run = _make_run(variant, seed, config, varying, checksums)
                runs.append(_named(run, changed, labels, index))
    if problems:
        raise SpecError(problems)
    assert spec is not None
    references = spec.reference or {}
    runs = [replace(run, reference_val_loss=references.get(run.variant)) for run in runs]
    runs, duplicates = _drop_duplicates(runs, origin)
    runs = _unique_names(runs)
    if only:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in only)]
        if not runs:
            raise SpecError([f"--only {clip(' '.join(only))}: no run name matches"])
    if not runs:
        raise SpecError([f"{origin}: exclude: every run is excluded"])
    made_by = [
        f"{labels[k]}={name_value(v)}" for k, v in {o.key: o.value for o in overrides}.items()
    ]
    made_by += [f"only={glob}" for glob in only or []]
    return Plan(spec_path, spec, runs, varying, duplicates, excluded, clip(" ".join(made_by)))


def _inside_section(loc: tuple[Any, ...]) -> bool:
    """Whether a spec error sits inside a config section (and is re-checked per run)."""
    if len(loc) >= 2 and loc[0] in SECTIONS:
        return True
    return len(loc) >= 4 and loc[0] == "variants" and loc[2] in SECTIONS


Axis = list[tuple[str, list[Any], Source]]  # keys that vary together, their values, sources


def _check_size(raw: dict[str, Any], axes: list[Axis], origin: str) -> None:
    """Refuse a grid of more than MAX_RUNS runs before expanding it (a few keys of ten values
    each multiply into millions)."""
    variants = len(raw.get("variants") or {}) or 1
    seeds = len(raw.get("seeds", DEFAULT_SEEDS))
    size = variants * seeds * math.prod(len(axis[0][1]) for axis in axes)
    if size > MAX_RUNS:
        message = (
            f"{size:,} runs (variants x grid x zip x seeds) is more than {MAX_RUNS:,}; "
            "split the spec or narrow the grid"
        )
        raise SpecError([format_problem(origin, "grid", message)])


def _axes(raw: dict[str, Any], origin: str) -> list[Axis]:
    axes: list[Axis] = []
    for key, values in (raw.get("grid") or {}).items():
        axes.append([(key, values, Source(origin, f"grid.{key}"))])
    for i, group in enumerate(raw.get("zip") or []):
        axes.append(
            [(key, values, Source(origin, f"zip[{i}].{key}")) for key, values in group.items()]
        )
    return axes


Layer = tuple[dict[str, Any], str]  # raw overrides of the sections, and the prefix of their keys


def _variants(raw: dict[str, Any]) -> list[tuple[str, Layer | None]]:
    variants = raw.get("variants")
    if not variants:
        kind = (raw.get("model") or {}).get("kind") or "run"
        return [(str(kind), None)]
    return [(name, (layer or {}, f"variants.{name}")) for name, layer in variants.items()]


def _grid_points(axes: list[Axis]) -> list[list[tuple[str, Any, Source]]]:
    per_axis = [
        [[(key, values[i], source) for key, values, source in axis] for i in range(len(axis[0][1]))]
        for axis in axes
    ]
    return [[item for group in combo for item in group] for combo in itertools.product(*per_axis)]


def _varying_keys(axes: list[Axis]) -> list[str]:
    keys = []
    for axis in axes:
        for key, values, _ in axis:
            distinct = {json.dumps(v, sort_keys=True, default=str) for v in values}
            if len(distinct) > 1:
                keys.append(key)
    return keys


def _merge(
    raw: dict[str, Any],
    origin: str,
    variant: Layer | None,
    point: list[tuple[str, Any, Source]],
    overrides: list[Override],
) -> tuple[dict[str, Any], dict[str, Source]]:
    """The raw config of one run, and where each dotted key's value came from."""
    config: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    base_layer = {name: raw.get(name) or {} for name in SECTIONS}
    layers: list[tuple[dict[str, Any], str, str]] = [(base_layer, origin, "")]
    if variant is not None:
        layers.append((variant[0], origin, variant[1] + "."))
    for layer, layer_origin, prefix in layers:
        for section in SECTIONS:
            values = layer.get(section) or {}
            target = config.setdefault(section, {})
            for key, value in values.items():
                target[key] = value
                sources[f"{section}.{key}"] = Source(layer_origin, f"{prefix}{section}.{key}")
            if section == "data":  # a layer that names a source replaces the one below it
                for key in ("path", "dataset"):
                    if key in values and _OTHER_SOURCE[key] not in values:
                        target.pop(_OTHER_SOURCE[key], None)
    for key, value, source in point:
        _assign(config, key, value)
        sources[key] = source
    for override in overrides:
        _assign(config, override.key, override.value)
        sources[override.key] = Source("--set", override.key)
    if "dataset" not in config["data"] and "path" not in config["data"]:
        config["data"]["dataset"] = DEFAULT_DATASET
    return config, sources


_OTHER_SOURCE = {"path": "dataset", "dataset": "path"}


def _assign(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key; naming a data source (path or dataset) replaces the other one."""
    section, _, name = key.partition(".")
    config[section][name] = value
    if section == "data" and name in _OTHER_SOURCE:
        config[section].pop(_OTHER_SOURCE[name], None)


def _lookup(config: RunConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def _excluded(excludes: list[dict[str, Any]], variant: str, config_raw: dict[str, Any]) -> bool:
    """Whether a run's merged (not yet validated) config matches an exclude entry; keys the
    spec does not set compare against their defaults."""

    def value_of(key: str) -> Any:
        if key == "variant":
            return variant
        if key == "seed":
            return config_raw["seed"]
        section, _, name = key.partition(".")
        values = config_raw.get(section) or {}
        if name in values:
            return values[name]
        return SECTIONS[section].model_fields[name].default

    return any(all(value_of(key) == value for key, value in entry.items()) for entry in excludes)


def _make_run(
    variant: str,
    seed: int,
    config: RunConfig,
    varying: list[str],
    checksums: dict[tuple[str | None, str | None], str],
) -> Run:
    source = (config.data.dataset, config.data.path)
    if source not in checksums:
        checksums[source] = data_checksum(*source)
    checksum = checksums[source]
    return Run(
        name="",  # see _named
        variant=variant,
        seed=seed,
        key=run_key(config, checksum),
        config=config,
        varying={key: _lookup(config, key) for key in varying},
        data_sha256=checksum,
    )


def _named(run: Run, changed: dict[str, Any], labels: dict[str, str], index: int) -> Run:
    """The run named variant, grid values, then ``--set`` values unlike the spec's, then seed,
    in short keys (``multi_head bs=32 lr=3e-3 s=1337``): two runs of different configs in one
    plan never share a name."""
    values = [f"{labels[k]}={name_value(v)}" for k, v in run.varying.items()]
    values += [f"{labels[k]}={name_value(v)}" for k, v in changed.items()]
    name = " ".join([run.variant, *values, f"{RUN_NAME_KEYS['seed']}={run.seed}"])
    return replace(run, name=name, changed=changed, variant_index=index)


def _unique_names(runs: list[Run]) -> list[Run]:
    """A guard: runs of different keys that format to one name (``true`` and ``'true'``) get
    their key appended, so a name never stands for two configs."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    return [replace(r, name=f"{r.name} {r.key[:8]}") if counts[r.name] > 1 else r for r in runs]


def run_key(config: RunConfig, data_sha256: str) -> str:
    """A stable hash of the resolved config and the data's checksum.

    The data's location is left out (its checksum identifies it), so moving a file or the repo
    keeps every key; so are execution settings such as torch's thread count.
    """
    payload = config.model_dump(mode="json")
    payload["data"]["path"] = None
    for key in EXECUTION_ONLY:  # how a run is executed, not what it computes
        section, _, name = key.partition(".")
        del payload[section][name]
    blob = json.dumps({"config": payload, "data_sha256": data_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:RUN_KEY_LENGTH]


def _drop_duplicates(runs: list[Run], origin: str) -> tuple[list[Run], list[tuple[str, str]]]:
    """One run per key: a variant's grid points that ``--set`` made equal (a set grid key) are
    one run, listed in ``duplicates``. Two variants that resolve to one config are refused,
    naming both: one name would stand for the other's run."""
    first: dict[str, Run] = {}
    kept, duplicates = [], []
    clashes: dict[tuple[str, str], str] = {}
    for run in runs:
        if run.key not in first:
            first[run.key] = run
            kept.append(run)
        elif run.variant == first[run.key].variant:
            duplicates.append((run.name, first[run.key].name))
        else:
            pair = (first[run.key].variant, run.variant)
            clashes.setdefault(pair, f"{shown(run.name)} = {shown(first[run.key].name)}")
    if clashes:
        raise SpecError(
            [
                f"{origin}: variants: {shown(a)} and {shown(b)} resolve to the same config "
                f"({example}): make them differ, or keep one"
                for (a, b), example in clashes.items()
            ]
        )
    return kept, duplicates
