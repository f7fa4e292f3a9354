"""The report's tables, their cells formatted as text (the template escapes them): the
leaderboard, every grid point, the rung differences at each point, and the runs that failed or
have not ended."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workbench.naming import human_count
from workbench.report import analysis, text
from workbench.report.load import ExperimentData

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Table:
    """Cells already formatted as text; the template escapes them."""

    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)


def differences_table(data: ExperimentData, points: pd.DataFrame) -> Table | None:
    """Rows: grid points; columns: adjacent rungs, later − earlier, ± the 95% interval."""
    differences = analysis.point_differences(data, points)
    if not differences:
        return None
    pairs = list(dict.fromkeys(f"{d.later} − {d.earlier}" for d in differences))
    cells: dict[str, dict[str, str]] = {}
    for d in differences:
        cells.setdefault(d.point, {})[f"{d.later} − {d.earlier}"] = d.cell()
    rows = [[point, *(by_pair.get(pair, "") for pair in pairs)] for point, by_pair in cells.items()]
    return Table(["grid point", *pairs], rows, [False, *(True for _ in pairs)])


def points_table(data: ExperimentData, points: pd.DataFrame, intervals: bool) -> Table | None:
    """Every grid point of every variant, in ladder order: the pooling laid open."""
    if points.empty:
        return None
    rung = {v: i for i, v in enumerate(data.variants)}
    ordered = points.assign(rung=points["variant"].map(rung)).sort_values("rung", kind="stable")
    rows = []
    for row in ordered.itertuples(index=False):
        cells = [str(row.variant), str(row.point), str(row.seeds), f"{row.mean:.4f}"]
        if intervals:
            cells.append(f"± {row.half_width:.4f}" if math.isfinite(row.half_width) else "")
        rows.append(cells)
    columns = ["variant", "grid point", "seeds", "mean best val loss"]
    columns += ["± 95% CI"] if intervals else []
    return Table(columns, rows, [False, False, True, True, True][: len(columns)])


def no_intervals_reason(board: pd.DataFrame, most_seeds: int) -> str:
    if board.empty or most_seeds >= 2:
        return ""
    return (
        "Every grid point has one finished seed, so there are no confidence intervals: an "
        "interval over seeds needs at least two. Add seeds to the spec to see how much of a "
        "difference is noise."
    )


def board_table(
    data: ExperimentData, board: pd.DataFrame, intervals: bool, reference: bool
) -> Table:
    columns = ["#", "variant", "best grid point", "seeds", "mean best val loss"]
    columns += ["± 95% CI"] if intervals else []
    columns += ["published"] if reference else []
    columns += ["parameters", "wall time", "tokens/s"]
    rows = []
    for rank, row in enumerate(board.itertuples(index=False), start=1):
        cells = [str(rank), str(row.variant), str(row.point), str(row.seeds), f"{row.mean:.4f}"]
        if intervals:
            cells.append(f"± {row.half_width:.4f}" if math.isfinite(row.half_width) else "(1 seed)")
        if reference:
            cells.append(
                f"{row.reference_val_loss:.2f}"
                if row.reference_val_loss == row.reference_val_loss
                else ""
            )
        cells += [
            human_count(row.num_params),
            text.duration(row.wall_time_s),
            human_count(row.tokens_per_sec),
        ]
        rows.append(cells)
    numeric = [c not in ("variant", "best grid point") for c in columns]
    return Table(columns, rows, numeric)


def problems(data: ExperimentData) -> Table | None:
    runs = data.runs
    bad = runs[runs["state"].isin(["failed", "diverged"])].sort_values("run_name")
    if bad.empty:
        return None
    rows = [
        [str(r.run_name), str(r.state), text.step(r.stopped_step, r.last_step), str(r.reason or "")]
        for r in bad.itertuples(index=False)
    ]
    return Table(["run", "state", "stopped at step", "reason"], rows, [False, False, True, False])


def unfinished(data: ExperimentData) -> Table | None:
    runs = data.runs
    live = runs[runs["state"].isin(["killed", "running", "stale"])].sort_values("run_name")
    if live.empty:
        return None
    words = {
        "killed": "killed (interrupted; `workbench run` resumes it)",
        "running": "running",
        "stale": "left RUNNING by a process that is gone (or silent for over 10 minutes)",
    }
    rows = [
        [str(r.run_name), words[str(r.state)], text.step(math.nan, r.last_step)]
        for r in live.itertuples(index=False)
    ]
    return Table(["run", "state", "last step logged"], rows, [False, False, True])
