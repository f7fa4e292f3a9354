"""The sweep driver, shared by every executor: what to train, skip or resume against the store;
MLflow runs created before their job starts; progress; the summary and the exit code.

Every run a sweep creates is a child (``mlflow.parentRunId``, written once, at its creation) of
its plan's parent run: one parent per distinct plan, the plan's identity a hash of its sorted
run keys. A rerun of the same plan reuses the parent (RUNNING while the sweep runs, ended
after); a ``--set`` or ``--only`` that changes the set of runs gets its own; a resumed run
keeps the parent it was created under. A sweep with nothing to train writes nothing. See
:mod:`workbench.sweep.parent`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError
from workbench.grid import Plan, Run
from workbench.processes import process_tags
from workbench.provenance import base_tags, source_tags
from workbench.store import client, ensure_experiment, sqlite_path, store_error_types, store_errors
from workbench.sweep.claims import Claims
from workbench.sweep.events import Ended, Event, EventFn
from workbench.sweep.jobs import Job, JobResult, JobStatus, ended_result
from workbench.sweep.packs import DEFAULT_PACK_SIZE, Pack, PackOf, PackSetting, Unit, Work, group
from workbench.sweep.parent import PARENT_TAG, SweepParent, end_parent, open_parent
from workbench.sweep.record import create_run
from workbench.sweep.signals import signals_deferred
from workbench.tracking import (
    TAG,
    RunRecord,
    RunState,
    end_dead_parents,
    existing_runs,
    experiment_slug,
    mlflow_status,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from workbench.sweep.executors import Executor


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
    system_metrics: bool = False  # MLflow's CPU, memory and GPU metrics of each run
    pack: PackSetting = "auto"  # train runs that share every shape together (workbench.sweep.packs)
    pack_size: int = DEFAULT_PACK_SIZE
    workers: int = 1  # jobs at once: packs are split so that each has work


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
    parent_run_id: str | None = None  # the plan's parent run, when this sweep trained anything

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
    try:
        if _is_new_store(options.tracking_uri):  # every run will train: workers start now,
            executor.warm_up(len(plan.runs))  # their imports overlap the store's creation
        return _run_sweep(plan, executor, options, on_event, on_start)
    finally:
        executor.close()


def _is_new_store(tracking_uri: str) -> bool:
    path = sqlite_path(tracking_uri)
    return path is not None and not path.exists()


def _run_sweep(
    plan: Plan,
    executor: Executor,
    options: Options,
    on_event: EventFn | None,
    on_start: Callable[[list[Decision]], None] | None,
) -> Summary:
    experiment_id = ensure_experiment(options.tracking_uri, plan.experiment)
    experiment_dir = options.checkpoint_dir / experiment_slug(plan.experiment)
    claims = Claims(experiment_dir)
    try:
        with store_errors(options.tracking_uri):  # a killed sweep's parent, seen to be dead
            end_dead_parents(client(options.tracking_uri), experiment_id, claims.holding)
        decisions = _claim_and_decide(plan, claims, options, experiment_id)
        summary = Summary(experiment_id, uuid.uuid4().hex[:12], decisions)
        if on_start is not None:
            on_start(decisions)
        todo = [d for d in decisions if d.action is not Action.SKIP]
        if todo:
            _fetch_data(todo, options.data_dir)
            runs = _StoreRuns.open(plan, options, summary, experiment_dir, todo, claims)
            try:
                _execute(executor, _work(todo, options), runs, summary, on_event)
            finally:
                runs.end(plan, claims, summary.interrupted or sys.exc_info()[0] is not None)
    finally:
        claims.release_all()
    return summary


def _claim_and_decide(
    plan: Plan, claims: Claims, options: Options, experiment_id: str
) -> list[Decision]:
    """Claim every run, then read the store (so a run another process finished before letting
    go is seen as finished), then decide; the runs skipped are let go at once."""
    claimed_elsewhere = frozenset(r.key for r in plan.runs if not claims.claim(r.key))
    with store_errors(options.tracking_uri):
        records = existing_runs(options.tracking_uri, experiment_id)
    decisions = decide(plan, records, options, claimed_elsewhere)
    for decision in decisions:
        if decision.action is Action.SKIP:
            claims.release(decision.run.key)
    return decisions


def _fetch_data(todo: list[Decision], data_dir: Path) -> None:
    """Download (and check) each data set once, here, not in every worker."""
    from workbench.datasets import resolve_text_path

    for data in {(d.run.config.data.dataset, d.run.config.data.path) for d in todo}:
        resolve_text_path(*data, data_dir)


def _work(todo: list[Decision], options: Options) -> list[Work]:
    """The runs to train, alone or in packs."""
    gpus = 0
    if options.pack == "auto":
        from workbench.sweep.executors import gpu_count

        gpus = gpu_count()
    return group(todo, options.pack, gpus, options.pack_size, options.workers)


def _execute(
    executor: Executor,
    work: list[Work],
    runs: _StoreRuns,
    summary: Summary,
    on_event: EventFn | None,
) -> None:
    """Hand the runs to the executor; each job's end goes into ``summary.results``."""

    def record(event: Event) -> None:
        if isinstance(event, Ended):
            summary.results[event.key] = event.result
        if on_event is not None:
            on_event(event)

    try:
        with store_errors(runs.options.tracking_uri):
            executor.run(work, runs.prepare_unit, record, runs.on_crash)
    except KeyboardInterrupt:
        summary.interrupted = True


