"""What a run records: when the driver creates it, its tags, description, params and datasets;
around training, the tags of the process that trains it, and at the end its summary metrics, its
verdict (finished or diverged), its artifacts and figures and its logged model. One place for
both a run trained alone (:mod:`workbench.sweep.jobs`) and a member of a pack
(:mod:`workbench.sweep.packs`), so both look the same in MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from workbench.errors import first_line
from workbench.naming import format_value
from workbench.processes import process_tags
from workbench.spec import applicable_config
from workbench.tracking import (
    TAG,
    MetricBuffer,
    RunState,
    dataset_inputs,
    flatten,
    mlflow_status,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from workbench.corpus import Corpus
    from workbench.grid import Run
    from workbench.models.ladder import LanguageModel
    from workbench.sweep.jobs import Job, JobResult
    from workbench.train.loop import TrainResult
    from workbench.train.packed import PackedTrainer
    from workbench.train.trainer import Trainer


def record_start(
    job: Job,
    mlflow_client: MlflowClient,
    buffer: MetricBuffer,
    trainer: Trainer | PackedTrainer,
    member: int = 0,
) -> None:
    """The process, device, attention code and optimizer update that train the run (member
    ``member`` of a pack), and its parameter count, stored before the first step. A resume
    takes the attention code and the update recorded here (``workbench.sweep.driver``)."""
    import torch

    from workbench.train.trainer import Trainer

    device = trainer.device
    model = trainer.model if isinstance(trainer, Trainer) else trainer.member_model(member)
    tags = {
        **process_tags("pid"),
        TAG + "host": socket.gethostname(),
        TAG + "device": str(device),
        TAG + "torch_version": torch.version.__version__,  # a plain str: the driver stores it
    }
    backend = model.attention_backend
    if backend is not None:  # which attention code ran (train.attention: auto chooses per machine)
        tags[TAG + "attention"] = backend.name
    tags[TAG + "adamw"] = "fused" if trainer.optimizer.fused else "elementwise"
    if device.type == "cuda":  # which GPU, to find the runs that shared one
        tags[TAG + "gpu_name"] = torch.cuda.get_device_name(device)
        tags[TAG + "cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    buffer.tags(tags)
    # The parameter count, here where the model is built (the driver need not import torch). A
    # resumed run has it already, unless its first attempt was killed before this flush.
    if not job.resumed or "num_params" not in mlflow_client.get_run(job.run_id).data.params:
        buffer.params({"num_params": str(model.num_params())})
    # Now, not with the first checkpoint: until this process's pid is in the store, a sweep
    # started beside an orphaned worker (its driver killed) would take the run for a stale one.
    buffer.flush(heartbeat=False)


def record_end(
    job: Job,
    mlflow_client: MlflowClient,
    buffer: MetricBuffer,
    artifacts: dict[str, str | bytes],
    result: TrainResult,
    model: LanguageModel,
    corpus: Corpus,
) -> JobResult:
    """The run's summary, then its verdict: a diverged run ends FAILED (tagged diverged) with
    its checkpoint dropped (resuming would diverge the same way); a finished one gets its
    artifacts, figures and logged model, then ends FINISHED."""
    from workbench.sweep.jobs import JobResult

    diverged = result.status is RunState.DIVERGED
    summary = {
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "wall_time_s": result.wall_time_s,
    }
    buffer.add(summary, result.step)
    if diverged:
        buffer.tags(
            {
                TAG + "diverged": "true",
                TAG + "reason": result.reason or "diverged",
                TAG + "stopped_step": str(result.step),
            }
        )
    buffer.flush(heartbeat=False, final=True)
    if not diverged:
        log_artifacts(mlflow_client, job, corpus, artifacts, result.history)
        log_final_model(mlflow_client, job, model, corpus.tokenizer, result.step)
    ended = RunState.DIVERGED if diverged else RunState.FINISHED
    mlflow_client.set_terminated(job.run_id, status=mlflow_status(ended))
    # Not kept: a finished run is done, and a diverged one would diverge the same way again.
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return JobResult(
        job.key,
        job.run_id,
        RunState.DIVERGED if diverged else RunState.FINISHED,
        step=result.step,
        best_val_loss=result.best_val_loss,
        final_val_loss=None if diverged else result.final_val_loss,
        wall_time_s=None if diverged else result.wall_time_s,
        device=result.device,
        reason=result.reason if diverged else None,
    )


def log_artifacts(
    mlflow_client: MlflowClient,
    job: Job,
    corpus: Any,
    artifacts: dict[str, str | bytes],
    history: list[dict[str, float]],
) -> None:
    """Every artifact written to one folder, then logged in one call (a call costs ~25 ms).
    The weights are not among them: they are the run's logged model."""
    from workbench.spec import RunConfig, applicable_config

    logged = applicable_config(RunConfig.model_validate(job.config))  # the same as the params
    with tempfile.TemporaryDirectory(prefix="workbench-artifacts-") as folder:
        out = Path(folder)
        (out / "config.yaml").write_text(yaml.safe_dump(logged, sort_keys=False))
        (out / "tokenizer.json").write_text(corpus.tokenizer.to_json(), encoding="utf-8")
        for name, content in artifacts.items():
            if isinstance(content, str):
                (out / name).write_text(content, encoding="utf-8")
            else:
                (out / name).write_bytes(content)
        write_figures(out, job.name, artifacts, history)
        mlflow_client.log_artifacts(job.run_id, folder)


