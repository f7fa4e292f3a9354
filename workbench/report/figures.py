"""The report's figures: seaborn on matplotlib's Agg backend, each returned as a PNG data URI.

Every label that came from a user or a model (variant names, grid values, prompt characters) is
drawn as plain text: mathtext is switched off, so ``$x$`` in a name is two dollar signs.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.naming import format_value, short_name
from workbench.report.analysis import LOSS, interval

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure as MplFigure

    from workbench.report.load import ExperimentData

DPI = 96
RUN_DPI = 120  # the figures a run logs: readable in mlflow ui (curve 504 x 336 px; +20 ms on 72)
PAGE_WIDTH_IN = 11.5  # the page's column is about 1120 px wide
CURVE_SPLITS = {"val_loss": "val", "train_loss": "train"}
SPLIT_DASHES: dict[str, Any] = {"val": "", "train": (4, 2)}  # val solid, train dashed
ATTENTION_CMAP = "magma"
BEST_MEAN = "mean over seeds of best val loss"  # best val loss: a run's min over its evals


@dataclass(frozen=True)
class Figure:
    title: str
    src: str  # data:image/png;base64,...
    alt: str
    width: int  # pixels, as drawn
    height: int


@contextmanager
def plotting() -> Iterator[None]:
    """Agg, a quiet seaborn theme, and no mathtext or TeX in any text drawn inside."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import seaborn as sns

    style = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.9)}
    with plt.rc_context({**style, "text.parse_math": False, "text.usetex": False}):
        yield


@contextmanager
def plain_text() -> Iterator[None]:
    """No mathtext or TeX in text drawn inside, and nothing else changed (a run's figures)."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        yield


def new_figure(width_in: float, height_in: float) -> MplFigure:
    """A figure drawn by Agg outside pyplot: no global state, nothing to close. Importing this
    much of matplotlib (not seaborn, not pyplot) is what a run's figures cost a worker."""
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width_in, height_in))


def png_bytes(figure: MplFigure, dpi: int = RUN_DPI) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def render(figure: MplFigure, title: str, alt: str) -> Figure:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    png = buffer.getvalue()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return Figure(title, src, alt, width, height)


LABEL_CHARS = 40  # a variant name longer than this is shortened where a figure draws it


def drawn_labels(names: Sequence[str]) -> dict[str, str]:
    """Each name as figures draw it: whole up to ``LABEL_CHARS`` characters, else cut with "…"
    (and, where two cuts would read alike, the name's hash after it). A 9000-character name
    would otherwise be a legend wider than the figure. Tables list names whole."""
    import hashlib

    labels: dict[str, str] = {}
    for name in names:
        label = name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"
        if label in labels.values():
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            label = name[: LABEL_CHARS - 10] + "…" + digest
        labels[name] = label
    return labels


def palette(variants: Sequence[str]) -> dict[str, Any]:
    import seaborn as sns

    colors = sns.color_palette("tab10" if len(variants) <= 10 else "husl", len(variants))
    return dict(zip(variants, colors, strict=True))


# --- the answer ----------------------------------------------------------------------------------


