"""The Ray executor against a real `mlflow server` (SQLite backend, proxied artifacts) and a real
local Ray cluster: the same spec as locally, nothing changed but the flags."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from runs import mlflow_server, wait_for
from specs import write_spec

from workbench.tracking import TAG

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(f"sqlite:///{folder / 'server.db'}", folder) as uri:
        yield uri


def ray_spec(folder: Path, experiment: str, variants: dict[str, Any], iters: int) -> Path:
    train = {"max_iters": iters, "eval_interval": iters // 4, "eval_iters": 2, "device": "cpu"}
    return write_spec(
        folder,
        experiment=experiment,
        train=train,
        variants=variants,
        seeds=[1, 2],
        name=f"{experiment}.yaml",
    )


def workbench_run(spec: Path, uri: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workbench",
            "run",
            str(spec),
            "--executor",
            "ray",
            "--tracking-uri",
            uri,
            "--checkpoint-dir",
            str(spec.parent / "checkpoints"),
            "--no-progress",
            "--checkpoint-every",
            "0",
            *extra,
        ],
        cwd=spec.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )


def output_of(proc: subprocess.Popen[str]) -> str:
    """What ``proc`` printed once it ended. A process that dies ends the wait at once; one that
    runs on is waited for generously (a loaded machine is slow, never a reason to fail), then
    killed, failing the test with what it printed."""
    try:
        output, _ = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"workbench run did not end in 30 minutes:\n{output}")
    return output


def runs_of(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs([found.experiment_id])
    return [r for r in runs if "workbench.plan" not in r.data.tags]  # a sweep's parent: not a run


def test_grid_on_ray_logs_to_the_server_and_reruns_skip(server: str, tmp_path: Path) -> None:
    spec = ray_spec(
        tmp_path,
        "ray-ok",
        {"bigram": {"model": {"kind": "bigram"}}, "multi_head": {"model": {"kind": "multi_head"}}},
        iters=40,
    )
    output = output_of(workbench_run(spec, server))
    assert "finished" in output, output
    runs = runs_of(server, "ray-ok")
    assert len(runs) == 4
    client = MlflowClient(server)
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert sorted(steps) == [0, 10, 20, 30, 40]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"sample.txt", "config.yaml"} <= artifacts  # through the server
        assert run.outputs.model_outputs  # the weights: a logged model, through the server

    again = workbench_run(spec, server)
    output = output_of(again)
    assert again.returncode == 0, output
    nothing = "ray-ok: nothing to do, 4 of 4 runs finished (--force retrains)"
    assert output.strip().splitlines() == [nothing], output  # one line
    assert len(runs_of(server, "ray-ok")) == 4

    from workbench.report import write_reports

    (html, *_) = write_reports(server, ["ray-ok"], tmp_path / "reports")
    assert html.exists() and "multi_head" in html.read_text()


def test_a_pack_is_one_ray_task_that_records_each_member(server: str, tmp_path: Path) -> None:
    spec = ray_spec(tmp_path, "ray-pack", {"multi_head": {"model": {"kind": "multi_head"}}}, 40)
    proc = workbench_run(spec, server, "--pack")
    output = output_of(proc)
    assert proc.returncode == 0, output
    runs = runs_of(server, "ray-pack")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert len({r.data.tags[TAG + "pack"] for r in runs}) == 1  # trained together
    assert len({r.data.tags[TAG + "pid"] for r in runs}) == 1  # by one task
    client = MlflowClient(server)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert sorted(steps) == [0, 10, 20, 30, 40]
        assert run.outputs.model_outputs


def test_crashed_worker_is_retried_and_a_raising_run_fails(server: str, tmp_path: Path) -> None:
    spec = ray_spec(
        tmp_path,
        "ray-faults",
        {
            "victim": {"model": {"kind": "multi_head"}},
            # the val split (111,540 characters) is shorter than one block: raises
            "raises": {"model": {"kind": "bigram"}, "train": {"block_size": 200_000}},
        },
        iters=2000,
    )
    proc = workbench_run(spec, server)
    client = MlflowClient(server)

    def victim_pid() -> int | None:
        for run in runs_of(server, "ray-faults"):
            tags = run.data.tags
            if (
                tags.get(TAG + "variant") == "victim"
                and run.info.status == "RUNNING"
                and TAG + "pid" in tags
                and TAG + "heartbeat" in tags
            ):
                history = client.get_metric_history(run.info.run_id, "val_loss")
                if any(m.step > 0 for m in history):  # past its first checkpoint
                    return int(tags[TAG + "pid"])
        return None

    os.kill(wait_for(victim_pid, proc), signal.SIGKILL)
    output = output_of(proc)
    assert proc.returncode == 1, output  # the raising runs failed
    by_variant: dict[str, list[Any]] = {}
    for run in runs_of(server, "ray-faults"):
        by_variant.setdefault(run.data.tags[TAG + "variant"], []).append(run)
    assert all(r.info.status == "FAILED" for r in by_variant["raises"])
    assert all(
        "too few for block_size" in r.data.tags[TAG + "reason"] for r in by_variant["raises"]
    )
    victims = by_variant["victim"]
    assert len(victims) == 2 and all(r.info.status == "FINISHED" for r in victims)
    attempts = sorted(r.data.tags[TAG + "attempt"] for r in victims)
    assert attempts == ["1", "2"]  # the killed one was retried once, in the same run
    retried = next(r for r in victims if r.data.tags[TAG + "attempt"] == "2")
    steps = [m.step for m in client.get_metric_history(retried.info.run_id, "val_loss")]
    assert sorted(steps) == sorted(set(steps)) == list(range(0, 2001, 500))


def test_the_retry_budget_counts_crashes_in_this_sweep_not_earlier_attempts(
    tmp_path: Path,
) -> None:
    """A run resumed twice already (attempt 3) still gets ``max_retries`` retries when its worker
    dies: every attempt's worker is killed as it starts, and each is retried until the budget
    is spent."""
    import ray

    from workbench.grid import expand
    from workbench.settings import load_settings
    from workbench.sweep.events import Event, Started
    from workbench.sweep.executors.ray import RayExecutor
    from workbench.sweep.jobs import Job, JobResult, JobStatus
    from workbench.tracking import ensure_experiment

    spec = ray_spec(tmp_path, "ray-budget", {"bigram": {"model": {"kind": "bigram"}}}, 100_000)
    run = expand(spec, [], ["* s=1"]).runs[0]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "ray-budget")
    run_id = (
        MlflowClient(uri).create_run(experiment_id, tags={TAG + "run_key": run.key}).info.run_id
    )
    job = Job(
        name=run.name,
        key=run.key,
        config=run.config.model_dump(mode="json"),
        run_id=run_id,
        tracking_uri=uri,
        checkpoint_dir=str(tmp_path / "checkpoints" / run.key),
        data_dir=str(load_settings().data_dir),
        resumed=True,
        attempt=3,  # resumed by two sweeps before this one
    )
    started: list[int] = []
    crashes: list[str] = []

    def kill_on_start(event: Event) -> None:
        if isinstance(event, Started):
            started.append(event.pid)
            os.kill(event.pid, signal.SIGKILL)

    def on_crash(crashed: Job, reason: str, status: JobStatus) -> JobResult:
        crashes.append(reason)
        return JobResult(crashed.key, crashed.run_id, status, reason=reason)

    try:
        RayExecutor(max_retries=2, num_cpus=1).run(
            [job], lambda item: item, kill_on_start, on_crash
        )
    finally:
        ray.shutdown()
    assert len(started) == 3, started  # the first try and two retries
    assert len(crashes) == 1 and crashes[0].startswith("worker died 3 times"), crashes
    attempt = MlflowClient(uri).get_run(run_id).data.tags[TAG + "attempt"]
    assert attempt == "5"  # each retry still counts up the run's attempt
