"""The sweep driver, shared by every executor: what to train, skip or resume against the store;
MLflow runs created before their job starts; progress; the summary and the exit code."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from workbench.grid import Plan, Run
from workbench.spec import applicable_config
from workbench.sweep.claims import Claims
from workbench.sweep.events import CrashFn, Ended, Event, EventFn
from workbench.sweep.jobs import Job, JobResult, JobStatus, ended_result
from workbench.tracking import (
    TAG,
    RunRecord,
    RunState,
    base_tags,
    client,
    ensure_experiment,
    existing_runs,
    experiment_slug,
    flatten,
    git_state,
    sqlite_path,
    store_error_types,
    store_errors,
)


class Executor(Protocol):
    def run(
        self,
        items: list[Any],
        prepare: Callable[[Any], Job],
        on_event: EventFn,
        on_crash: CrashFn,
    ) -> list[JobResult]: ...


@dataclass(frozen=True)
class Options:
    tracking_uri: str
    checkpoint_dir: Path
    data_dir: Path
    force: bool = False
    rerun_failed: bool = False
    # torch threads of a run that sets no train.threads. A run's float sums depend on it, so it
    # comes from the executor's slots (never from how many runs are left), is recorded with
    # the run and reused by its resume.
    threads_per_job: int = 1
    checkpoint_every_s: float = 10.0


class Action(str, Enum):
    """What the driver does with a run."""

    NEW = "new"  # create a run in the store and train it from step 0
    RESUME = "resume"  # continue the run in the store from its checkpoint
    SKIP = "skip"

    def __str__(self) -> str:
        return self.value


@dataclass
class Decision:
    run: Run
    action: Action
    state: RunState  # what the store says, or TO_DO, or CLAIMED by another live process
    record: RunRecord | None = None


@dataclass
class Summary:
    experiment_id: str
    sweep_id: str
    decisions: list[Decision]
    results: dict[str, JobResult] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        bad = {RunState.FAILED, RunState.DIVERGED, RunState.KILLED}
        return 1 if any(r.status in bad for r in self.results.values()) else 0


def plan_records(plan: Plan, tracking_uri: str) -> dict[str, RunRecord]:
    """Run key → the newest run of it in the store, for ``plan`` and ``run --dry-run``.

    Reads the store without creating anything: a store or experiment that does not exist yet
    means every run is still to do.
    """
    database = sqlite_path(tracking_uri)
    if database is not None and not database.exists():
        return {}
    with store_errors(tracking_uri):
        experiment = client(tracking_uri).get_experiment_by_name(plan.experiment)
        if experiment is None:
            return {}
        return existing_runs(tracking_uri, experiment.experiment_id)


def decide(
    plan: Plan,
    records: dict[str, RunRecord],
    options: Options,
    claimed_elsewhere: frozenset[str] = frozenset(),
) -> list[Decision]:
    decisions = []
    for run in plan.runs:
        record = records.get(run.key)
        state = record.state if record is not None else RunState.TO_DO
        if run.key in claimed_elsewhere:
            state = RunState.CLAIMED
        decisions.append(Decision(run, _action(state, options), state, record))
    return decisions


def _action(state: RunState, options: Options) -> Action:
    if state is RunState.CLAIMED:
        return Action.SKIP
    if (options.force and state is not RunState.RUNNING) or state is RunState.TO_DO:
        return Action.NEW
    if state in (RunState.KILLED, RunState.STALE):
        return Action.RESUME
    if state in (RunState.FAILED, RunState.DIVERGED):
        return Action.NEW if options.rerun_failed else Action.SKIP
    return Action.SKIP  # finished, or running in another live process: never run twice beside it


def run_sweep(
    plan: Plan,
    executor: Executor,
    options: Options,
    on_event: EventFn | None = None,
    on_start: Callable[[list[Decision]], None] | None = None,
) -> Summary:
    """Train what the store does not have yet; returns what happened to every run."""
    uri = options.tracking_uri
    experiment_id = ensure_experiment(uri, plan.experiment)  # store and experiment first
    # Claim first, then read the store: a run another process finished is seen as done.
    experiment_dir = options.checkpoint_dir / experiment_slug(plan.experiment)
    claims = Claims(experiment_dir)
    try:
        claimed_elsewhere = frozenset(r.key for r in plan.runs if not claims.claim(r.key))
        with store_errors(uri):
            records = existing_runs(uri, experiment_id)
        decisions = decide(plan, records, options, claimed_elsewhere)
        for decision in decisions:
            if decision.action is Action.SKIP:
                claims.release(decision.run.key)
        summary = Summary(experiment_id, uuid.uuid4().hex[:12], decisions)
        _train(plan, executor, options, summary, experiment_dir, on_event, on_start)
    finally:
        claims.release_all()
    return summary


def _train(
    plan: Plan,
    executor: Executor,
    options: Options,
    summary: Summary,
    experiment_dir: Path,
    on_event: EventFn | None,
    on_start: Callable[[list[Decision]], None] | None,
) -> None:
    """Hand the runs ``summary.decisions`` asks for to the executor."""
    from mlflow.entities import RunTag

    from workbench.cli.plan_view import parameter_counts
    from workbench.datasets import resolve_text_path

    uri, experiment_id, decisions = options.tracking_uri, summary.experiment_id, summary.decisions
    todo = [d for d in decisions if d.action is not Action.SKIP]
    if on_start is not None:
        on_start(decisions)
    if not todo:
        return
    for data in {(d.run.config.data.dataset, d.run.config.data.path) for d in todo}:
        resolve_text_path(*data, options.data_dir)  # download once, here, not in every worker

    mlflow_client = client(uri)
    commit, dirty = git_state(plan.spec_path.resolve().parent)
    if commit is None:  # a spec outside any checkout: record the code's own commit
        commit, dirty = git_state(Path(__file__).resolve().parent)
    sweep_tags = {
        **base_tags(),
        TAG + "sweep": summary.sweep_id,
        TAG + "driver_pid": str(os.getpid()),
        TAG + "spec": str(plan.spec_path),
    }
    if commit is not None:
        sweep_tags.update(
            {
                TAG + "git_commit": commit,
                TAG + "git_dirty": str(dirty).lower(),
                "mlflow.source.git.commit": commit,
            }
        )
    params = parameter_counts([d.run for d in todo])

    def prepare(decision: Decision) -> Job:
        run = decision.run
        run_dir = experiment_dir / run.key
        attempt = 1
        previous = decision.record if decision.action is Action.RESUME else None
        resumed = previous is not None
        # The run's own thread count, whatever else is in this sweep: float sums depend on it.
        threads = run.config.train.threads or options.threads_per_job
        if previous is not None:
            run_id = previous.run_id
            attempt = previous.attempt + 1
            threads = previous.threads or threads  # the run's own, recorded when it started
            mlflow_client.update_run(run_id, status="RUNNING")
            tags = {**sweep_tags, TAG + "attempt": str(attempt), TAG + "threads": str(threads),
                    TAG + "heartbeat": f"{time.time():.0f}"}  # fmt: skip
            mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            if TAG + "reason" in previous.tags:  # why it stopped last time; no longer true
                mlflow_client.delete_tag(run_id, TAG + "reason")
        else:
            if decision.record is not None and decision.state is RunState.STALE:  # --force over it
                mlflow_client.set_tag(decision.record.run_id, TAG + "reason", "superseded")
                mlflow_client.set_terminated(decision.record.run_id, status="KILLED")
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh start, not someone's leftovers
            tags = {**sweep_tags, TAG + "threads": str(threads)}
            run_id = _create_run(mlflow_client, experiment_id, run, tags, params[run.key])
        return Job(
            name=run.name,
            key=run.key,
            config=run.config.model_dump(mode="json"),
            run_id=run_id,
            tracking_uri=uri,
            checkpoint_dir=str(run_dir),
            data_dir=str(options.data_dir),
            threads=threads,
            checkpoint_every_s=options.checkpoint_every_s,
            resumed=resumed,
            attempt=attempt,
        )

    def on_crash(job: Job, reason: str, status: JobStatus) -> JobResult:
        """A worker that died or never answered: ``killed`` leaves the run resumable. A worker
        that died after ending its run (between its last store call and its last message)
        leaves the verdict it wrote: a FINISHED run is never reopened."""
        with contextlib.suppress(*store_error_types()):  # a store that is down: left RUNNING
            ended = ended_result(mlflow_client, job)
            if ended is not None:
                return ended
            mlflow_client.set_tag(job.run_id, TAG + "reason", reason)
            mlflow_client.set_terminated(
                job.run_id, status="KILLED" if status is RunState.KILLED else "FAILED"
            )
        return JobResult(job.key, job.run_id, status, reason=reason)

    def record(event: Event) -> None:
        if isinstance(event, Ended):
            summary.results[event.key] = event.result
        if on_event is not None:
            on_event(event)

    try:
        with store_errors(uri):
            executor.run(todo, prepare, record, on_crash)
    except KeyboardInterrupt:
        summary.interrupted = True


def _create_run(
    mlflow_client: Any, experiment_id: str, run: Run, sweep_tags: dict[str, str], n_params: int
) -> str:
    from mlflow.entities import Param

    config = run.config
    tags = {
        **sweep_tags,
        TAG + "run_key": run.key,
        TAG + "variant": run.variant,
        TAG + "seed": str(run.seed),
        TAG + "variant_index": str(run.variant_index),  # the spec's order of the ladder
        TAG + "attempt": "1",
        TAG + "heartbeat": f"{time.time():.0f}",
        **{TAG + "grid." + k: str(v) for k, v in run.varying.items()},
    }
    if run.reference_val_loss is not None:  # the published figure, for the report
        tags[TAG + "reference_val_loss"] = str(run.reference_val_loss)
    created = mlflow_client.create_run(experiment_id, run_name=run.name, tags=tags)
    run_id: str = created.info.run_id
    values = flatten(applicable_config(config))  # what the run was, nothing that does not apply
    values.update({"num_params": n_params, "data_sha256": run.data_sha256})
    mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in values.items()])
    return run_id
