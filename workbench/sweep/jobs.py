"""One grid point, trained and recorded: the importable job function that every executor runs
(a local worker process or a Ray task), so both return the same result the same way.

The driver has already created (or reopened) the MLflow run and logged its params; the job
trains, streams metrics in batches, logs the artifacts and ends the run with its status.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from workbench.errors import WorkbenchError, first_line
from workbench.sweep.events import Progress
from workbench.sweep.signals import signals_deferred, signals_ignored
from workbench.tracking import (
    TAG,
    MetricBuffer,
    RunRecord,
    RunState,
    client,
    mlflow_status,
    store_error_types,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from workbench.corpus import Corpus
    from workbench.spec import RunConfig

PROGRESS_KEYS = ("train_loss_smooth", "lr", "tokens_per_sec")
EVAL_KEYS = ("train_loss", "val_loss")
SUMMARY_KEYS = ("best_val_loss", "final_val_loss", "wall_time_s")
STORED_KEYS = PROGRESS_KEYS + EVAL_KEYS + SUMMARY_KEYS  # every metric a job stores

ProgressFn = Callable[[Progress], None]
"""Called as training goes."""

JobStatus: TypeAlias = Literal[
    RunState.FINISHED, RunState.DIVERGED, RunState.FAILED, RunState.KILLED
]
"""How a job ends."""


class DriverLost(BaseException):
    """Raised in a worker whose driver process is gone: an interruption, never a verdict. Its
    own exception, not a KeyboardInterrupt (a handler of Ctrl-C must not mean "the driver is
    gone"), and not an Exception (no ``except Exception`` takes it for a failure)."""


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, picklable and free of torch objects."""

    name: str
    key: str
    config: dict[str, Any]  # RunConfig.model_dump(mode="json")
    run_id: str
    tracking_uri: str
    checkpoint_dir: str
    data_dir: str
    threads: int | None = None
    attention: str | None = None  # a resume's attention path: the one its run started with
    fused_adamw: bool | None = None  # a resume's optimizer update: as its run started
    device: str | None = None  # a resume's device type (cpu, cuda, mps), where it was auto
    checkpoint_every_s: float = 10.0  # checkpoint (and store metrics) at most this often
    resumed: bool = False  # continuing an MLflow run that already holds points
    attempt: int = 1
    system_metrics: bool = False  # MLflow's CPU, memory and GPU metrics, sampled beside training


@dataclass(frozen=True)
class JobResult:
    key: str
    run_id: str
    status: JobStatus
    step: int = 0
    best_val_loss: float | None = None
    final_val_loss: float | None = None
    wall_time_s: float | None = None
    device: str | None = None
    reason: str | None = None


class MlflowCallback:
    """The trainer's callback (``workbench.train.trainer.Callback``): metrics to a batching
    buffer (and a progress function), artifacts kept until the end, the buffer flushed before
    each checkpoint."""

    def __init__(
        self,
        buffer: MetricBuffer,
        key: str,
        progress: ProgressFn | None,
        beside: list[MetricBuffer] | None = None,
    ) -> None:
        self.buffer = buffer
        self.key = key
        self.progress = progress
        self.artifacts: dict[str, str | bytes] = {}
        self.last_step = 0
        # Runs of the same pack that are open but not reporting (diverged and waiting for the
        # pack's end, or waiting their turn): their heartbeats go with this one's.
        self.beside = beside if beside is not None else []

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.buffer.add(metrics, step)
        self.last_step = step
        if self.progress is not None:
            self.progress(Progress(self.key, step, metrics))
        for buffer in (self.buffer, *self.beside):
            if buffer.heartbeat_due():
                buffer.heartbeat()

    def on_artifact(self, name: str, content: str | bytes) -> None:
        self.artifacts[name] = content

    def on_checkpoint(self, step: int) -> None:
        # Stored before the checkpoint is written: a resume never lacks a point before it.
        self.buffer.flush()


def execute_job(job: Job, progress: ProgressFn | None = None) -> JobResult:
    """Train one run and record it.

    Only what training itself raises is a verdict on the run (FAILED). An interruption (Ctrl-C,
    SIGTERM, the driver gone), the tracking store going away and a full disk are not: the run
    is marked KILLED where the store still answers (else left RUNNING, which the next sweep
    recognises as stale), its checkpoint is kept, and the next ``workbench run`` resumes it.
    """
    unreachable: tuple[type[BaseException], ...] = (WorkbenchError, *store_error_types())
    try:
        # Opening the store imports MLflow's database modules: a signal in the middle of an
        # import would leave them half-made for the rest of the process (and the run RUNNING),
        # so it waits until the store is open, then interrupts as usual.
        with signals_deferred():
            mlflow_client = client(job.tracking_uri)
            buffer = job_buffer(job)
    except KeyboardInterrupt:  # held back until the store was open: now it can be recorded
        return end_killed(job, "interrupted")
    except unreachable as exc:  # no store to record anything in
        return JobResult(
            job.key, job.run_id, RunState.KILLED, reason=f"tracking store: {first_line(exc)}"
        )
    callback = MlflowCallback(buffer, job.key, progress)
    with system_metrics_of(job, buffer):
        return train_recorded(job, mlflow_client, buffer, callback)


def job_buffer(job: Job) -> MetricBuffer:
    """The run's metric buffer: eval and summary points stored whenever reported."""
    return MetricBuffer(job.tracking_uri, job.run_id, EVAL_KEYS + SUMMARY_KEYS)


def train_recorded(
    job: Job, mlflow_client: MlflowClient, buffer: MetricBuffer, callback: MlflowCallback
) -> JobResult:
    try:
        if job.resumed:  # points after the last checkpoint may be stored already
            buffer.skip_stored(list(STORED_KEYS))
        return _train_and_record(job, mlflow_client, buffer, callback)
    except (KeyboardInterrupt, DriverLost) as exc:
        reason = str(exc) or "interrupted"
    except BaseException as exc:
        if _kept_path_missing(job, exc):  # this machine lacks it: no verdict, resumable
            reason = (f"resumes with the arithmetic it started with: {first_line(exc)} "
                      "(--force trains it again from step 0 here)")  # fmt: skip
        elif not is_environment_failure(exc):
            return _failed(job, mlflow_client, buffer, callback, exc)
        else:
            reason = describe_environment_failure(exc)
    # Unflushed points come after the last checkpoint: the resume recomputes them.
    return end_killed(job, reason, mlflow_client, step=callback.last_step)


def _kept_path_missing(job: Job, exc: BaseException) -> bool:
    """A resume whose recorded device, attention path or optimizer update cannot run here."""
    from workbench.models.attention import AttentionUnavailable
    from workbench.train.optim import FusedUnavailable
    from workbench.train.process import DeviceUnavailable

    return (
        (job.attention is not None and isinstance(exc, AttentionUnavailable))
        or (job.fused_adamw is not None and isinstance(exc, FusedUnavailable))
        or (job.device is not None and isinstance(exc, DeviceUnavailable))
    )


def end_killed(
    job: Job, reason: str, mlflow_client: MlflowClient | None = None, step: int = 0
) -> JobResult:
    """End an interrupted job's run KILLED (resumable) where the store answers, unless it
    already ended: interrupted after its end, the verdict stands. Also for a job interrupted
    before it could reach its own handler (a SIGTERM while the worker was opening the store).
    A second signal must not leave the run RUNNING, so signals wait until this is done."""
    with signals_ignored(), contextlib.suppress(WorkbenchError, *store_error_types()):
        mlflow_client = mlflow_client or client(job.tracking_uri)
        ended = ended_result(mlflow_client, job)
        if ended is not None:
            return ended
        mlflow_client.set_tag(job.run_id, TAG + "reason", reason)
        mlflow_client.set_terminated(job.run_id, status=mlflow_status(RunState.KILLED))
    return JobResult(job.key, job.run_id, RunState.KILLED, step=step, reason=reason)


@contextlib.contextmanager
def system_metrics_of(job: Job, buffer: MetricBuffer) -> Iterator[None]:
    """MLflow's system metrics monitor for the job's run (``system/...`` metrics, sampled every
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds, 10 by default) while the job runs. A
    worker that cannot sample (no psutil there) trains anyway and says why in a tag."""
    if not job.system_metrics:
        yield
        return
    unavailable: tuple[type[BaseException], ...] = (ImportError, *store_error_types())
    try:
        from mlflow.system_metrics import system_metrics_monitor

        monitor_class: Any = system_metrics_monitor.SystemMetricsMonitor  # untyped
        monitor = monitor_class(
            job.run_id, resume_logging=job.resumed, tracking_uri=job.tracking_uri
        )
        monitor.start()
    except unavailable as exc:
        buffer.tags({TAG + "system_metrics": f"not recorded: {first_line(exc)}"})
        yield
        return
    try:
        yield
    finally:
        monitor.finish()  # joins its thread and stores what it sampled


def ended_result(mlflow_client: MlflowClient, job: Job) -> JobResult | None:
    """What the store says of a run that already ended (FINISHED or FAILED), else None: a run
    stopped between its last store call and its last word keeps its verdict, and a FINISHED
    run is never reopened."""
    record = RunRecord.of(mlflow_client.get_run(job.run_id))
    verdict = record.state
    if verdict is RunState.FINISHED:
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
        return JobResult(job.key, job.run_id, RunState.FINISHED)
    if verdict is RunState.FAILED or verdict is RunState.DIVERGED:
        return JobResult(job.key, job.run_id, verdict, reason=record.tags.get(TAG + "reason"))
    return None


def is_environment_failure(exc: BaseException) -> bool:
    """The tracking store failing, or a full disk: the machine's trouble, not the run's."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # The store raised, or refused at its first contact (WorkbenchError); any other OSError
    # is the run's own.
    store = tuple(t for t in store_error_types() if t is not OSError)
    return isinstance(exc, (WorkbenchError, *store))


def describe_environment_failure(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{what}{where}"
    if "database or disk is full" in str(exc):  # SQLite's words, inside SQLAlchemy's and MLflow's
        return "the tracking store's disk is full (SQLite: database or disk is full)"
    return f"tracking store unavailable: {type(exc).__name__}: {first_line(exc, 400)}"


def _failed(
    job: Job,
    mlflow_client: MlflowClient,
    buffer: MetricBuffer,
    callback: MlflowCallback,
    exc: BaseException,
) -> JobResult:
    """Training raised: the run is FAILED, with the reason and the traceback."""
    reason = f"{type(exc).__name__}: {exc}".strip()[:500]
    try:
        buffer.tags({TAG + "reason": reason, TAG + "stopped_step": str(callback.last_step)})
        buffer.flush(heartbeat=False)
        mlflow_client.log_text(job.run_id, traceback.format_exc(), "error.txt")
        mlflow_client.set_terminated(job.run_id, status=mlflow_status(RunState.FAILED))
    except store_error_types():  # the store went too: left RUNNING, resumed next time
        return JobResult(
            job.key, job.run_id, RunState.KILLED, step=callback.last_step, reason=reason
        )
    return JobResult(job.key, job.run_id, RunState.FAILED, step=callback.last_step, reason=reason)


def _train_and_record(
    job: Job, mlflow_client: MlflowClient, buffer: MetricBuffer, callback: MlflowCallback
) -> JobResult:
    from workbench.sweep import record
    from workbench.train.factory import build_trainer
    from workbench.train.process import prepare_process

    config = job_config(job)
    corpus = job_corpus(job, config)
    prepare_process(config.train)  # the run's threads and TF32, for this whole process
    trainer = build_trainer(
        config,
        corpus,
        callback,
        Path(job.checkpoint_dir),
        checkpoint_every_s=job.checkpoint_every_s,
        fused=job.fused_adamw,
    )
    record.record_start(job, mlflow_client, buffer, trainer)
    result = trainer.fit()
    model = trainer.model
    return record.record_end(job, mlflow_client, buffer, callback.artifacts, result, model, corpus)


def preload() -> None:
    """Import what a job needs besides torch: MLflow's client with its SQLite store (the one
    kind of store a worker is started early for), the figures and the logged model. A worker
    started before the driver has a job for it spends that wait here, not on the job's time."""
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401  (a run's figures: no pyplot, no seaborn)
    import mlflow.entities
    import mlflow.models
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import workbench.mlflow_model
    import workbench.report.attention
    import workbench.report.figures
    import workbench.sweep.record  # noqa: F401

    store_error_types()


def job_config(job: Job) -> RunConfig:
    """The run's config, with its own thread count and, for a resume, the device and attention
    path it started with (``auto`` may choose others on this machine today)."""
    from workbench.spec import RunConfig

    config = RunConfig.model_validate(job.config)
    update: dict[str, Any] = {}
    if job.threads is not None:
        update["threads"] = job.threads
    if job.attention is not None:
        update["attention"] = job.attention
    if job.device is not None and config.train.device == "auto":
        update["device"] = job.device
    if not update:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update=update)})


def job_corpus(job: Job, config: RunConfig) -> Corpus:
    """The text the run trains on, from the job's data folder."""
    from workbench.corpus import Corpus
    from workbench.datasets import resolve_text_path

    data = config.data
    return Corpus.from_file(resolve_text_path(data.dataset, data.path, Path(job.data_dir)),
                            data.val_fraction)  # fmt: skip
