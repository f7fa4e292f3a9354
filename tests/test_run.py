"""`workbench run` end to end: a real SQLite MLflow store, real worker processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runs import Store, invoke, start, wait_for, write_spec

from workbench.tracking import TAG

pytestmark = pytest.mark.slow


def test_run_records_every_run_then_skips_them(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    result = invoke("run", str(spec), "--jobs", "2", *store.args())
    assert result.exit_code == 0, result.output
    runs = store.by_name()
    assert set(runs) == {"bigram-seed=1", "multi_head-seed=1"}
    run = runs["multi_head-seed=1"]
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    for tag in (
        "run_key",
        "sweep",
        "variant",
        "seed",
        "kind",
        "version",
        "device",
        "torch_version",
        "git_commit",
    ):
        assert tags.get(TAG + tag), tag
    assert tags[TAG + "variant"] == "multi_head" and tags[TAG + "device"] == "cpu"
    assert params["train.max_iters"] == "40" and params["model.kind"] == "multi_head"
    assert int(params["num_params"]) > 0 and len(params["data_sha256"]) == 64
    for key in (
        "best_val_loss",
        "final_val_loss",
        "wall_time_s",
        "val_loss",
        "train_loss",
        "lr",
        "tokens_per_sec",
    ):
        assert key in metrics, key
    assert [s for s, _ in store.history(run.info.run_id, "val_loss")] == [0, 20, 40]
    artifacts = {a.path for a in store.client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "tokenizer.json", "sample.txt", "attention.json", "model.pt"} <= (
        artifacts
    )
    assert not any(store.checkpoints.rglob("checkpoint.pt"))  # removed once finished

    again = invoke("run", str(spec), *store.args())
    assert again.exit_code == 0, again.output
    assert "skipped (done)" in again.output
    assert len(store.runs()) == 2  # nothing trained twice

    plan = invoke("plan", str(spec), "--tracking-uri", store.uri)
    assert plan.output.count("done") == 2

    forced = invoke("run", str(spec), "--force", "--only", "bigram*", *store.args())
    assert forced.exit_code == 0, forced.output
    assert [r.info.run_name for r in store.runs()].count("bigram-seed=1") == 2

    sample = invoke(
        "sample",
        "multi_head-seed=1",
        "--tokens",
        "50",
        "--prompt",
        "ROMEO:",
        "--tracking-uri",
        store.uri,
    )
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("ROMEO:") and len(sample.output.rstrip("\n")) >= 50


def test_four_workers_lose_and_duplicate_no_metric_point(store: Store, tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        train={"max_iters": 100, "eval_interval": 20, "eval_iters": 2, "device": "cpu"},
        seeds=[1, 2, 3, 4],
    )
    result = invoke("run", str(spec), "--jobs", "4", *store.args())
    assert result.exit_code == 0, result.output
    runs = store.runs()
    assert len(runs) == 8
    for run in runs:
        assert run.info.status == "FINISHED"
        for key, steps in (
            ("val_loss", range(0, 101, 20)),
            ("train_loss", range(0, 101, 20)),
            ("train_loss_smooth", range(50, 101, 50)),  # progress: one point per 50 steps
            ("lr", [100]),  # every 500 steps, and the last
            ("tokens_per_sec", [100]),
            ("best_val_loss", [100]),
        ):
            history = store.history(run.info.run_id, key)
            assert [s for s, _ in history] == list(steps), (run.info.run_name, key)


def test_divergence_and_failure_do_not_stop_the_grid(store: Store, tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        variants={
            "ok": {"model": {"kind": "multi_head"}},
            "hot": {"model": {"kind": "multi_head"}, "train": {"learning_rate": 100.0}},
        },
    )
    result = invoke("run", str(spec), *store.args())
    assert result.exit_code == 1, result.output
    runs = store.by_name()
    assert runs["ok-seed=1"].info.status == "FINISHED"
    hot = runs["hot-seed=1"]
    assert hot.info.status == "FAILED"
    assert hot.data.tags[TAG + "diverged"] == "true"
    assert "step" in hot.data.tags[TAG + "reason"]
    assert "diverged" in result.output

    # The val split (111,540 characters) is shorter than one block: a run that raises.
    broken = write_spec(
        tmp_path,
        "broken.yaml",
        experiment="t2",
        train={
            "max_iters": 40,
            "eval_interval": 20,
            "eval_iters": 2,
            "block_size": 200_000,
            "device": "cpu",
        },
        variants={"bigram": {"model": {"kind": "bigram"}}},
        seeds=[1],
    )
    failed = invoke("run", str(broken), *store.args())
    assert failed.exit_code == 1, failed.output
    (run,) = store.runs("t2")
    assert run.info.status == "FAILED"
    assert "too few for block_size" in run.data.tags[TAG + "reason"]

    retry = invoke("run", str(spec), *store.args())  # failed runs stay failed by default
    assert retry.exit_code == 0 and len(store.runs()) == 2
    rerun = invoke("run", str(spec), "--rerun-failed", *store.args())
    assert rerun.exit_code == 1 and len(store.runs()) == 3  # tried again, diverged again


# --- processes that die or are interrupted (the CLI in a subprocess) ---------------------


LONG = {"max_iters": 1500, "eval_interval": 100, "eval_iters": 2, "device": "cpu"}


def test_killed_worker_leaves_its_run_resumable(store: Store, tmp_path: Path) -> None:
    """A worker that dies (kill -9, the OOM killer) is a crash, not a verdict: its run is
    KILLED with the reason, and the next plain `workbench run` resumes it from its checkpoint."""
    spec = write_spec(
        tmp_path,
        train=LONG,
        variants={"multi_head": {"model": {"kind": "multi_head"}}},
        seeds=[1, 2],
    )
    proc = start(spec, store, "--jobs", "1")

    def worker_pid() -> int | None:
        if not any(store.checkpoints.rglob("checkpoint.pt")):
            return None
        for run in store.runs():
            if run.info.status == "RUNNING" and TAG + "pid" in run.data.tags:
                return int(run.data.tags[TAG + "pid"])
        return None

    os.kill(wait_for(worker_pid), signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, output
    statuses = sorted((r.info.status, r.data.tags.get(TAG + "reason", "")) for r in store.runs())
    assert statuses[0][0] == "FINISHED"
    assert statuses[1][0] == "KILLED" and "SIGKILL" in statuses[1][1]
    assert any(store.checkpoints.rglob("checkpoint.pt"))

    resumed = invoke("run", str(spec), "--jobs", "1", *store.args())
    assert resumed.exit_code == 0, resumed.output
    runs = store.runs()
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    (again,) = [r for r in runs if r.data.tags[TAG + "attempt"] == "2"]
    assert TAG + "reason" not in again.data.tags  # why it stopped is no longer true


def uninterrupted_history(tmp_path: Path, spec: Path) -> list[tuple[int, float]]:
    other = Store(tmp_path / "reference")
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "run", str(spec), *other.args()],
        cwd=spec.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = other.runs()
    return other.history(run.info.run_id, "val_loss")


@pytest.mark.parametrize("how", ["sigint", "sigterm", "sigkill"])
def test_interrupted_grid_resumes_to_the_same_numbers(
    store: Store, tmp_path: Path, how: str
) -> None:
    spec = write_spec(tmp_path, train=LONG, variants={"mh": {"model": {"kind": "multi_head"}}})
    proc = start(spec, store)
    wait_for(lambda: any(store.checkpoints.rglob("checkpoint.pt")))
    if how in ("sigint", "sigterm"):  # Ctrl-C or a polite kill: KILLED, checkpoint kept
        os.kill(proc.pid, signal.SIGINT if how == "sigint" else signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, output
        (run,) = store.runs()
        assert run.info.status == "KILLED"
    else:  # kill -9 of the whole process group: left RUNNING, a ghost
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        (run,) = store.runs()
        assert run.info.status == "RUNNING"
        plan = invoke("plan", str(spec), "--tracking-uri", store.uri)
        assert "ghost" in plan.output
    assert any(store.checkpoints.rglob("checkpoint.pt"))

    resumed = invoke("run", str(spec), *store.args())
    assert resumed.exit_code == 0, resumed.output
    (run,) = store.runs()  # the same MLflow run, continued
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG + "attempt"] == "2"
    history = store.history(run.info.run_id, "val_loss")
    steps = [s for s, _ in history]
    assert steps == sorted(set(steps)), "a step was logged twice"
    reference = uninterrupted_history(tmp_path, spec)
    assert steps == [s for s, _ in reference]
    for (_, got), (_, want) in zip(history, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
