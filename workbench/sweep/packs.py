"""Packs: runs of a sweep that share every shape, trained together by one worker as one stacked
model (:mod:`workbench.train.packed`), each recorded in its own MLflow run exactly as if it
had been trained alone.

The driver groups the runs it is about to train (:func:`group`); an executor hands a
:class:`Pack` to one worker, which runs :func:`execute_pack` and answers with one result per
member. What a pack cannot change: each member's MLflow run, params, tags, curves, artifacts and
logged model (:mod:`workbench.sweep.record`, shared with a run alone), its checkpoint (the
solo format: a member resumes alone or in another pack), skip and resume per member. What a
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
    EVAL_KEYS,
    PROGRESS_KEYS,
    SUMMARY_KEYS,
    Job,
    JobResult,
    MlflowCallback,
    ProgressFn,
    describe_environment_failure,
    end_killed,
    execute_job,
    is_environment_failure,
    signals_deferred,
    system_metrics_of,
    train_recorded,
)
from workbench.tracking import TAG, MetricBuffer, RunState, client, store_error_types

if TYPE_CHECKING:
    from workbench.sweep.driver import Decision

PackSetting: TypeAlias = Literal["auto", "on", "off"]
"""auto: pack the runs that train on a GPU; on: pack wherever runs can be packed; off: never."""

DEFAULT_PACK_SIZE = 64  # members per pack at most


@dataclass(frozen=True)
class Pack:
    """Runs trained together in one worker: their jobs, as each would run alone."""

    jobs: tuple[Job, ...]

    @property
    def key(self) -> str:
        return "+".join(job.key for job in self.jobs)


Unit: TypeAlias = Job | Pack
"""What an executor hands one worker: a run alone, or a pack."""


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
) -> list[Decision | list[Decision]]:
    """The driver's work list: runs alone, and packs (lists of two or more) of runs with one
    pack key and the same action (a new run packs with new runs, a resumed one with resumed
    ones), at most ``size`` each, in the order of their first run."""
    if setting == "off" or size < 2:
        return list(decisions)
    groups: dict[tuple[str, str], list[Decision]] = {}
    order: list[Decision | tuple[str, str]] = []
    for decision in decisions:
        key = pack_key(decision.run.config)
        if key is None or not _packs_here(decision.run.config, setting, gpus):
            order.append(decision)
            continue
        slot = (key, str(decision.action))
        if slot not in groups:
            groups[slot] = []
            order.append(slot)
        groups[slot].append(decision)
    work: list[Decision | list[Decision]] = []
    for item in order:
        if not isinstance(item, tuple):
            work.append(item)
            continue
        runs = groups[item]
        for start in range(0, len(runs), size):
            chunk = runs[start : start + size]
            work.append(chunk if len(chunk) > 1 else chunk[0])
    return work


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
            buffers = [
                MetricBuffer(job.tracking_uri, job.run_id, EVAL_KEYS + SUMMARY_KEYS) for job in jobs
            ]
    except KeyboardInterrupt:
        return [end_killed(job, "interrupted") for job in jobs]
    except unreachable as exc:
        reason = f"tracking store: {first_line(exc)}"
        return [JobResult(job.key, job.run_id, RunState.KILLED, reason=reason) for job in jobs]
    callbacks = [MlflowCallback(b, job.key, progress) for job, b in zip(jobs, buffers, strict=True)]
    ended: dict[str, JobResult] = {}
    with contextlib.ExitStack() as stack:
        for job, buffer in zip(jobs, buffers, strict=True):
            stack.enter_context(system_metrics_of(job, buffer))
        try:
            for job, buffer in zip(jobs, buffers, strict=True):
                if job.resumed:
                    buffer.skip_stored(list(PROGRESS_KEYS + EVAL_KEYS + SUMMARY_KEYS))
            _train_pack_and_record(pack, mlflow_client, buffers, callbacks, ended)
            return [ended[job.key] for job in jobs]
        except KeyboardInterrupt as exc:
            reason = str(exc) or "interrupted"
        except BaseException as exc:
            if not is_environment_failure(exc):
                return _alone(pack, mlflow_client, buffers, callbacks, ended, exc)
            reason = describe_environment_failure(exc)
    return [
        ended.get(job.key) or end_killed(job, reason, mlflow_client, step=callback.last_step)
        for job, callback in zip(jobs, callbacks, strict=True)
    ]


def _train_pack_and_record(
    pack: Pack,
    mlflow_client: Any,
    buffers: list[MetricBuffer],
    callbacks: list[MlflowCallback],
    ended: dict[str, JobResult],
) -> None:
    """Train the members together, then record each member's end (into ``ended``). Members
    resumed from checkpoints at different steps (runs of different packs, or a run resumed
    alone before) train as one pack per step, one after the other."""
    from workbench.corpus import Corpus
    from workbench.datasets import resolve_text_path
    from workbench.train.packed import checkpoint_step
    from workbench.train.process import prepare_process

    jobs = pack.jobs
    configs = [_config(job) for job in jobs]
    data = configs[0].data
    path = resolve_text_path(data.dataset, data.path, Path(jobs[0].data_dir))
    corpus = Corpus.from_file(path, data.val_fraction)
    prepare_process(configs[0].train)  # threads and TF32 are the pack's, shared by its members
    by_step: dict[int, list[int]] = {}
    for k, job in enumerate(jobs):
        by_step.setdefault(checkpoint_step(Path(job.checkpoint_dir)), []).append(k)
    for at_step in by_step.values():
        if len(at_step) == 1:  # a pack of one is slower than a run alone (benchmarks/RESULTS.md)
            k = at_step[0]
            ended[jobs[k].key] = result = train_recorded(jobs[k], mlflow_client, buffers[k],
                                                         callbacks[k])  # fmt: skip
            if result.status is RunState.KILLED:  # interrupted: so are the members left
                raise KeyboardInterrupt(result.reason or "interrupted")
            continue
        _train_together(pack, at_step, configs, corpus, mlflow_client, buffers, callbacks, ended)


def _train_together(
    pack: Pack,
    chosen: list[int],
    configs: list[RunConfig],
    corpus: Any,
    mlflow_client: Any,
    buffers: list[MetricBuffer],
    callbacks: list[MlflowCallback],
    ended: dict[str, JobResult],
) -> None:
    from workbench.sweep import record
    from workbench.train.packed import build_packed_trainer

    jobs = [pack.jobs[k] for k in chosen]
    trainer = build_packed_trainer(
        [configs[k] for k in chosen],
        corpus,
        [callbacks[k] for k in chosen],
        [Path(job.checkpoint_dir) for job in jobs],
        checkpoint_every_s=jobs[0].checkpoint_every_s,
    )
    tags = {TAG + "pack": pack_id(pack), TAG + "pack_size": str(len(jobs))}
    for member, k in enumerate(chosen):
        buffers[k].tags(tags)  # stored with the start's flush
        model = trainer.member_model(member)
        record.record_start(pack.jobs[k], mlflow_client, buffers[k], trainer.device, model)
    results = trainer.fit()
    for member, (k, result) in enumerate(zip(chosen, results, strict=True)):
        job, model = pack.jobs[k], trainer.member_model(member)
        artifacts = callbacks[k].artifacts
        ended[job.key] = record.record_end(
            job, mlflow_client, buffers[k], artifacts, result, model, corpus
        )


def _config(job: Job) -> RunConfig:
    config = RunConfig.model_validate(job.config)
    if job.threads is not None:  # the run's own count, as execute_job sets it
        train = config.train.model_copy(update={"threads": job.threads})
        config = config.model_copy(update={"train": train})
    return config


def pack_id(pack: Pack) -> str:
    """A short id shared by the runs of one pack (``workbench.pack``), to find them together."""
    import hashlib

    return hashlib.sha256(pack.key.encode()).hexdigest()[:12]


def _alone(
    pack: Pack,
    mlflow_client: Any,
    buffers: list[MetricBuffer],
    callbacks: list[MlflowCallback],
    ended: dict[str, JobResult],
    exc: BaseException,
) -> list[JobResult]:
    """Packed training raised: no verdict on any one member. Each member that has not ended
    trains alone from its checkpoint (the solo format), with why in a tag; only its own
    exception fails it."""
    reason = f"{type(exc).__name__}: {first_line(exc, 300)}"
    results = []
    for job, buffer, callback in zip(pack.jobs, buffers, callbacks, strict=True):
        if job.key in ended:
            results.append(ended[job.key])
            continue
        buffer.tags({TAG + "pack_error": reason})
        alone = replace(job, resumed=True)  # points the pack stored are not stored twice
        results.append(train_recorded(alone, mlflow_client, buffer, _fresh(callback)))
    return results


def _fresh(callback: MlflowCallback) -> MlflowCallback:
    """The member's callback for its run alone: the same buffer and progress, no artifacts
    kept from the pack."""
    return MlflowCallback(callback.buffer, callback.key, callback.progress)
