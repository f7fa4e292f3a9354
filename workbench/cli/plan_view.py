"""The plan as a rich table: one row per run, then totals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workbench.cli.estimate import StepTimes
from workbench.grid import Plan
from workbench.naming import format_value, human_count, short_names
from workbench.store import client, store_errors
from workbench.sweep.driver import Action, Decision, Options, decide
from workbench.tracking import RunRecord, RunState


def make_console() -> Console:
    console = Console()
    if not console.is_terminal:  # logs and pipes: don't fold run names at 80 columns
        console.width = max(console.width, 200)
    return console


def plan_table(
    plan: Plan, params: Mapping[str, int], status: Mapping[str, RunState] | None = None
) -> Table:
    names = short_names(plan.varying_keys)
    table = Table(title=f"{plan.experiment}: {len(plan.runs)} runs", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("run", overflow="fold")
    table.add_column("kind", no_wrap=True)
    for key in plan.varying_keys:
        table.add_column(names[key], justify="right")
    table.add_column("seed", justify="right")
    table.add_column("params", justify="right")
    table.add_column("tokens", justify="right")
    if status is not None:
        table.add_column("status")
    for i, run in enumerate(plan.runs, start=1):
        row = [str(i), run.name, str(run.config.model.kind)]
        row += [format_value(run.varying[k]) for k in plan.varying_keys]
        row += [str(run.seed), f"{params[run.key]:,}", human_count(run.tokens)]
        if status is not None:
            row.append(status.get(run.key, RunState.TO_DO).value)
        table.add_row(*row)
    return table


@dataclass(frozen=True)
class Left:
    """What a ``workbench run`` would do now: runs per outcome, and what is left to train."""

    finished: int = 0
    resume: int = 0
    train: int = 0
    failed: int = 0  # failed or diverged, skipped without --rerun-failed
    running: int = 0  # held by another live process
    tokens: int = 0
    seconds: float | None = None  # estimated from finished runs; None: nothing to go by
    measured: int = 0  # finished runs the estimate comes from


def what_is_left(
    plan: Plan,
    records: Mapping[str, RunRecord],
    tracking_uri: str,
    force: bool = False,
    rerun_failed: bool = False,
) -> Left:
    """The runs a ``workbench run`` with these flags would skip, resume and train, and the
    tokens and estimated time of what it would train (a resume only the steps it lacks)."""
    options = Options(tracking_uri, Path(), Path(), force=force, rerun_failed=rerun_failed)
    decisions = decide(plan, dict(records), options)
    counts = {"finished": 0, "resume": 0, "train": 0, "failed": 0, "running": 0}
    times = StepTimes.of(records.values())
    tokens, seconds = 0, 0.0
    unknown = False
    for decision in decisions:
        outcome = _outcome(decision)
        counts[outcome] += 1
        if outcome in ("train", "resume"):
            steps = _steps_left(decision, tracking_uri)
            train = decision.run.config.train
            tokens += steps * train.batch_size * train.block_size
            estimate = times.seconds(decision.run, steps)
            unknown = unknown or estimate is None
            seconds += estimate or 0.0
    return Left(**counts, tokens=tokens, seconds=None if unknown else seconds,
                measured=times.measured)  # fmt: skip


def _outcome(decision: Decision) -> str:
    """Which of :class:`Left`'s counts a decision adds to."""
    if decision.action is Action.NEW:
        return "train"
    if decision.action is Action.RESUME:
        return "resume"
    if decision.state in (RunState.FINISHED, RunState.RUNNING):
        return decision.state.value
    return "failed"


def _steps_left(decision: Decision, tracking_uri: str) -> int:
    """A run's steps; for a resume, those after its last stored evaluation."""
    run, record = decision.run, decision.record
    if decision.action is not Action.RESUME or record is None:
        return run.config.train.max_iters
    with store_errors(tracking_uri):
        history = client(tracking_uri).get_metric_history(record.run_id, "val_loss")
    done = max((m.step for m in history), default=0)
    return max(0, run.config.train.max_iters - done)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def left_lines(plan: Plan, left: Left | None) -> list[str]:
    """The plan's totals: what a run would do, then the tokens and time of what is left."""
    if left is None:  # the store was not read
        tokens = sum(run.tokens for run in plan.runs)
        return [
            f"{len(plan.runs)} runs, store not read: all counted as to train",
            f"left: {human_count(tokens)} tokens, time unknown",
        ]
    counts = f"{left.finished} finished, {left.resume} to resume, {left.train} to train"
    if left.failed:
        counts += f", {left.failed} failed or diverged (skipped; --rerun-failed retries them)"
    if left.running:
        counts += f", {left.running} running in another process"
    if not left.train and not left.resume:
        return [f"{len(plan.runs)} runs: {counts}", "nothing left to train"]
    if left.seconds is None:
        time = "time unknown until a run has finished"
    else:
        time = (
            f"about {duration(left.seconds)} one run at a time "
            f"(from the step times of {left.measured} finished runs)"
        )
    return [f"{len(plan.runs)} runs: {counts}", f"left: {human_count(left.tokens)} tokens, {time}"]


def print_plan(
    plan: Plan,
    status: Mapping[str, RunState] | None = None,
    console: Console | None = None,
    left: Left | None = None,
) -> None:
    from workbench.cli.counts import parameter_counts  # imports torch

    console = console or make_console()
    params = parameter_counts(plan.runs)
    console.print(plan_table(plan, params, status))
    first, second = left_lines(plan, left)
    notes = [first]
    if plan.excluded:
        notes.append(f"{plan.excluded} excluded")
    if plan.duplicates:
        notes.append(f"{len(plan.duplicates)} identical runs dropped")
    console.print(", ".join(notes))
    for dropped, kept in plan.duplicates[:5]:
        console.print(f"  identical: {dropped} = {kept}", style="dim")
    if len(plan.duplicates) > 5:
        console.print(f"  ... and {len(plan.duplicates) - 5} more", style="dim")
    console.print(second)
