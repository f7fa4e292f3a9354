"""Packs: runs of a sweep that share every shape, trained together by one worker as one stacked
model (:mod:`workbench.train.packed`), each recorded in its own MLflow run exactly as if it
had been trained alone.

The driver groups the runs it is about to train (:func:`group`); an executor hands a
:class:`Pack` to one worker, which runs :func:`execute_pack` and answers with one result per
member. What a pack cannot change: each member's MLflow run, params, tags, curves, artifacts and
logged model (:mod:`workbench.sweep.record`, shared with a run alone), its checkpoint (the
solo format), skip and resume per member. What it does change is float rounding, so a run
created in a pack resumes in that pack, and a run created alone resumes alone. What a
member's failure does: a member that diverges is masked out and recorded diverged while the
others go on; an exception in packed training is no verdict on any one member, so each member
is then trained alone from its checkpoint, where only its own exception fails it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from workbench.errors import WorkbenchError, first_line
from workbench.spec import RunConfig, pack_key
from workbench.sweep.jobs import (
    STORED_KEYS,
    DriverLost,
    Job,
    JobResult,
    MlflowCallback,
    ProgressFn,
    describe_environment_failure,
    end_killed,
    ended_result,
    execute_job,
    is_environment_failure,
    job_buffer,
    job_config,
    job_corpus,
    system_metrics_of,
    train_recorded,
)
from workbench.sweep.signals import signals_deferred
from workbench.tracking import TAG, MetricBuffer, RunState, client, store_error_types

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from workbench.sweep.driver import Decision

PackSetting: TypeAlias = Literal["auto", "on", "off"]
"""auto: pack the runs that train on a GPU; on: pack wherever runs can be packed; off: never."""

DEFAULT_PACK_SIZE = 64  # members per pack at most (`--pack-size`: up to 256, cli/app.py)


@dataclass(frozen=True)
class Pack:
    """Runs trained together in one worker: their jobs, as each would run alone. A resumed
    pack that has fewer members than it started with (some ended) keeps each one's row of the
    stacked model (``rows``, job by job) and its ``width``: a member's float sums depend on
    both, so the rows of the others stay, masked."""

    jobs: tuple[Job, ...]
    rows: tuple[int, ...] = ()  # () where job k is in row k
    width: int = 0

    @property
    def key(self) -> str:
        return "+".join(job.key for job in self.jobs)

    def layout(self) -> tuple[tuple[int, ...], int]:
        """Each job's row, and the pack's width."""
        return self.rows or tuple(range(len(self.jobs))), max(self.width, len(self.jobs))


Unit: TypeAlias = Job | Pack
"""What an executor hands one worker: a run alone, or a pack."""


@dataclass(frozen=True)
class PackOf:
    """Runs the driver will train as one pack, in order (:func:`group`); each becomes a
    :class:`Job` of a :class:`Pack` when it is dispatched."""

    decisions: tuple[Decision, ...]
    rows: tuple[int, ...] = ()  # a resumed pack's, from its recorded members (``Pack``)
    width: int = 0

    def __len__(self) -> int:
        return len(self.decisions)


Work: TypeAlias = "Decision | PackOf"
"""The driver's work list, item by item: a run alone, or a pack of runs."""


def members(unit: Unit) -> tuple[Job, ...]:
    return unit.jobs if isinstance(unit, Pack) else (unit,)


def execute_unit(unit: Unit, progress: ProgressFn | None = None) -> list[JobResult]:
    """What a worker runs: one result per member, in order."""
    if isinstance(unit, Pack):
        return execute_pack(unit, progress)
    return [execute_job(unit, progress)]


