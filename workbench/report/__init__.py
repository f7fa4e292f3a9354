"""`workbench report`: one self-contained HTML page per experiment, read from MLflow only.

Importing this package is cheap: pandas, matplotlib, seaborn and mlflow load when a report is
written. The modules, in the order data flows: ``load`` (MLflow → tidy frames, with
``history`` for the curves in bulk), ``analysis`` (grid points, leaderboard, intervals),
``figures`` (seaborn → PNG, with ``sensitivity`` and ``attention``), ``page`` (the page's
tables, sentences and figures), ``build`` (the files: HTML page and CSV).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.report.build import Reports


def write_reports(
    tracking_uri: str, experiments: list[str] | None = None, out: Path | None = None
) -> list[Path]:
    """Write ``reports/<experiment>.html`` and ``.csv`` for each experiment; returns the paths."""
    from workbench.report.build import write_reports as write

    return write(tracking_uri, experiments, out)


def report_experiments(
    tracking_uri: str,
    experiments: list[str] | None = None,
    out: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Reports:
    """Like ``write_reports``, but an experiment that cannot be reported is one line in the
    result's ``failures`` while the others are written; ``warn`` hears of runs left out."""
    from workbench.report.build import report_experiments as report

    return report(tracking_uri, experiments, out, warn)
