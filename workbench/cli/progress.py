"""What a sweep shows while it runs (rich), and the summary table at its end."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from workbench.sweep import events
from workbench.sweep.driver import Action, Decision, Summary
from workbench.tracking import RunState


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
            TimeRemainingColumn(),
            console=console,
        )
        self.task: Any = None
        self.names: dict[str, str] = {}
        self.max_iters: dict[str, int] = {}
        self.running: dict[str, dict[str, float]] = {}
        ended = (RunState.FINISHED, RunState.FAILED, RunState.DIVERGED, RunState.KILLED)
        self.counts = {**{state.value: 0 for state in ended}, "skipped": 0}

    def start(self, decisions: list[Decision]) -> None:
        todo = [d for d in decisions if d.action is not Action.SKIP]
        self.counts["skipped"] = len(decisions) - len(todo)
        for d in decisions:
            self.names[d.run.key] = d.run.name
            self.max_iters[d.run.key] = d.run.config.train.max_iters
        self.task = self.bar.add_task("grid", total=len(todo), counts=self._counts())
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
        elif isinstance(event, events.Progress):
            self.running.setdefault(event.key, {}).update({"step": event.step, **event.metrics})
        elif isinstance(event, events.Ended):
            result = event.result
            self.running.pop(event.key, None)
            self.counts[result.status.value] += 1
            self.bar.update(self.task, advance=1)
            if self.live is None:
                self.console.print(
                    f"{result.status.value:>9}  {self.names.get(event.key, event.key)}  "
                    f"best val {_loss(result.best_val_loss)}"
                    + (f"  ({result.reason})" if result.reason else "")
                )
        if self.task is not None:
            self.bar.update(self.task, counts=self._counts())
        if self.live is not None:
            self.live.update(self._render())

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def summary_table(summary: Summary) -> Table:
    table = Table(title="sweep summary", title_justify="left")
    for column in ("run", "status", "best val loss", "time (s)"):
        table.add_column(column, justify="left" if column in ("run", "status") else "right")
    for decision in summary.decisions:
        result = summary.results.get(decision.run.key)
        if result is not None:
            status = result.status.value
            best, wall = result.best_val_loss, result.wall_time_s
            if result.reason and result.status is not RunState.FINISHED:
                status = f"{status}: {result.reason}"
        else:
            skipped = decision.action is Action.SKIP
            status = f"skipped ({decision.state.value})" if skipped else "not started"
            metrics = decision.record.metrics if decision.record else {}
            best, wall = metrics.get("best_val_loss"), metrics.get("wall_time_s")
        table.add_row(
            decision.run.name, status, _loss(best), "-" if wall is None else f"{wall:.1f}"
        )
    return table