def write_figures(
    folder: Path, name: str, artifacts: dict[str, str | bytes], history: list[dict[str, float]]
) -> None:
    """The loss curve and, with attention, the attention maps as PNG files, which mlflow ui
    shows as images: drawn by the report's own code (small and cheap: they are drawn for every
    run), logged with the other artifacts. The attention JSON stays, for programs. A figure
    that cannot be drawn is left out: it is never a verdict on the run."""
    from workbench.report.attention import attention_png
    from workbench.report.figures import loss_curve_png

    with contextlib.suppress(Exception):
        curve = loss_curve_png(history, name)
        if curve is not None:
            (folder / "loss_curve.png").write_bytes(curve)
    attention = artifacts.get("attention.json")
    if attention is not None:
        with contextlib.suppress(Exception):
            payload = json.loads(attention)
            png = attention_png(str(payload["prompt"]), payload["weights"])
            (folder / "attention.png").write_bytes(png)


def log_final_model(
    mlflow_client: MlflowClient, job: Job, model: Any, tokenizer: Any, step: int
) -> None:
    """The final weights as the run's MLflow model, before the run is FINISHED, and once: a
    resumed run keeps the READY model an earlier attempt logged (its weights are the ones this
    attempt reached again from the same checkpoint) and discards a partial one."""
    from workbench import mlflow_model
    from workbench.sweep.jobs import is_environment_failure

    if job.resumed and mlflow_model.reuse_or_discard(mlflow_client, job.run_id, step):
        return
    try:
        mlflow_model.log_model(mlflow_client, job.run_id, model, tokenizer, step)
    except Exception as exc:
        if is_environment_failure(exc):
            raise  # the store or the disk: KILLED, resumable, as anywhere in the job
        # The run trained: a model that cannot be exported is not a verdict on it. It ends
        # FINISHED without one, and says why.
        reason = f"{type(exc).__name__}: {first_line(exc, 200)}"
        mlflow_client.set_tag(job.run_id, TAG + "model_error", reason)


def create_run(
    mlflow_client: MlflowClient, experiment_id: str, run: Run, sweep_tags: dict[str, str]
) -> str:
    """The MLflow run of a grid point: its tags, note, params and dataset inputs, written once
    (a resume reopens the run and keeps them)."""
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
        "mlflow.note.content": run_note(run, sweep_tags.get("mlflow.source.name", "")),
    }
    if run.reference_val_loss is not None:  # the published figure, for the report
        tags[TAG + "reference_val_loss"] = str(run.reference_val_loss)
    created = mlflow_client.create_run(experiment_id, run_name=run.name, tags=tags)
    run_id: str = created.info.run_id
    values = flatten(applicable_config(config))  # what the run was, nothing that does not apply
    values["data_sha256"] = run.data_sha256  # num_params: the worker's, once it built the model
    mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in values.items()])
    data = config.data
    inputs = dataset_inputs(data.dataset, data.path, run.data_sha256, data.val_fraction)
    mlflow_client.log_inputs(run_id, datasets=inputs)
    return run_id


def run_note(run: Run, spec: str) -> str:
    """One line saying what a run is, MLflow's run description (``mlflow.note.content``):
    its variant and seed, the values its spec's grid gives it, the ``--set`` values that change
    it, and the spec file."""
    values = ", ".join(f"`{k}={format_value(v)}`" for k, v in run.varying.items())
    changed = ", ".join(f"`{k}={format_value(v)}`" for k, v in run.changed.items())
    parts = [f"Variant `{run.variant}`, seed {run.seed}"]
    if values:
        parts.append(f"grid: {values}")
    if changed:
        parts.append(f"--set: {changed}")
    where = f" of `{spec}`" if spec else ""
    return "; ".join(parts) + where + "."
