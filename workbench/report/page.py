"""The page's content: every table, sentence and figure of one experiment's report, as the
template's context. The data comes from ``load``, the numbers from ``analysis``, the figures from
``figures``; this module only chooses and formats."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from workbench.naming import format_value, human_count, short_name
from workbench.report import analysis, attention, figures, sensitivity, tables, text
from workbench.report.analysis import LOSS
from workbench.report.load import SEED_PARAMS, STATES, ExperimentData, artifact_text
from workbench.spec import ATTENTION_KINDS
from workbench.tracking import TAG

if TYPE_CHECKING:
    import pandas as pd

SAMPLE_SHOWN_CHARS = 500
MAX_ATTENTION_FIGURES = 6


def page_context(data: ExperimentData) -> dict[str, Any]:
    done = analysis.finished(data)
    points = analysis.grid_points(data)
    board = analysis.leaderboard(data, points)
    most_seeds = analysis.seeds_per_point(points)
    intervals = most_seeds >= 2
    context: dict[str, Any] = {
        "experiment": data.name,
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tracking_uri": data.tracking_uri,
        "header": _header(data),
        "axes": [short_name(a, data.axes) for a in data.axes],
        "intervals": intervals,
        "no_intervals_reason": tables.no_intervals_reason(board, most_seeds),
        "board": None,
        "comparisons": [],
        "differences": tables.differences_table(data, points),
        "points": tables.points_table(data, points, intervals),
        "mixed": _mixed_configs(data),
        "fixed": _fixed(data),
        "provenance": _provenance(data),
        "variant_figure": None,
        "has_reference": bool(board["reference_val_loss"].notna().any()) if len(board) else False,
    }
    with figures.plotting():
        if not board.empty:
            context["board"] = tables.board_table(data, board, intervals, context["has_reference"])
            context["comparisons"] = [
                c.sentence() for c in analysis.adjacent_comparisons(data, board, points)
            ]
            drawn, drawn_board, drawn_done = _drawn(data, board, done)
            context["variant_figure"] = figures.variant_plot(
                drawn, drawn_board, drawn_done, intervals
            )
        context.update(_curves(data, done))
        context.update(_sensitivity(data, done, points, board, intervals))
        context.update(_gap(data))
        context["attention"] = _attention(data, board, done)
    context["problems"] = tables.problems(data)
    context["unfinished"] = tables.unfinished(data)
    context["samples"] = _samples(data, board, done)
    return context


def _header(data: ExperimentData) -> dict[str, Any]:
    runs = data.runs
    counts = {state: int((runs["state"] == state).sum()) for state in STATES}
    starts, ends = runs["start_time"].dropna(), runs["end_time"].dropna()
    when = ""
    if not starts.empty:
        first = starts.min()
        last = ends.max() if not ends.empty else None
        when = first.strftime("%Y-%m-%d %H:%M")
        if last is not None and last == last and last > first:
            when += " – " + last.strftime(
                "%Y-%m-%d %H:%M" if last.date() != first.date() else "%H:%M"
            )
        when += " UTC"
    devices = runs["device"].value_counts()
    seeds = sorted(int(s) for s in runs["seed"].dropna().unique())
    return {
        "runs": len(runs),
        "counts": {state: n for state, n in counts.items() if n or state in STATES[:3]},
        "superseded": data.superseded,
        "when": when,
        "devices": ", ".join(
            f"{name} ({text.plural(int(n), 'run')})" for name, n in devices.items()
        ),
        "training_time": text.duration(float(runs["wall_time_s"].sum(skipna=True))),
        "tokens": human_count(float(runs["tokens"].sum(skipna=True))),
        "variants": len(data.variants),
        "seeds": ", ".join(str(s) for s in seeds),
        "grid": [
            f"{short_name(a, data.axes)}: "
            + ", ".join(
                format_value(v)
                for v in sorted(runs["grid." + a].dropna().unique(), key=figures.sort_key)
            )
            for a in data.axes
        ],
    }


def _mixed_configs(data: ExperimentData) -> str:
    """A warning when runs of one variant differ in keys the spec's grid does not vary."""
    extra = [a for a in data.axes if a not in data.declared]
    if not extra:
        return ""
    finished = analysis.finished(data)
    runs = finished if not finished.empty else data.runs
    variants = [
        v for v in data.variants
        if any(runs.loc[runs["variant"] == v, "grid." + a].nunique(dropna=False) > 1 for a in extra)
    ]  # fmt: skip
    keys = ", ".join(short_name(a, data.axes) for a in extra)
    return (
        f"This experiment mixes configs: runs of {', '.join(variants) or 'some variants'} differ "
        f"in {keys}, which the spec's grid does not vary (runs made with --set, or an edited "
        f"spec). Each config is a separate grid point, labelled by these keys; runs are pooled "
        f"as seeds only when every param but the seed is equal."
    )


