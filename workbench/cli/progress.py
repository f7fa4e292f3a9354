"""What a sweep shows while it runs (rich), from the data's download to the summary at its end.

The time left is estimated from seconds per step, per model shape (:mod:`workbench.cli.estimate`):
measured on the runs of this sweep as they report their steps, else from the plan's finished
runs as ``plan`` estimates; the steps each unfinished run has left, at its shape's rate, divided
among the runs that train at once. It is labelled, and says "estimating" until it has a rate for
every shape.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from workbench.cli.estimate import StepTimes, params_of, shape_of
from workbench.cli.plan_view import duration
from workbench.grid import Plan, Run
from workbench.sweep import events
from workbench.sweep.driver import Action, Decision, Summary
from workbench.tracking import RunState

if TYPE_CHECKING:
    from workbench.sweep.driver import Options
    from workbench.sweep.executors import Executor

REFRESH_S = 0.25  # the live display's redraws, at most
SUMMARY_ROWS = 30  # a longer sweep's summary lists only the runs that did not finish


def _loss(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


class SweepProgress:
    """One bar for the grid and a live line per running run; quiet lines when not a terminal."""

    def __init__(self, console: Console, live: bool) -> None:
        self.console = console
        self.live_enabled = live
        self.live: Live | None = None
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("[dim]{task.fields[left]}"),
            console=console,
        )
        self.task: Any = None
        self.names: dict[str, str] = {}
        self.max_iters: dict[str, int] = {}
        self.running: dict[str, dict[str, float]] = {}
        ended = (RunState.FINISHED, RunState.FAILED, RunState.DIVERGED, RunState.KILLED)
        self.counts = {**{state.value: 0 for state in ended}, "skipped": 0}
        self.shapes: dict[str, str] = {}  # run key → its shape
        self.of_shape: dict[str, Run] = {}  # shape → a run of it (what StepTimes estimates)
        self.left_steps: dict[str, int] = {}  # runs not ended → steps left
        self.prior = StepTimes({}, {})  # the experiment's finished runs
        self.seen: dict[str, tuple[int, float]] = {}  # running run → its first (step, time)
        self.rates: dict[str, dict[str, float]] = {}  # shape → run key → seconds per step
        self.at_once = 1  # the most runs seen training at once
        self.shown_at = 0.0  # when the live display was last redrawn

    def start(self, decisions: list[Decision]) -> None:
        todo = [d for d in decisions if d.action is not Action.SKIP]
        self.counts["skipped"] = len(decisions) - len(todo)
        for d in decisions:
            self.names[d.run.key] = d.run.name
            self.max_iters[d.run.key] = d.run.config.train.max_iters
            self.shapes[d.run.key] = shape_of(params_of(d.run))
            self.of_shape.setdefault(self.shapes[d.run.key], d.run)
        self.left_steps = {d.run.key: d.run.config.train.max_iters for d in todo}
        self.prior = StepTimes.of(d.record for d in decisions if d.record is not None)
        self.task = self.bar.add_task(
            "grid", total=len(todo), counts=self._counts(), left=self._left()
        )
        if not todo:  # the summary says it in one line
            return
        claimed = sum(d.state is RunState.CLAIMED for d in decisions)
        if self.counts["skipped"] - claimed:
            self.console.print(
                f"{self.counts['skipped'] - claimed} runs already finished or failed: skipped"
            )
        if claimed:
            self.console.print(
                f"{claimed} runs are being trained by another workbench process: skipped "
                "(run again once it ends to pick up any it could not finish)"
            )
        if self.live_enabled and todo:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.start()

    def _counts(self) -> str:
        running = len(self.running)
        shown = {k: v for k, v in self.counts.items() if v}
        return " ".join([f"running {running}"] + [f"{k} {v}" for k, v in shown.items()])

    def _left(self) -> str:
        """``about 3m 20s left``, or ``time left: estimating``: each shape's steps left at its
        seconds per step as this sweep's runs measure it, else as the store's finished runs do
        (``StepTimes``, as ``plan`` estimates)."""
        if not self.left_steps:
            return ""
        steps_left: dict[str, int] = {}
        for key, steps in self.left_steps.items():
            steps_left[self.shapes[key]] = steps_left.get(self.shapes[key], 0) + steps
        total = 0.0
        for shape, steps in steps_left.items():
            measured = self.rates.get(shape)
            if measured:
                total += statistics.median(measured.values()) * steps
                continue
            estimate = self.prior.seconds(self.of_shape[shape], steps)
            if estimate is None:
                return "time left: estimating"
            total += estimate
        at_once = max(1, min(self.at_once, len(self.left_steps)))
        return f"about {duration(total / at_once)} left"

    def _step(self, key: str, step: int) -> None:
        """A run's progress: its steps left, and its shape's measured seconds per step."""
        now = time.monotonic()
        self.left_steps[key] = max(0, self.max_iters.get(key, 0) - step)
        first = self.seen.setdefault(key, (step, now))
        if step > first[0] and now > first[1]:
            rate = (now - first[1]) / (step - first[0])
            self.rates.setdefault(self.shapes[key], {})[key] = rate

    def _render(self) -> Group:
        table = Table(box=None, show_header=bool(self.running), pad_edge=False)
        for column in ("run", "step", "train", "val", "tok/s"):
            table.add_column(column, justify="left" if column == "run" else "right")
        for key, state in self.running.items():
            step = int(state.get("step", 0))
            table.add_row(
                self.names.get(key, key),
                f"{step}/{self.max_iters.get(key, 0)}",
                _loss(state.get("train_loss_smooth")),
                _loss(state.get("val_loss")),
                f"{state['tokens_per_sec']:,.0f}" if "tokens_per_sec" in state else "-",
            )
        return Group(self.bar, table)

    def event(self, event: events.Event) -> None:
        if isinstance(event, events.Started):
            self.running[event.key] = {}
            self.at_once = max(self.at_once, len(self.running))
        elif isinstance(event, events.Progress):
            self.running.setdefault(event.key, {}).update({"step": event.step, **event.metrics})
            self._step(event.key, event.step)
        elif isinstance(event, events.Ended):
            result = event.result
            self.running.pop(event.key, None)
            self.left_steps.pop(event.key, None)
            self.seen.pop(event.key, None)
            self.counts[result.status.value] += 1
            self.bar.update(self.task, advance=1)
            if self.live is None:
                self.console.print(
                    f"{result.status.value:>9}  {self.names.get(event.key, event.key)}  "
                    f"best val {_loss(result.best_val_loss)}"
                    + (f"  ({result.reason})" if result.reason else "")
                )
        if self.live is None:  # nothing shows the bar: no estimate to compute
            return
        now = time.monotonic()
        if isinstance(event, events.Progress) and now - self.shown_at < REFRESH_S:
            return  # progress arrives every few steps of every run: redraw a few times a second
        self.shown_at = now
        self.bar.update(self.task, counts=self._counts(), left=self._left())
        self.live.update(self._render())

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def print_summary(console: Console, summary: Summary, experiment: str, wall_s: float) -> None:
    """The runs this sweep trained (all of them up to ``SUMMARY_ROWS``, else those that did not
    finish), then one totals line; a sweep with nothing to do is one line."""
    decisions = summary.decisions
    if all(d.action is Action.SKIP for d in decisions):
        console.print(nothing_to_do(experiment, decisions))
        return
    trained = [d for d in decisions if d.run.key in summary.results]
    shown = trained if len(trained) <= SUMMARY_ROWS else [
        d for d in trained if summary.results[d.run.key].status is not RunState.FINISHED
    ]  # fmt: skip
    if shown:
        console.print(_table(summary, shown))
    console.print(totals_line(summary, experiment, wall_s))


def nothing_to_do(experiment: str, decisions: list[Decision]) -> str:
    states = [d.state for d in decisions]
    done = sum(s is RunState.FINISHED for s in states)
    line = f"{experiment}: nothing to do, {done} of {len(decisions)} runs finished"
    failed = sum(s in (RunState.FAILED, RunState.DIVERGED) for s in states)
    if failed:
        line += f", {failed} failed or diverged (--rerun-failed retries them)"
    claimed = sum(s is RunState.CLAIMED for s in states)
    if claimed:
        line += f", {claimed} being trained by another workbench process"
    return line + " (--force retrains)" if done == len(decisions) else line


def totals_line(summary: Summary, experiment: str, wall_s: float) -> str:
    """``ablation: 135 runs: 130 finished, 2 failed, ... in 4m 12s; best: NAME (val 1.9321)``."""
    counts = {"finished": 0, "failed": 0, "diverged": 0, "stopped": 0}
    for result in summary.results.values():
        word = "stopped" if result.status is RunState.KILLED else result.status.value
        counts[word] = counts.get(word, 0) + 1
    skipped = sum(d.action is Action.SKIP for d in summary.decisions)
    not_started = len(summary.decisions) - skipped - len(summary.results)
    parts = [f"{n} {word}" for word, n in counts.items() if n or word == "finished"]
    if skipped:
        parts.append(f"{skipped} skipped")
    if not_started:
        parts.append(f"{not_started} not started")
    runs = len(summary.decisions)
    line = f"{experiment}: {runs} run{'s' * (runs != 1)}: {', '.join(parts)}, in {duration(wall_s)}"
    names = {d.run.key: d.run.name for d in summary.decisions}
    finished = [(r.best_val_loss, key) for key, r in summary.results.items()
                if r.status is RunState.FINISHED and r.best_val_loss is not None
                and math.isfinite(r.best_val_loss)]  # fmt: skip
    if finished:
        best, key = min(finished)
        line += f"; best of this sweep: {names[key]} (best val loss {best:.4f})"
    return line


def _table(summary: Summary, decisions: list[Decision]) -> Table:
    table = Table(title="sweep summary", title_justify="left")
    for column in ("run", "status", "best val loss", "time (s)"):
        table.add_column(column, justify="left" if column in ("run", "status") else "right")
    for decision in decisions:
        result = summary.results[decision.run.key]
        status = result.status.value
        if result.reason and result.status is not RunState.FINISHED:
            status = f"{status}: {result.reason}"
        wall = result.wall_time_s
        table.add_row(
            decision.run.name,
            status,
            _loss(result.best_val_loss),
            "-" if wall is None else f"{wall:.1f}",
        )
    return table


def download_data(plan: Plan, data_dir: Path) -> None:
    """Download the known data sets the runs need and the cache lacks, with a progress bar
    (the driver checks every cached copy's checksum before training)."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    from workbench.datasets import KNOWN_DATASETS, fetch_known

    for name in sorted({r.config.data.dataset for r in plan.runs if r.config.data.dataset}):
        if (data_dir / KNOWN_DATASETS[name].filename).exists():
            continue
        with Progress(
            *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True
        ) as bar:
            task = bar.add_task(f"downloading {name}", total=None)

            def advance(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)  # noqa: B023

            fetch_known(name, data_dir, progress=advance)


def sweep_with_progress(
    expanded: Plan, chosen: Executor, options: Options, console: Console, live: bool
) -> int:
    """Run the sweep with its progress display, print the summary; returns the exit code."""
    from workbench.sweep.driver import run_sweep
    from workbench.sweep.executors.local import raise_keyboard_interrupt

    display = SweepProgress(console, live=live)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # SIGTERM: the same as Ctrl-C
    started = time.monotonic()
    try:
        summary = run_sweep(expanded, chosen, options, display.event, display.start)
    finally:
        display.stop()
    print_summary(console, summary, expanded.experiment, time.monotonic() - started)
    if summary.interrupted:
        console.print("interrupted: the next `workbench run` resumes from the checkpoints")
    return summary.exit_code
