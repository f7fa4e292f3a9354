"""Read one experiment out of MLflow into tidy pandas frames, in bulk; no plotting here.

Params, tags and last metric values of every run come from one paginated ``search_runs``.
Metric histories come from the store in bulk: one SQL query on a SQLite store, the server's
``get-history-bulk`` endpoint (up to 100 runs a request) on an ``http(s)`` store, else one
``get_metric_history`` per run and key on a thread pool.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.grid import EXECUTION_ONLY
from workbench.report.history import HISTORY_COLUMNS, histories
from workbench.tracking import (
    TAG,
    WORKBENCH_RUNS,
    RunRecord,
    RunState,
    client,
    search_workbench_runs,
    sqlite_path,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient

STATES = tuple(str(s) for s in RunState if s not in (RunState.TO_DO, RunState.CLAIMED))
SEED_PARAMS = ("seed", "train.seed")  # what repeats a grid point; every other param tells one apart
DERIVED_PARAMS = ("num_params",)  # follow from the config: an axis only where they split points
UNSET = "\x00unset"  # a param one run logs and another does not: a different point
INT_TAGS = ("seed", "variant_index", "attempt", "pid", "driver_pid", "stopped_step")
FLOAT_TAGS = ("heartbeat", "reference_val_loss")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class ReportError(WorkbenchError):
    """Nothing to report on: no such store, experiment or workbench run."""


@dataclass
class ExperimentData:
    """One experiment, as the report sees it.

    ``runs``: one row per run (the newest MLflow run of each run key), indexed by run id, with
    MLflow's ``params.*``, ``tags.*`` and ``metrics.*`` columns plus typed convenience columns
    (``variant``, ``seed``, ``state``, ``grid.<key>`` for each axis, ...).
    ``history``: one row per run × metric × step (run_id, metric, step, value, timestamp).

    A grid point is a variant and its resolved config minus the seed: two runs of a variant are
    one point iff every param but the seed is equal (a param logged by one and not the other
    included). ``axes`` are the params that vary within some variant, so grouping by the
    variant and the ``grid.*`` columns of the axes groups by exactly that.
    """

    name: str
    experiment_id: str
    tracking_uri: str
    runs: pd.DataFrame
    history: pd.DataFrame
    axes: list[str]  # dotted keys that vary within a variant, e.g. train.block_size
    variants: list[str]  # in ladder order: the spec's (workbench.variant_index), else history
    declared: list[str] = field(default_factory=list)  # keys the spec's grid varies (tags)
    superseded: int = 0  # older MLflow runs of a run key that was rerun (not reported)
    skipped: list[str] = field(default_factory=list)  # one line per run left out, and why
    load_seconds: dict[str, float] = field(default_factory=dict)


def experiments_with_runs(tracking_uri: str) -> list[str]:
    """Names of the experiments in the store that hold at least one workbench run."""
    mlflow_client = _client(tracking_uri)
    names = []
    for experiment in mlflow_client.search_experiments():
        page = mlflow_client.search_runs(
            [experiment.experiment_id], filter_string=WORKBENCH_RUNS, max_results=1
        )
        if page:
            names.append(str(experiment.name))
    return names


def load_experiment(tracking_uri: str, name: str) -> ExperimentData:
    """Every workbench run of experiment ``name`` with its full metric histories."""
    import time

    mlflow_client = _client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(experiments_with_runs(tracking_uri)) or "none"
        raise ReportError(
            f"{tracking_uri}: no experiment named {name!r} (with workbench runs: {known})"
        )
    started = time.perf_counter()
    every = _search_runs(mlflow_client, str(experiment.experiment_id))
    if every.empty:
        raise ReportError(f"{tracking_uri}: experiment {name!r} has no workbench runs")
    searched = time.perf_counter()
    every, skipped = _well_formed(every, name)
    if every.empty:
        raise ReportError(f"{tracking_uri}: experiment {name!r} has no well-formed workbench run")
    runs = every.drop_duplicates(subset=f"tags.{TAG}run_key", keep="first")  # newest first
    superseded = len(every) - len(runs)
    runs = _with_typed_columns(runs.set_index("run_id", drop=False))
    variants = _ladder_order(runs)
    axes, declared = _config_axes(runs)
    history = histories(tracking_uri, str(experiment.experiment_id), runs)
    runs = _with_history_columns(runs, history)
    loaded = time.perf_counter()
    return ExperimentData(
        name=name,
        experiment_id=str(experiment.experiment_id),
        tracking_uri=tracking_uri,
        runs=runs,
        history=history,
        axes=axes,
        variants=variants,
        declared=declared,
        superseded=superseded,
        skipped=skipped,
        load_seconds={"runs": searched - started, "histories": loaded - searched},
    )


def tidy(data: ExperimentData) -> pd.DataFrame:
    """The CSV: one row per run × metric × step, every param and tag of the run as columns.

    Text cells that a spreadsheet would run as a formula are neutralised (see ``safe_cell``)."""
    runs = data.runs
    meta = [c for c in runs.columns if c.startswith(("params.", "tags."))]
    per_run = runs[["run_id", "state", "status", *meta]].copy()
    per_run.insert(0, "run_name", runs["run_name"])
    per_run.insert(0, "experiment", data.name)
    per_run = per_run.apply(lambda column: column.map(safe_cell))  # one row per run: cheap
    history = data.history.sort_values(["run_id", "metric", "step"], kind="stable")
    history = history.assign(
        metric=history["metric"].map({m: safe_cell(m) for m in history["metric"].unique()})
    )
    table = history.merge(per_run.reset_index(drop=True), on="run_id", how="left")
    first = ["experiment", "run_id", "run_name", "state", "status", *HISTORY_COLUMNS[1:]]
    return table[first + meta]


def safe_cell(value: object) -> object:
    """OWASP's advice against CSV injection: text that starts with ``= + - @``, a tab or a
    carriage return gets a leading ``'``, so a spreadsheet shows it instead of running it.
    Numbers, and text that is a number (``-0.5``, ``+3``), are left alone."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def artifact_text(tracking_uri: str, run_id: str, path: str) -> str | None:
    """One small text artifact of a run, or None if the run has none by that name."""
    mlflow_client = _client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="workbench-report-") as folder:
        try:
            local = mlflow_client.download_artifacts(run_id, path, folder)
            return Path(local).read_text(encoding="utf-8", errors="replace")
        except Exception:  # missing artifact, unreadable store: the report goes on without it
            return None