def _fixed(data: ExperimentData) -> dict[str, str]:
    """What was held fixed: params equal in every run, and those set by the variant alone."""
    runs = data.runs
    params = sorted(c for c in runs.columns if c.startswith("params."))
    same, by_variant = [], []
    for column in params:
        key = column[len("params.") :]
        if key in SEED_PARAMS or key in data.axes:
            continue
        values = runs[column].dropna().astype(str)
        if values.nunique() == 1 and len(values) == len(runs):
            if values.iloc[0] != "None":
                same.append(f"{key}={_clip(values.iloc[0])}")
        elif runs.groupby("variant")[column].nunique(dropna=False).max() <= 1:
            by_variant.append(key)
    return {"same": ", ".join(same), "by_variant": ", ".join(by_variant)}


def _provenance(data: ExperimentData) -> dict[str, str]:
    """Where the runs came from: spec files, commits, data set and checksum, torch."""
    runs = data.runs

    def distinct(column: str) -> list[str]:
        return sorted(str(v) for v in runs[column].dropna().unique()) if column in runs else []

    # MLflow's source tags, else (older runs, a spec outside any checkout) workbench's own
    sources = {"commit": ("mlflow.source.git.commit", "git_commit"),
               "spec": ("mlflow.source.name", "spec")}  # fmt: skip
    runs = runs.assign(**{column: _first_of(runs, f"tags.{mlflow}", f"tags.{TAG}{ours}")
                          for column, (mlflow, ours) in sources.items()})  # fmt: skip
    commits = []
    for commit in distinct("commit"):
        dirty = runs.loc[runs["commit"] == commit].get(f"tags.{TAG}git_dirty")
        mark = " (uncommitted changes)" if dirty is not None and (dirty == "true").any() else ""
        commits.append(commit[:12] + mark)
    data_sets = distinct("params.data.dataset") + distinct("params.data.path")
    return {
        "spec": ", ".join(distinct("spec")),
        "commit": ", ".join(commits),
        "data": ", ".join(v for v in data_sets if v != "None"),
        "checksum": ", ".join(_clip(v, 16) for v in distinct("params.data_sha256")),
        "torch": ", ".join(distinct(f"tags.{TAG}torch_version")),
    }


def _first_of(runs: pd.DataFrame, *columns: str) -> pd.Series:
    """Per run, the first of ``columns`` that has a value."""
    present = [runs[c] for c in columns if c in runs]
    if not present:
        return runs["run_id"].map(lambda _: None)
    values = present[0]
    for more in present[1:]:
        values = values.fillna(more)
    return values


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _drawn(data: ExperimentData, *frames: pd.DataFrame) -> tuple[Any, ...]:
    """``data`` and ``frames`` as figures draw them: long variant names shortened
    (``figures.drawn_labels``) in ``variants`` and every ``variant`` column."""
    labels = figures.drawn_labels(data.variants)
    if all(name == label for name, label in labels.items()):
        return (data, *frames)

    def relabel(frame: pd.DataFrame) -> pd.DataFrame:
        if "variant" not in frame.columns:
            return frame
        return frame.assign(variant=frame["variant"].map(lambda v: labels.get(v, v)))

    drawn = dataclasses.replace(data, variants=list(labels.values()), runs=relabel(data.runs))
    return (drawn, *(relabel(frame) for frame in frames))


def _curves(data: ExperimentData, done: pd.DataFrame) -> dict[str, Any]:
    shown = done if not done.empty else data.runs
    data, curves = _drawn(data, figures.curve_data(data, shown))
    if curves.empty:
        return {"curve_figures": [], "curves_note": "No run logged an evaluation yet."}
    note = "Mean over seeds at each eval step."
    if figures.loss_range(curves) is not None:
        note += (
            " The y axis shows the losses after the first eval (up to their 98th percentile):"
            " the step-0 loss is above it."
        )
    if done.empty:
        note = "No run finished: these are the curves of the unfinished runs, as far as they got."
    return {
        "curve_figures": [
            figures.curves_plot(data, curves, "step"),
            figures.curves_plot(data, curves, "elapsed_s"),
        ],
        "curves_note": note,
    }