def group(
    decisions: Sequence[Decision],
    setting: PackSetting,
    gpus: int,
    size: int = DEFAULT_PACK_SIZE,
    workers: int = 1,
) -> list[Work]:
    """The driver's work list: runs alone, and packs in the order of their first run.

    A resumed run trains as it first started (``RunRecord.pack_members``), whatever ``setting``
    says now: a run started alone resumes alone, a packed one with the members of its pack
    that are left, each in the row it started in (``Pack``): a pack of one, where it is the
    last. New runs with one pack key pack together, at most ``size`` each; fewer groups than
    ``workers`` are split, so that no worker sits idle beside one big pack. Runs recorded
    before workbench stored how they started pack as new runs do, a resumed one with resumed
    ones."""
    groups: dict[tuple[str, ...], list[Decision]] = {}
    kept: dict[tuple[str, ...], tuple[str, ...]] = {}  # recorded packs: their members' order
    order: list[Decision | tuple[str, ...]] = []
    for decision in decisions:
        members = _recorded_pack(decision)
        key = pack_key(decision.run.config)
        if members is not None:
            slot: tuple[str, ...] = ("recorded", *members)
            kept[slot] = members
        elif (
            setting == "off"
            or size < 2
            or key is None
            or not _packs_here(decision.run.config, setting, gpus)
        ):
            slot = ()
        else:
            slot = (key, str(decision.action))
        if members == () or not slot:
            order.append(decision)
            continue
        if slot not in groups:
            groups[slot] = []
            order.append(slot)
        groups[slot].append(decision)
    parts = -(-workers // max(1, len(groups)))  # each group split this many ways, at least
    work: list[Work] = []
    for item in order:
        if not isinstance(item, tuple):
            work.append(item)
        elif item in kept:
            place = {name: i for i, name in enumerate(kept[item])}
            runs = sorted(groups[item], key=lambda d: place[d.run.key])
            rows = tuple(place[d.run.key] for d in runs)
            work.append(PackOf(tuple(runs), rows, len(place)))
        else:
            runs = groups[item]
            step = min(size, -(-len(runs) // parts))
            for start in range(0, len(runs), step):
                chunk = runs[start : start + step]
                work.append(PackOf(tuple(chunk)) if len(chunk) > 1 else chunk[0])
    return work


def _recorded_pack(decision: Decision) -> tuple[str, ...] | None:
    """How a resumed run first started: its pack's members, () alone; None for a new run or
    one recorded before workbench stored it."""
    record = decision.record
    if str(decision.action) != "resume" or record is None:
        return None
    members = record.pack_members
    if members and decision.run.key not in members:  # a tag someone edited: not this run's
        return None
    return members


def _packs_here(config: RunConfig, setting: PackSetting, gpus: int) -> bool:
    """``auto`` packs what trains on a GPU: on a CPU packing is not faster than a run alone
    (benchmarks/RESULTS.md), so runs stay alone there unless packing is asked for."""
    if setting == "on":
        return True
    device = config.train.device
    return device.startswith("cuda") or (device == "auto" and gpus > 0)


def execute_pack(pack: Pack, progress: ProgressFn | None = None) -> list[JobResult]:
    """Train a pack's members together and record each: one result per member, in order.

    As for a run alone (``execute_job``): an interruption, the store going away or a full disk
    leave every member that has not ended KILLED and resumable, never FAILED.
    """
    jobs = pack.jobs
    unreachable: tuple[type[BaseException], ...] = (WorkbenchError, *store_error_types())
    try:
        with signals_deferred():  # see execute_job: the store's modules are imported whole
            mlflow_client = client(jobs[0].tracking_uri)
            run = _PackRun(pack, mlflow_client, progress)
    except KeyboardInterrupt:
        return [end_killed(job, "interrupted") for job in jobs]
    except unreachable as exc:
        reason = f"tracking store: {first_line(exc)}"
        return [JobResult(job.key, job.run_id, RunState.KILLED, reason=reason) for job in jobs]
    with contextlib.ExitStack() as stack:
        for job, buffer in zip(jobs, run.buffers, strict=True):
            stack.enter_context(system_metrics_of(job, buffer))
        return run.execute()


class _PackRun:
    """A pack's members in the store while the worker holds them: a buffer and a callback
    each, the results of those that ended, and the heartbeats of those still open."""

    def __init__(
        self, pack: Pack, mlflow_client: MlflowClient, progress: ProgressFn | None
    ) -> None:
        self.pack, self.client, self.progress = pack, mlflow_client, progress
        self.buffers = [job_buffer(job) for job in pack.jobs]
        self.open: list[MetricBuffer] = list(self.buffers)  # shared with every callback
        self.callbacks = [
            MlflowCallback(buffer, job.key, progress, self.open)
            for job, buffer in zip(pack.jobs, self.buffers, strict=True)
        ]
        self.ended: dict[str, JobResult] = {}

    def end(self, k: int, result: JobResult) -> None:
        self.ended[self.pack.jobs[k].key] = result
        if self.buffers[k] in self.open:
            self.open.remove(self.buffers[k])

    def execute(self) -> list[JobResult]:
        failure = None
        try:
            for k, job in enumerate(self.pack.jobs):
                if job.resumed:  # a pack resumed or retried: some runs may have ended
                    ended = ended_result(self.client, job)
                    if ended is not None:
                        self.end(k, ended)
                        continue
                    self.buffers[k].skip_stored(list(STORED_KEYS))
            self.train()
            return self.results()
        except (KeyboardInterrupt, DriverLost) as exc:
            reason = str(exc) or "interrupted"
        except BaseException as exc:
            if is_environment_failure(exc):
                reason = describe_environment_failure(exc)
            else:  # handled below, once the traceback (holding the pack's tensors) is gone
                failure = f"{type(exc).__name__}: {first_line(exc, 300)}"
        if failure is not None:
            _release_memory()
            return self.alone(failure)
        return self.killed(reason)

    def results(self) -> list[JobResult]:
        return [self.ended[job.key] for job in self.pack.jobs]

    def killed(self, reason: str) -> list[JobResult]:
        """Every member that has not ended, KILLED (resumable)."""
        for k, job in enumerate(self.pack.jobs):
            if job.key not in self.ended:
                step = self.callbacks[k].last_step
                self.end(k, end_killed(job, reason, self.client, step=step))
        return self.results()

    def train(self) -> None:
        """Train the members together, then record each one's end. Members resumed from
        checkpoints at different steps (a kill between two members' checkpoints) or with
        different keys train as one pack per step and key, one after the other. Each keeps
        the pack's layout (``Pack``): the rows of members that have ended or train in another
        group stay, masked, so that each member's float sums stay what they were."""
        from workbench.train.packed import align_checkpoints
        from workbench.train.process import prepare_process

        jobs = self.pack.jobs
        configs = [job_config(job) for job in jobs]
        corpus = job_corpus(jobs[0], configs[0])  # one pack key: one data set
        left = [k for k, job in enumerate(jobs) if job.key not in self.ended]
        steps = align_checkpoints([Path(jobs[k].checkpoint_dir) for k in left])
        groups: dict[tuple[int, str | None], list[int]] = {}
        for k, step in zip(left, steps, strict=True):
            groups.setdefault((step, pack_key(configs[k])), []).append(k)
        for chosen in groups.values():
            prepare_process(configs[chosen[0]].train)  # threads and TF32, shared by the group
            self.train_together(chosen, configs, corpus)

    def train_together(self, chosen: list[int], configs: list[RunConfig], corpus: Any) -> None:
        from workbench.sweep import record
        from workbench.train.packed import build_packed_trainer

        jobs = [self.pack.jobs[k] for k in chosen]
        rows, width = self.pack.layout()
        trainer = build_packed_trainer(
            [configs[k] for k in chosen],
            corpus,
            [self.callbacks[k] for k in chosen],
            [Path(job.checkpoint_dir) for job in jobs],
            checkpoint_every_s=jobs[0].checkpoint_every_s,
            fused=jobs[0].fused_adamw,  # the members started together: one choice
            rows=[rows[k] for k in chosen],
            width=width,
        )
        tags = {TAG + "pack": pack_id(self.pack), TAG + "pack_size": str(width)}
        for member, k in enumerate(chosen):
            self.buffers[k].tags(tags)  # stored with the start's flush
            record.record_start(jobs[member], self.client, self.buffers[k], trainer, member)
        results = trainer.fit()
        for member, (k, result) in enumerate(zip(chosen, results, strict=True)):
            model, artifacts = trainer.member_model(member), self.callbacks[k].artifacts
            self.end(k, record.record_end(jobs[member], self.client, self.buffers[k], artifacts,
                                          result, model, corpus))  # fmt: skip

    def alone(self, failure: str) -> list[JobResult]:
        """Packed training raised: no verdict on any one member. Each member that has not
        ended trains alone from its checkpoint (the solo format), with why in a tag; only its
        own exception fails it, and an interruption stops the rest (KILLED, resumable). Each
        gets a fresh buffer: the pack's may hold points after the last checkpoint, which the
        run alone computes again."""
        left = [k for k, job in enumerate(self.pack.jobs) if job.key not in self.ended]
        for k in left:
            job = self.pack.jobs[k]
            self.open.remove(self.buffers[k])
            self.buffers[k] = job_buffer(job)
            # From here it trains alone, and so does every resume of it (workbench.packed).
            self.buffers[k].tags({TAG + "pack_error": failure, TAG + "packed": "false"})
            self.open.append(self.buffers[k])
            self.callbacks[k] = MlflowCallback(self.buffers[k], job.key, self.progress, self.open)
        for k in left:
            alone = replace(self.pack.jobs[k], resumed=True)  # stored points are not stored twice
            result = train_recorded(alone, self.client, self.buffers[k], self.callbacks[k])
            self.end(k, result)
            if result.status is RunState.KILLED:
                return self.killed(result.reason or "interrupted")
        return self.results()


def _release_memory() -> None:
    """What a failed pack held, let go before its members train alone (on a GPU, the memory
    they need)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def pack_id(pack: Pack) -> str:
    """A short id shared by the runs of one pack (``workbench.pack``), to find them together."""
    import hashlib

    return hashlib.sha256(pack.key.encode()).hexdigest()[:12]
