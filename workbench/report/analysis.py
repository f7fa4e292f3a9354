"""The numbers of the report, as pandas frames: grid points averaged over seeds, the leaderboard,
intervals, comparisons of adjacent rungs. No plotting and no MLflow here.

Intervals are t-based 95% confidence intervals of a mean over seeds: mean ± t(0.975, n-1)·s/√n.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.naming import format_value, short_name

if TYPE_CHECKING:
    import pandas as pd

    from workbench.report.load import ExperimentData

LOSS = "metrics.best_val_loss"


def t_quantile(df: float) -> float:
    """The 0.975 quantile of Student's t with ``df`` (possibly fractional) degrees of freedom."""
    from scipy import stats  # always there: mlflow depends on it

    return float(stats.t.ppf(0.975, df))


def half_width(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values`` (NaN below 2)."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n < 2:
        return math.nan
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return t_quantile(n - 1) * std / math.sqrt(n)


def interval(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of the 95% interval of the mean; the mean twice when there is one value.

    Shaped for seaborn's ``errorbar=`` argument, which accepts such a function.
    """
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return (math.nan, math.nan)
    mean = sum(finite) / len(finite)
    width = half_width(finite)
    width = 0.0 if math.isnan(width) else width
    return (mean - width, mean + width)


def finished(data: ExperimentData) -> pd.DataFrame:
    """The finished runs with a finite best val loss (a NaN loss answers nothing)."""
    import numpy as np

    runs = data.runs
    if LOSS not in runs:
        return runs.iloc[0:0]
    loss = runs[LOSS].astype(float)
    return runs[(runs["state"] == "finished") & np.isfinite(loss)]


def point_label(row: pd.Series, axes: Sequence[str]) -> str:
    """``block_size=8, learning_rate=0.001``: a grid point in words (short key names)."""
    if not axes:
        return "(no grid)"
    return ", ".join(f"{short_name(a, axes)}={format_value(row['grid.' + a])}" for a in axes)


def grid_points(data: ExperimentData) -> pd.DataFrame:
    """One row per variant × grid point over the finished runs: seeds, mean, interval, costs."""
    import pandas as pd

    runs = finished(data)
    keys = ["variant", *("grid." + a for a in data.axes)]
    columns = [*keys, "point", "seeds", "mean", "half_width", "std", "num_params"]
    columns += ["wall_time_s", "tokens_per_sec", "reference_val_loss", "best_run_id"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for values, group in runs.groupby(keys, sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        losses = group[LOSS].astype(float).tolist()
        best = group[LOSS].astype(float).idxmin()
        rows.append(
            {
                **dict(zip(keys, values, strict=True)),
                "point": point_label(group.iloc[0], data.axes),
                "seeds": len(losses),
                "mean": sum(losses) / len(losses),
                "half_width": half_width(losses),
                "std": float(group[LOSS].std()) if len(losses) > 1 else math.nan,
                "num_params": group["num_params"].median(),
                "wall_time_s": group["wall_time_s"].mean(),
                "tokens_per_sec": group["tokens_per_sec"].mean(),
                "reference_val_loss": group["reference_val_loss"].dropna().median(),
                "best_run_id": best,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def leaderboard(data: ExperimentData, points: pd.DataFrame) -> pd.DataFrame:
    """Each variant at its best grid point (lowest mean over seeds), best first."""
    if points.empty:
        return points
    best = points.loc[points.groupby("variant", sort=False)["mean"].idxmin()]
    rung = {v: i for i, v in enumerate(data.variants)}
    best = best.assign(rung=best["variant"].map(rung))
    return best.sort_values(["mean", "rung"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class Comparison:
    """Two adjacent rungs of the ladder, each at its best grid point."""

    lower: str  # the earlier rung
    upper: str  # the later rung
    difference: float  # upper − lower (negative: the later rung is better)
    half_width: float  # of the difference (Welch), NaN with fewer than two seeds on a side
    seeds: tuple[int, int]
    overlap: bool  # the two intervals overlap

    @property
    def resolved(self) -> bool:
        return math.isfinite(self.half_width) and abs(self.difference) > self.half_width

    def sentence(self) -> str:
        head = f"{self.upper} vs {self.lower}: difference {self.difference:+.3f}"
        n1, n2 = self.seeds
        seeds = f"{n1} and {n2} seeds" if n1 != n2 else f"{n1} seed" + ("s" if n1 != 1 else "")
        if not math.isfinite(self.half_width):
            return f"{head}, no interval with {seeds}"
        head += f" ± {self.half_width:.3f}"
        overlap = " (the intervals overlap)" if self.overlap else ""
        if not self.resolved:
            return f"{head}, not resolved with {seeds}{overlap}"
        if self.overlap:
            return f"{head}, resolved with {seeds} although the intervals overlap"
        return f"{head}, resolved with {seeds}"


def adjacent_comparisons(
    data: ExperimentData, board: pd.DataFrame, points: pd.DataFrame
) -> list[Comparison]:
    """Each rung against the one before it on the ladder (both at their best grid point)."""
    runs = finished(data)
    if board.empty:
        return []
    by_variant = board.set_index("variant")
    ladder = [v for v in data.variants if v in by_variant.index]
    comparisons = []
    for lower, upper in itertools.pairwise(ladder):
        a = _losses(runs, by_variant.loc[lower], data.axes)
        b = _losses(runs, by_variant.loc[upper], data.axes)
        if not a or not b:
            continue
        difference = sum(b) / len(b) - sum(a) / len(a)
        ha, hb = half_width(a), half_width(b)
        overlap = bool(math.isfinite(ha) and math.isfinite(hb) and abs(difference) <= ha + hb)
        comparisons.append(
            Comparison(lower, upper, difference, _welch_half_width(a, b), (len(a), len(b)), overlap)
        )
    return comparisons


def same_value(column: pd.Series, value: Any) -> pd.Series:
    """``column == value``, where a missing grid value (NaN) equals a missing one."""
    if isinstance(value, float) and math.isnan(value):
        return column.isna()
    return column == value


def _losses(runs: pd.DataFrame, best: pd.Series, axes: Sequence[str]) -> list[float]:
    mask = runs["variant"] == best.name
    for axis in axes:
        mask &= same_value(runs["grid." + axis], best["grid." + axis])
    return runs.loc[mask, LOSS].astype(float).tolist()


def _welch_half_width(a: Sequence[float], b: Sequence[float]) -> float:
    """95% half-width of mean(b) − mean(a) with Welch's degrees of freedom."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = _variance(a) / len(a), _variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        return 0.0
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t_quantile(df) * math.sqrt(se2)


def _variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def seeds_per_point(points: pd.DataFrame) -> int:
    """The most seeds any grid point has (1: no intervals anywhere)."""
    return int(points["seeds"].max()) if not points.empty else 0


@dataclass(frozen=True)
class PointDifference:
    """Two adjacent rungs at one grid point: later − earlier, over their seeds there."""

    earlier: str
    later: str
    point: str
    difference: float
    half_width: float  # Welch, NaN with fewer than two seeds on a side
    seeds: tuple[int, int]

    @property
    def resolved(self) -> bool:
        return math.isfinite(self.half_width) and abs(self.difference) > self.half_width

    def cell(self) -> str:
        if not math.isfinite(self.half_width):
            return f"{self.difference:+.3f}"
        return f"{self.difference:+.3f} ± {self.half_width:.3f}" + ("" if self.resolved else " ~")


def point_differences(data: ExperimentData, points: pd.DataFrame) -> list[PointDifference]:
    """Each rung against the one before it at every grid point both have finished runs at."""
    runs = finished(data)
    if runs.empty:
        return []
    keys = ["grid." + a for a in data.axes]
    losses: dict[tuple[str, tuple[Any, ...]], list[float]] = {}
    for row in runs[["variant", *keys, LOSS]].itertuples(index=False):
        values = tuple(_missing_as_none(v) for v in row[1:-1])
        losses.setdefault((str(row[0]), values), []).append(float(row[-1]))
    labels = {
        tuple(_missing_as_none(row["grid." + a]) for a in data.axes): str(row["point"])
        for _, row in points.iterrows()
    }
    ladder = [v for v in data.variants if v in set(points["variant"])]
    differences = []
    for earlier, later in itertools.pairwise(ladder):
        for values, label in labels.items():
            a, b = losses.get((earlier, values)), losses.get((later, values))
            if a and b:
                difference = sum(b) / len(b) - sum(a) / len(a)
                width = _welch_half_width(a, b)
                differences.append(
                    PointDifference(earlier, later, label, difference, width, (len(a), len(b)))
                )
    return differences


def _missing_as_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def final_gap(data: ExperimentData) -> pd.DataFrame:
    """Train − val loss at the last eval step of each finished run."""
    import pandas as pd

    history = data.history
    done = finished(data).index
    evals = history[
        history["metric"].isin(["train_loss", "val_loss"]) & history["run_id"].isin(done)
    ]
    if evals.empty:
        return pd.DataFrame(columns=["run_id", "step", "train_loss", "val_loss", "gap"])
    wide = evals.pivot_table(index=["run_id", "step"], columns="metric", values="value")
    wide = wide.dropna(subset=[c for c in ("train_loss", "val_loss") if c in wide]).reset_index()
    if "train_loss" not in wide or "val_loss" not in wide or wide.empty:
        return pd.DataFrame(columns=["run_id", "step", "train_loss", "val_loss", "gap"])
    last = wide.sort_values("step").groupby("run_id").tail(1).set_index("run_id")
    last["gap"] = last["train_loss"] - last["val_loss"]
    runs = data.runs
    last = last.join(runs[["variant", "seed", "state", "run_name", *_grid_columns(data)]])
    return last.reset_index()


def _grid_columns(data: ExperimentData) -> list[str]:
    return ["grid." + a for a in data.axes]