def _sensitivity(
    data: ExperimentData,
    done: pd.DataFrame,
    points: pd.DataFrame,
    board: pd.DataFrame,
    intervals: bool,
) -> dict[str, Any]:
    result: dict[str, Any] = {"heatmap": None, "axis_lines": None, "sensitivity_note": ""}
    if points.empty:
        result["sensitivity_note"] = "No run finished, so there is nothing to compare."
        return result
    if not data.axes:
        result["sensitivity_note"] = "The grid varies nothing but the variant and the seed."
        return result
    by_size = sorted(data.axes, key=lambda a: -points["grid." + a].nunique())
    notes = []
    if len(by_size) >= 2:
        pair = (by_size[0], by_size[1])
        drawn, drawn_points, drawn_board = _drawn(data, points, board)
        result["heatmap"] = sensitivity.heatmaps(drawn, drawn_points, drawn_board, pair)
        others = [short_name(a, data.axes) for a in data.axes if a not in pair]
        if others:
            notes.append(f"Heatmaps hold {', '.join(others)} at each variant's best value.")
        notes.append("Each cell is the mean over seeds; the red box is the best cell.")
    drawn, drawn_done, drawn_points = _drawn(data, done, points)
    result["axis_lines"] = sensitivity.axis_lines(drawn, drawn_done, drawn_points, intervals)
    if len(data.axes) > 1:
        notes.append(
            "Along each axis, every point is at the best values of the other axes"
            + (", with its 95% interval over seeds." if intervals else ".")
        )
    result["sensitivity_note"] = " ".join(notes)
    return result


def _gap(data: ExperimentData) -> dict[str, Any]:
    gaps = analysis.final_gap(data)
    if gaps.empty:
        return {"gap_figure": None, "gap_table": None}
    summary = gaps.groupby("variant")["gap"].agg(["mean", "min", "max", "count"])
    order = [v for v in data.variants if v in summary.index]
    rows = [
        [v, f"{summary.loc[v, 'mean']:+.4f}", f"{summary.loc[v, 'min']:+.4f}",
         f"{summary.loc[v, 'max']:+.4f}", str(int(summary.loc[v, "count"]))]
        for v in order
    ]  # fmt: skip
    table = tables.Table(
        ["variant", "mean gap", "min", "max", "runs"], rows, [False, True, True, True, True]
    )
    drawn, drawn_gaps = _drawn(data, gaps)
    return {"gap_figure": figures.gap_plot(drawn, drawn_gaps), "gap_table": table}


def _best_runs(board: pd.DataFrame, done: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    return [(str(row.variant), done.loc[row.best_run_id]) for row in board.itertuples(index=False)]


def _samples(data: ExperimentData, board: pd.DataFrame, done: pd.DataFrame) -> list[dict[str, Any]]:
    order = {v: i for i, v in enumerate(data.variants)}
    samples = []
    for variant, run in sorted(_best_runs(board, done), key=lambda pair: order.get(pair[0], 0)):
        text = artifact_text(data.tracking_uri, str(run["run_id"]), "sample.txt")
        if text is None:
            continue
        samples.append(
            {
                "variant": variant,
                "run": str(run["run_name"]),
                "loss": f"{float(run[LOSS]):.3f}",
                "text": text[:SAMPLE_SHOWN_CHARS],
            }
        )
    return samples


def _attention(
    data: ExperimentData, board: pd.DataFrame, done: pd.DataFrame
) -> list[dict[str, Any]]:
    best = [
        (v, r)
        for v, r in _best_runs(board, done)
        if str(r.get("params.model.kind")) in ATTENTION_KINDS
    ]
    order = {v: i for i, v in enumerate(data.variants)}
    shown = []
    for variant, run in sorted(best, key=lambda pair: order.get(pair[0], 0))[
        :MAX_ATTENTION_FIGURES
    ]:
        text = artifact_text(data.tracking_uri, str(run["run_id"]), "attention.json")
        if text is None:
            continue
        try:
            payload = json.loads(text)
            figure = attention.attention_plot(
                f"{variant} ({run['run_name']})", str(payload["prompt"]), payload["weights"]
            )
        except (ValueError, KeyError, TypeError):
            continue
        shown.append({"variant": variant, "run": str(run["run_name"]), "figure": figure,
                      "prompt": str(payload["prompt"])})  # fmt: skip
    return shown
