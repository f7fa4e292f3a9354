"""One experiment → one self-contained HTML page (Jinja2, autoescaped) and its tidy CSV."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError, first_line
from workbench.report import page
from workbench.report.load import (
    ExperimentData,
    ReportError,
    experiments_with_runs,
    load_experiment,
    tidy,
)
from workbench.tracking import (
    TAG,
    client,
    end_dead_parents,
    int_tag,
    parent_runs,
    store_error_types,
)

if TYPE_CHECKING:
    pass

MAX_SLUG = 80  # characters of an experiment's name kept in its file name


@dataclass
class Reports:
    """What one ``workbench report`` wrote, and one line per experiment it could not report."""

    paths: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def report_experiments(
    tracking_uri: str,
    experiments: list[str] | None = None,
    out: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Reports:
    """Write ``<slug>.html`` and ``<slug>.csv`` for each experiment (every experiment with
    workbench runs when none is named). An experiment that cannot be reported is one line in
    ``failures`` and the others are still written; ``warn`` hears of runs left out."""
    names = list(dict.fromkeys(experiments or [])) or experiments_with_runs(tracking_uri)
    if not names:
        raise ReportError(f"{tracking_uri}: no experiment with workbench runs")
    targets = output_paths(out, names)
    if experiments:
        _check_named(tracking_uri, names)
    reports = Reports()
    for name in names:
        try:
            reports.paths += _write_one(tracking_uri, name, targets[name], warn)
        except ReportError as exc:
            reports.failures.append(f"{name}: not reported: {exc}")
        except Exception as exc:  # a bug must cost one page, not every page and a traceback
            reports.failures.append(
                f"{name}: not reported: {type(exc).__name__}: {first_line(exc)}"
            )
    return reports


def write_reports(
    tracking_uri: str, experiments: list[str] | None = None, out: Path | None = None
) -> list[Path]:
    """``report_experiments`` for callers that want every page or an error: the paths written,
    or a ReportError naming each experiment that could not be reported."""
    reports = report_experiments(tracking_uri, experiments, out)
    if reports.failures:
        raise ReportError("; ".join(reports.failures))
    return reports.paths


def _check_named(tracking_uri: str, names: list[str]) -> None:
    """Every experiment named exists and has workbench runs, before anything is written."""
    known = experiments_with_runs(tracking_uri)
    missing = [n for n in names if n not in known]
    if missing:
        listed = ", ".join(repr(n) for n in missing)
        raise ReportError(
            f"{tracking_uri}: no experiment named {listed} "
            f"(with workbench runs: {', '.join(known) or 'none'})"
        )


def _write_one(
    tracking_uri: str, name: str, html_path: Path, warn: Callable[[str], None] | None
) -> list[Path]:
    data = load_experiment(tracking_uri, name)
    for line in data.skipped:
        if warn is not None:
            warn(line)
    csv_path = html_path.with_suffix(".csv")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tidy(data).to_csv(csv_path, index=False)
    data.load_seconds["csv"] = time.perf_counter() - started
    html_path.write_text(render_page(data, csv_name=csv_path.name), encoding="utf-8")
    attach_to_parent(data, html_path, csv_path, warn)
    return [html_path, csv_path]


def attach_to_parent(
    data: ExperimentData, html_path: Path, csv_path: Path, warn: Callable[[str], None] | None
) -> str | None:
    """The page and its CSV, also as artifacts of the experiment's latest parent run (the one
    a sweep opened last), under ``report/<slug>.html`` and ``.csv``: each report replaces the
    previous one there, and mlflow ui renders the page. An experiment without a parent run (a
    store from before parents) gets none; a store that refuses the write is a warning, and the
    files are written all the same. Returns the parent's run id, if it got the report."""
    errors: tuple[type[BaseException], ...] = (WorkbenchError, *store_error_types())
    try:
        mlflow_client = client(data.tracking_uri)
        end_dead_parents(mlflow_client, data.experiment_id)  # a killed sweep's, still RUNNING
        parents = parent_runs(mlflow_client, data.experiment_id)
        if not parents:
            return None
        latest = max(parents, key=_opened)
        run_id = str(latest.info.run_id)
        stem = slug(data.name)
        with tempfile.TemporaryDirectory(prefix="workbench-report-") as folder:
            shutil.copyfile(html_path, Path(folder) / f"{stem}.html")
            shutil.copyfile(csv_path, Path(folder) / f"{stem}.csv")
            mlflow_client.log_artifacts(run_id, folder, "report")
    except errors as exc:
        if warn is not None:
            warn(f"{data.name}: the report is not attached to its sweep's run: {first_line(exc)}")
        return None
    return run_id


def _opened(run: Any) -> int:
    """When a parent run was last opened by a sweep (seconds): its heartbeat, else its start."""
    return int_tag(run.data.tags, TAG + "heartbeat") or (run.info.start_time or 0) // 1000


def output_paths(out: Path | None, names: list[str]) -> dict[str, Path]:
    """``reports/<slug>.html`` by default; ``out`` is the file itself if it ends with
    ``.html`` (one experiment only), else a folder. A name is never a path: see ``slug``."""
    if out is not None and out.suffix.lower() == ".html":
        if len(names) != 1:
            raise ReportError(
                f"--out {out}: one file, but {len(names)} experiments to report on "
                f"({', '.join(names)}); give a folder or name one --experiment"
            )
        return {names[0]: out}
    folder = Path("reports") if out is None else out
    stems = {name: slug(name) for name in names}
    clashes = Counter(stem.lower() for stem in stems.values())  # a.html and A.html: one file
    return {
        name: folder / f"{slug(name, hashed=clashes[stem.lower()] > 1)}.html"
        for name, stem in stems.items()
    }


def slug(name: str, hashed: bool = False) -> str:
    """A file name for an experiment: its name where that is already a safe, short file name
    (``ablation``), else the readable part of it plus a hash of the whole name, so two names
    never share a file (``../../x`` → ``x-1b2c3d4e``, ``/abs/path`` → ``abs_path-…``)."""
    readable = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._-")[:MAX_SLUG]
    if readable == name and not hashed and not _reserved(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{readable or 'experiment'}-{digest}"


def _reserved(name: str) -> bool:
    """Names that are safe characters but still not a file of their own on every system."""
    windows = {"con", "prn", "aux", "nul", *(f"{d}{i}" for d in ("com", "lpt") for i in range(10))}
    return name.split(".")[0].lower() in windows


def render_page(data: ExperimentData, csv_name: str) -> str:
    import jinja2

    started = time.perf_counter()
    context = page.page_context(data)
    context["csv_name"] = csv_name
    context["timings"] = {**data.load_seconds, "page": time.perf_counter() - started}
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("workbench", "report"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template("template.html.j2").render(**context)