def variant_plot(
    data: ExperimentData, board: pd.DataFrame, runs: pd.DataFrame, intervals: bool
) -> Figure:
    """Best val loss per variant at its best grid point: seeds as dots, mean with its 95% interval,
    the published figure as a diamond where there is one."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    order = [v for v in data.variants if v in set(board["variant"])]
    at_best = _runs_at(runs, board, data.axes)
    colors = palette(data.variants)
    figure, ax = plt.subplots(figsize=(7.5, 0.55 * len(order) + 1.4))
    sns.stripplot(
        data=at_best, x=LOSS, y="variant", order=order, hue="variant", palette=colors,
        alpha=0.45, size=5, jitter=0.12, legend=False, ax=ax,
    )  # fmt: skip
    sns.pointplot(
        data=at_best, x=LOSS, y="variant", order=order, hue="variant", palette=colors,
        errorbar=interval if intervals else None, linestyle="none", markers="o",
        capsize=0.25, legend=False, ax=ax,
    )  # fmt: skip
    references = board.dropna(subset=["reference_val_loss"])
    if not references.empty:
        sns.scatterplot(
            data=references, x="reference_val_loss", y="variant", marker="D", s=60,
            color="black", label="published (lecture)", zorder=5, ax=ax,
        )  # fmt: skip
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_xlabel(
        "best val loss of each run (min over its evals)"
        + ("; mean ± 95% CI over seeds" if intervals else "")
    )
    ax.set_ylabel("")
    return render(figure, "Best val loss of each run, per variant", "best val loss per variant")


def _runs_at(runs: pd.DataFrame, board: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """The runs of each variant at its leaderboard grid point."""
    keys = ["variant", *("grid." + a for a in axes)]
    return runs.merge(board[keys], on=keys, how="inner")


# --- curves --------------------------------------------------------------------------------------


def curve_data(data: ExperimentData, runs: pd.DataFrame) -> pd.DataFrame:
    """Val and train loss at eval steps, averaged over seeds, with the wall-clock time."""
    history = data.history
    curves = history[
        history["metric"].isin(list(CURVE_SPLITS)) & history["run_id"].isin(runs.index)
    ]
    if curves.empty:
        return curves
    started = history[history["run_id"].isin(runs.index)].groupby("run_id")["timestamp"].min()
    curves = curves.assign(
        split=curves["metric"].map(CURVE_SPLITS),
        elapsed_s=(curves["timestamp"] - curves["run_id"].map(started)) / 1000.0,
    )
    keys = ["variant", *("grid." + a for a in data.axes)]
    curves = curves.join(runs[keys], on="run_id")
    grouped = curves.groupby([*keys, "split", "step"], sort=False, dropna=False)
    return grouped.agg(value=("value", "mean"), elapsed_s=("elapsed_s", "mean")).reset_index()


def curves_plot(data: ExperimentData, curves: pd.DataFrame, x: str) -> Figure:
    """Val (solid) and train (dashed) loss per variant, one facet per grid point."""
    import seaborn as sns

    curves, facets = _facets(curves, data.axes)
    colors = palette(data.variants)
    order = [v for v in data.variants if v in set(curves["variant"])]
    longest = int(curves.groupby(["variant", "split", *facets_of(facets)]).size().max())
    marker = {"marker": "o", "markersize": 4} if longest < 3 else {}  # a lone point shows
    columns = facets.get("col_wrap") or len(facets.get("col_order", [None]))
    aspect = 1.35
    height = min(2.9, PAGE_WIDTH_IN / (columns * aspect))  # the page shows it near full size
    grid = sns.relplot(
        data=curves, kind="line", x=x, y="value", hue="variant", hue_order=order,
        palette=colors, style="split", style_order=["val", "train"],
        dashes=SPLIT_DASHES, estimator=None, sort=True,
        height=height, aspect=aspect,
        facet_kws={"sharey": True, "sharex": True, "margin_titles": "row" in facets},
        **facets, **marker,
    )  # fmt: skip
    sns.move_legend(
        grid, "lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(order) + 4, title=None,
        frameon=False,
    )  # fmt: skip
    grid.set_axis_labels("step" if x == "step" else "wall-clock time (s)", "loss")
    limits = loss_range(curves)
    if limits is not None:
        grid.set(ylim=limits)
    if facets:
        grid.set_titles(**_title_templates(facets), size=9)
    title = "Loss against step" if x == "step" else "Loss against wall-clock time"
    return render(grid.figure, title, title.lower())


def loss_range(curves: pd.DataFrame) -> tuple[float, float] | None:
    """The y-range of the curves after the first eval (the step-0 loss, ~4.2-4.7, would squash
    the endings that tell variants apart), with a margin; None when there is nothing after it."""
    return loss_limits(curves["step"].to_numpy(dtype=float), curves["value"].to_numpy(dtype=float))


def loss_limits(steps: Any, values: Any) -> tuple[float, float] | None:
    """``loss_range`` on arrays: the y-range of the losses after the first step, or None."""
    import numpy as np

    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.size == 0:
        return None
    later = values[steps > steps.min()]
    later = later[np.isfinite(later)]
    if later.size == 0:
        return None
    low, high = float(later.min()), float(np.quantile(later, 0.98))
    margin = max(0.05 * (high - low), 0.01)
    return (low - margin, high + margin)


def loss_curve_png(history: Sequence[dict[str, float]], title: str) -> bytes | None:
    """One run's val (solid) and train (dashed) loss at its eval steps, the y-range as the
    report's curves have it; None without evals. Drawn at the end of every run: small."""
    lines = {
        split: [(p["step"], p[metric]) for p in history if metric in p and "step" in p]
        for metric, split in CURVE_SPLITS.items()
    }
    if not any(lines.values()):
        return None
    with plain_text():
        figure = new_figure(4.2, 2.8)
        ax = figure.subplots()
        for split, points in lines.items():
            if points:
                steps, values = zip(*points, strict=True)
                style: dict[str, Any] = (
                    {"dashes": SPLIT_DASHES[split]} if SPLIT_DASHES[split] else {}
                )
                if len(points) < 3:  # a lone point shows
                    style.update(marker="o", markersize=3)
                ax.plot(steps, values, label=split, color="C0", **style)
        every = [point for points in lines.values() for point in points]
        limits = loss_limits([s for s, _ in every], [v for _, v in every])
        if limits is not None:
            ax.set_ylim(*limits)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))  # each tick label costs ~1 ms
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        figure.text(0.5, 0.95, title, ha="center", fontsize=9)  # a title costs a layout pass
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
        figure.subplots_adjust(left=0.15, right=0.97, bottom=0.17, top=0.88)
        return png_bytes(figure)