# --- runs ----------------------------------------------------------------------------------------


def _client(tracking_uri: str) -> Any:
    path = sqlite_path(tracking_uri)
    if path is not None and not path.exists():
        raise ReportError(f"{tracking_uri}: no such tracking store")
    return client(tracking_uri)


def _search_runs(mlflow_client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    """Every workbench run, newest first, in ``mlflow.search_runs``' pandas layout (without
    touching MLflow's global tracking URI)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for run in search_workbench_runs(mlflow_client, experiment_id):
        info, data = run.info, run.data
        row: dict[str, Any] = {
            "run_id": info.run_id,
            "experiment_id": info.experiment_id,
            "status": info.status,
            "artifact_uri": info.artifact_uri,
            "start_time": info.start_time,
            "end_time": info.end_time,
        }
        row.update({"metrics." + k: v for k, v in data.metrics.items()})
        row.update({"params." + k: v for k, v in data.params.items()})
        row.update({"tags." + k: v for k, v in data.tags.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("start_time", "end_time"):
        if column in frame:
            frame[column] = pd.to_datetime(frame[column], unit="ms", utc=True)
    return frame


def _well_formed(every: pd.DataFrame, experiment: str) -> tuple[pd.DataFrame, list[str]]:
    """The runs whose workbench tags make sense; one line for each run left out."""
    problems = [_tag_problem(row) for row in every.to_dict("records")]
    keep = [problem is None for problem in problems]
    skipped = [
        f"{experiment}: skipped run {row['run_id']} "
        f"({row.get('tags.mlflow.runName') or 'no name'}): {problem}"
        for row, problem in zip(every.to_dict("records"), problems, strict=True)
        if problem is not None
    ]
    return every[keep], skipped


def _tag_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with a run's workbench tags (a shared store holds anyone's runs), or None."""
    variant = row.get(f"tags.{TAG}variant")
    if not isinstance(variant, str) or not variant.strip():
        return f"no {TAG}variant tag"
    for names, kind in ((INT_TAGS, int), (FLOAT_TAGS, float)):
        for name in names:
            value = row.get(f"tags.{TAG}{name}")
            if not isinstance(value, str):
                continue
            try:
                kind(value)
            except ValueError:
                shown = value if len(value) <= 40 else value[:40] + "…"
                return f"tag {TAG}{name}={shown!r} is not a number"
    return None


def _ladder_order(runs: pd.DataFrame) -> list[str]:
    """Variants in the spec's order (the ``variant_index`` tag); runs of stores written before
    that tag fall back to the order the variants' first runs were created."""
    import pandas as pd

    column = f"tags.{TAG}variant_index"
    index = pd.to_numeric(runs[column], errors="coerce") if column in runs else math.nan
    table = pd.DataFrame({"variant": runs["variant"], "index": index, "start": runs["start_time"]})
    first = table.groupby("variant").agg(index=("index", "min"), start=("start", "min"))
    first = first.sort_values(["index", "start"], na_position="last", kind="stable")
    return [str(v) for v in first.index]


def _with_typed_columns(runs: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    runs = runs.copy()

    def tag(name: str) -> pd.Series:
        column = f"tags.{TAG}{name}"
        return runs[column] if column in runs else pd.Series(None, index=runs.index, dtype=object)

    runs["variant"] = tag("variant").astype(str)
    runs["seed"] = pd.to_numeric(tag("seed"), errors="coerce")
    runs["device"] = tag("device").fillna("unknown")
    runs["reason"] = tag("reason")
    runs["stopped_step"] = pd.to_numeric(tag("stopped_step"), errors="coerce")
    runs["reference_val_loss"] = pd.to_numeric(tag("reference_val_loss"), errors="coerce")
    runs["run_name"] = (
        runs["tags.mlflow.runName"] if "tags.mlflow.runName" in runs else runs["run_id"]
    )
    for column in ("num_params", "train.batch_size", "train.block_size", "train.max_iters"):
        param = f"params.{column}"
        runs[column] = pd.to_numeric(runs[param], errors="coerce") if param in runs else math.nan
    runs["state"] = [_state(row) for row in runs.to_dict("records")]
    return runs


def _state(row: dict[str, Any]) -> str:
    tags = {k[5:]: v for k, v in row.items() if k.startswith("tags.") and isinstance(v, str)}
    start = row.get("start_time")
    record = RunRecord(
        run_id=str(row["run_id"]),
        status=str(row["status"]),
        tags=tags,
        metrics={},
        start_time=int(start.timestamp() * 1000) if start is not None and start == start else 0,
    )
    return record.state.value


def _config_axes(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The keys that vary within a variant (the spec's grid keys first), and the grid keys the
    spec declared; adds a typed ``grid.<key>`` column for each.

    Variation is measured over the finished runs (all runs when none finished), so a run left
    half-made by hand does not invent axes. Values are numbers where every value parses as one,
    so axes sort 8 < 16 < 32.
    """
    tag_prefix = f"tags.{TAG}grid."
    declared = sorted(c[len(tag_prefix) :] for c in runs.columns if c.startswith(tag_prefix))
    values = _config_values(runs, declared)
    finished = runs["state"] == "finished"
    population = values[finished] if finished.any() else values
    varying = _varying_within_variants(population, runs.loc[population.index, "variant"])
    axes = [k for k in declared if k in varying] + [k for k in varying if k not in declared]
    for key in dict.fromkeys([*declared, *axes]):
        runs["grid." + key] = _typed(values[key].where(values[key] != UNSET))
    return axes, declared


def _config_values(runs: pd.DataFrame, declared: list[str]) -> pd.DataFrame:
    """One column per config key (every param but the seed), as text; UNSET where not logged.

    A grid key some old run has only as a ``workbench.grid.*`` tag is read from the tag."""
    import pandas as pd

    columns: dict[str, pd.Series] = {}
    for column in runs.columns:
        if column.startswith("params.") and column[7:] not in (
            *SEED_PARAMS,
            *EXECUTION_ONLY,
        ):  # as run keys
            columns[column[7:]] = runs[column]
    for key in declared:
        tag = runs[f"tags.{TAG}grid.{key}"]
        columns[key] = columns[key].fillna(tag) if key in columns else tag
    frame = pd.DataFrame(columns, index=runs.index)
    return frame.astype(object).where(frame.notna(), UNSET)


def _varying_within_variants(values: pd.DataFrame, variant: pd.Series) -> list[str]:
    """Keys with two values or more inside one variant; a derived key (num_params) only where
    the other keys leave points it tells apart."""
    if values.empty:
        return []
    counts = values.groupby(variant.to_numpy()).nunique()
    varying = [str(k) for k in counts.columns[(counts > 1).any()]]
    for key in DERIVED_PARAMS:
        if key not in varying:
            continue
        others = [k for k in varying if k != key]
        if _partitions(values, variant, others) == _partitions(values, variant, varying):
            varying.remove(key)
    return varying


def _partitions(values: pd.DataFrame, variant: pd.Series, keys: list[str]) -> int:
    frame = values[keys].assign(__variant=variant.to_numpy())
    return len(frame.drop_duplicates())


def _typed(values: pd.Series) -> pd.Series:
    """Param text back to the value it was logged from (``8`` → 8, ``1.0`` → 1.0, ``True`` →
    True), one Python object per cell: an int column with a missing cell stays ints, so a label
    reads as the plan's run names do (``8``, not ``8.0``)."""
    return values.map(_param_value, na_action="ignore").astype(object)


def _param_value(text: object) -> object:
    if not isinstance(text, str) or "_" in text or text != text.strip():
        return text  # int() and float() would read "1_0" and " 8", which str() never writes
    if text in ("True", "False"):  # MLflow writes a param with str()
        return text == "True"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _with_history_columns(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Per-run figures that need the curves: last step, tokens trained, tokens/s, wall time."""
    import numpy as np

    runs = runs.copy()
    by_run = history.groupby("run_id")
    runs["last_step"] = by_run["step"].max().reindex(runs.index)
    first_ts, last_ts = by_run["timestamp"].min(), by_run["timestamp"].max()
    elapsed = ((last_ts - first_ts) / 1000.0).reindex(runs.index)
    wall = runs["metrics.wall_time_s"] if "metrics.wall_time_s" in runs else elapsed * np.nan
    runs["wall_time_s"] = wall.fillna(elapsed)
    speed = history[history["metric"] == "tokens_per_sec"].groupby("run_id")["value"].median()
    runs["tokens_per_sec"] = speed.reindex(runs.index)
    runs["tokens"] = runs["last_step"] * runs["train.batch_size"] * runs["train.block_size"]
    return runs