def _sweep_tags(plan: Plan, sweep_id: str) -> dict[str, str]:
    """The tags every run of this sweep gets: host, sweep, driver, and MLflow's source tags
    (the spec, its checkout's commit and remote, the user)."""
    return {
        **base_tags(),
        TAG + "sweep": sweep_id,
        **process_tags("driver_pid"),
        **source_tags(plan.spec_path),
    }


@dataclass
class _StoreRuns:
    """The store's side of a sweep: each run created (or reopened) just before its job is
    dispatched, so runs that never start are never created, and a crashed job's run ended."""

    options: Options
    experiment_id: str
    experiment_dir: Path
    mlflow_client: MlflowClient
    tags: dict[str, str]  # of every run of this sweep
    parent: SweepParent  # of the runs this sweep creates

    @classmethod
    def open(
        cls,
        plan: Plan,
        options: Options,
        summary: Summary,
        experiment_dir: Path,
        todo: list[Decision],
        claims: Claims,
    ) -> _StoreRuns:
        mlflow_client = client(options.tracking_uri)
        tags = _sweep_tags(plan, summary.sweep_id)
        with store_errors(options.tracking_uri):
            parent = open_parent(mlflow_client, summary.experiment_id, plan, tags, claims)
        summary.parent_run_id = parent.run_id
        return cls(
            options,
            summary.experiment_id,
            experiment_dir,
            mlflow_client,
            tags,
            parent,
        )

    def end(self, plan: Plan, claims: Claims, interrupted: bool) -> None:
        """The parent ended with this sweep's counts; a store that is down leaves it RUNNING
        (the next sweep of the plan reopens it), and never hides why the sweep stopped."""
        with contextlib.suppress(WorkbenchError, *store_error_types()):
            end_parent(self.mlflow_client, self.options.tracking_uri, self.experiment_id,
                       plan, self.parent, claims, interrupted)  # fmt: skip

    def prepare_unit(self, item: Work) -> Unit:
        """A run's job, or a pack of them, with each MLflow run created or reopened now."""
        if isinstance(item, PackOf):
            keys = tuple(decision.run.key for decision in item.decisions)
            jobs = tuple(self.prepare(decision, keys) for decision in item.decisions)
            return Pack(jobs, item.rows, item.width)
        return self.prepare(item)

    def prepare(self, decision: Decision, pack: tuple[str, ...] = ()) -> Job:
        """The run's job. Every setting that changes its float sums (device, threads, attention
        path, AdamW update, packed or alone) is recorded on the run and kept by every resume."""
        run = decision.run
        # The run's own thread count, whatever else is in this sweep: float sums depend on it.
        threads = run.config.train.threads or self.options.threads_per_job
        previous = decision.record if decision.action is Action.RESUME else None
        attention, fused, device = None, None, ""
        if previous is not None:
            threads = previous.threads or threads  # the run's own, recorded when it started
            attention = previous.tags.get(TAG + "attention")  # the path it took, not auto's now
            fused = {"fused": True, "elementwise": False}.get(previous.tags.get(TAG + "adamw", ""))
            device = previous.tags.get(TAG + "device", "").split(":")[0]
            run_id, attempt = previous.run_id, previous.attempt + 1
            self._reopen(previous, attempt, threads)
        else:
            run_id, attempt = self._create(decision, threads, pack), 1
        return Job(
            name=run.name,
            key=run.key,
            config=run.config.model_dump(mode="json"),
            run_id=run_id,
            tracking_uri=self.options.tracking_uri,
            checkpoint_dir=str(self.experiment_dir / run.key),
            data_dir=str(self.options.data_dir),
            threads=threads,
            attention=attention if attention in ("sdpa", "torch", "native") else None,
            fused_adamw=fused,
            device=device if device in ("cpu", "cuda", "mps") else None,
            checkpoint_every_s=self.options.checkpoint_every_s,
            resumed=previous is not None,
            attempt=attempt,
            system_metrics=self.options.system_metrics,
        )

    def _reopen(self, previous: RunRecord, attempt: int, threads: int) -> None:
        """The same MLflow run, RUNNING again, with this sweep's tags and its next attempt."""
        from mlflow.entities import RunTag

        run_id = previous.run_id
        self.mlflow_client.update_run(run_id, status=mlflow_status(RunState.RUNNING))
        tags = {**self.tags, TAG + "attempt": str(attempt), TAG + "threads": str(threads),
                TAG + "heartbeat": f"{time.time():.0f}"}  # fmt: skip
        self.mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if TAG + "reason" in previous.tags:  # why it stopped last time; no longer true
            self.mlflow_client.delete_tag(run_id, TAG + "reason")

    def _create(self, decision: Decision, threads: int, pack: tuple[str, ...]) -> str:
        """A new MLflow run, from step 0; a stale run it replaces (``--force``) is ended."""
        run, record = decision.run, decision.record
        if record is not None and decision.state is RunState.STALE:
            self.mlflow_client.set_tag(record.run_id, TAG + "reason", "superseded")
            self.mlflow_client.set_terminated(record.run_id, status=mlflow_status(RunState.KILLED))
        # A fresh start, not someone's leftovers.
        shutil.rmtree(self.experiment_dir / run.key, ignore_errors=True)
        tags = {**self.tags, TAG + "threads": str(threads), PARENT_TAG: self.parent.run_id,
                TAG + "packed": "true" if pack else "false"}  # fmt: skip
        if pack:  # its resumes train in this pack, members in this order (tracking.pack_members)
            tags[TAG + "pack_members"] = "+".join(pack)
        with signals_deferred():  # a run is created whole: tags, params and inputs, or not
            return create_run(self.mlflow_client, self.experiment_id, run, tags)

    def on_crash(self, job: Job, reason: str, status: JobStatus) -> JobResult:
        """A worker that died or never answered: ``killed`` leaves the run resumable. A worker
        that died after ending its run (between its last store call and its last message)
        leaves the verdict it wrote: a FINISHED run is never reopened."""
        with contextlib.suppress(*store_error_types()):  # a store that is down: left RUNNING
            ended = ended_result(self.mlflow_client, job)
            if ended is not None:
                return ended
            self.mlflow_client.set_tag(job.run_id, TAG + "reason", reason)
            verdict = RunState.KILLED if status is RunState.KILLED else RunState.FAILED
            self.mlflow_client.set_terminated(job.run_id, status=mlflow_status(verdict))
        return JobResult(job.key, job.run_id, status, reason=reason)