def _facets(frame: pd.DataFrame, axes: Sequence[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Facet arguments for seaborn: rows × columns when every combination of two axes is
    present, else one wrapped facet per grid point that exists (never an empty facet)."""
    labels = {a: short_name(a, axes) for a in axes}
    frame = frame.copy()
    for axis in axes:
        frame[labels[axis]] = frame["grid." + axis].map(format_value)
    values = {a: frame["grid." + a].dropna().unique() for a in axes}
    if not axes:
        return frame, {}
    if len(axes) == 1:
        name = labels[axes[0]]
        order = [format_value(v) for v in sorted(values[axes[0]], key=sort_key)]
        return frame, {"col": name, "col_order": order, "col_wrap": min(len(order), 3)}
    present = frame[["grid." + a for a in axes]].drop_duplicates()
    if len(axes) == 2 and len(present) == len(values[axes[0]]) * len(values[axes[1]]):
        rows, cols = ([format_value(v) for v in sorted(values[a], key=sort_key)] for a in axes)
        return frame, {
            "row": labels[axes[0]], "row_order": rows, "col": labels[axes[1]], "col_order": cols,
        }  # fmt: skip
    frame["grid point"] = frame[[labels[a] for a in axes]].apply(
        lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1
    )
    ordered = frame.sort_values(["grid." + a for a in axes], key=lambda s: s.map(sort_key))
    order = list(dict.fromkeys(ordered["grid point"]))
    return frame, {"col": "grid point", "col_order": order, "col_wrap": min(len(order), 3)}


def facets_of(facets: dict[str, Any]) -> list[str]:
    return [facets[k] for k in ("row", "col") if k in facets]


def _title_templates(facets: dict[str, Any]) -> dict[str, str]:
    if "row" in facets:  # margin titles: columns on top, rows on the right
        return {"row_template": "{row_var}={row_name}", "col_template": "{col_var}={col_name}"}
    if facets.get("col") == "grid point":
        return {"template": "{col_name}"}
    return {"template": "{col_var}={col_name}"}


def sort_key(value: object) -> tuple[int, float, str]:
    """Numbers first, in numeric order (numpy's too), then everything else as text."""
    if isinstance(value, numbers.Real) and not math.isnan(float(value)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


# --- generalisation ------------------------------------------------------------------------------


def gap_plot(data: ExperimentData, gaps: pd.DataFrame) -> Figure:
    """Train − val loss at the last eval of every run, per variant."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    order = [v for v in data.variants if v in set(gaps["variant"])]
    hue_axis = next((a for a in data.axes if gaps["grid." + a].nunique() > 1), None)
    figure, ax = plt.subplots(figsize=(7.5, 0.55 * len(order) + 1.6))
    ax.axvline(0.0, color="0.3", lw=1)
    if hue_axis is None:
        sns.stripplot(data=gaps, x="gap", y="variant", order=order, hue="variant",
                      palette=palette(data.variants), legend=False, ax=ax, size=5)  # fmt: skip
    else:
        label = short_name(hue_axis, data.axes)
        values = sorted(gaps["grid." + hue_axis].dropna().unique(), key=sort_key)
        gaps = gaps.assign(**{label: gaps["grid." + hue_axis].map(format_value)})
        sns.stripplot(data=gaps, x="gap", y="variant", order=order, hue=label,
                      hue_order=[format_value(v) for v in values], palette="crest", dodge=True,
                      ax=ax, size=5)  # fmt: skip
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title=label)
    ax.set_xlabel("train loss − val loss at the last eval (negative: train below val)")
    ax.set_ylabel("")
    return render(figure, "Generalisation gap", "generalisation gap per run")
