"""Issue 17's parent run per sweep, the report in MLflow and a run's figures as PNGs, read back
through MLflow's public client from a real SQLite store and a real loopback `mlflow server`.

One parent per distinct plan (a hash of its sorted run keys): a rerun reuses it, `--set` or
`--only` get their own, a resumed run keeps the parent it was created under, and every reader of
runs (skip and resume, the report, `sample`) passes parents by.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from runs import Store, invoke, mlflow_server, start, wait_for
from specs import write_spec

from workbench.grid import expand
from workbench.processes import process_start
from workbench.report.attention import attention_png
from workbench.report.figures import loss_curve_png
from workbench.report.load import load_experiment
from workbench.store import client, ensure_experiment
from workbench.sweep.claims import Claims
from workbench.sweep.driver import plan_records
from workbench.sweep.parent import open_parent, resolved_spec
from workbench.tracking import PLAN_TAG, TAG, RunState, existing_runs, plan_id

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
slow = pytest.mark.slow  # trains: seconds to a minute each


def assert_png(content: bytes) -> tuple[int, int]:
    """Valid PNG bytes: the signature, then an IHDR chunk with a non-empty image; its size."""
    assert content[:8] == PNG_SIGNATURE
    assert content[12:16] == b"IHDR"
    width, height = int.from_bytes(content[16:20], "big"), int.from_bytes(content[20:24], "big")
    assert width > 50 and height > 50
    return width, height


def artifact(client: MlflowClient, run_id: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return Path(client.download_artifacts(run_id, path, folder)).read_bytes()


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


def parent_of(run: Any) -> str | None:
    tags: dict[str, str] = run.data.tags
    return tags.get("mlflow.parentRunId")


def sweep(store: Store, spec: Path, *extra: str) -> None:
    result = invoke("run", str(spec), *store.args(), *extra)
    assert result.exit_code == 0, result.output


def counts_of(parent: Any) -> dict[str, int]:
    """The parent's run counts per state, from its ``workbench.runs_*`` tags."""
    prefix = TAG + "runs_"
    return {k.removeprefix(prefix): int(v) for k, v in parent.data.tags.items()
            if k.startswith(prefix)}  # fmt: skip


# --- without training -------------------------------------------------------------------------


def test_a_plan_is_its_set_of_run_keys() -> None:
    assert plan_id(["b", "a"]) == plan_id(["a", "b", "a"])  # order and repeats do not count
    assert plan_id(["a", "b"]) != plan_id(["a"]) != plan_id(["a", "c"])
    assert len(plan_id(["a"])) == 16 and int(plan_id(["a"]), 16) >= 0


def test_resolved_spec_is_the_spec_with_the_set_values_in_a_comment(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    plan = expand(spec, ["train.learning_rate=0.002", "train.max_iters=30"])
    text = resolved_spec(plan)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments[1] == "# --set applied: train.learning_rate=0.002 train.max_iters=30"
    loaded = yaml.safe_load(text)
    assert loaded["experiment"] == "t" and set(loaded["variants"]) == {"bigram", "multi_head"}


def test_run_figures_are_small_valid_pngs_and_draw_text_plainly() -> None:
    history = [{"step": float(s), "train_loss": 4.0 - s / 50, "val_loss": 4.1 - s / 60}
               for s in range(0, 41, 20)]  # fmt: skip
    curve = loss_curve_png(history, "multi_head $\\a$ s=1")  # broken mathtext, as text
    assert curve is not None
    width, height = assert_png(curve)
    assert width >= 480 and height >= 320  # mlflow ui shows it at this size: readable
    assert loss_curve_png([], "nothing") is None
    weights = [[[[1.0 if k == q else 0.0 for k in range(4)] for q in range(4)]] * 2]  # 1 x 2
    image = attention_png("$\\a$", weights)  # the same in a prompt
    width, height = assert_png(image)
    assert width >= 400 and height >= 200
    assert len(image) < 60_000 and len(curve) < 60_000


# --- one sweep, read back ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Path]]:
    """The smoke spec (bigram and multi-head, one seed each) swept once, for reading back."""
    folder = tmp_path_factory.mktemp("swept")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        store = Store(folder)
        spec = write_spec(folder)
        sweep(store, spec, "--jobs", "2")
        yield store, spec


@slow
def test_one_parent_per_sweep_holds_the_spec_counts_and_best_run(
    swept: tuple[Store, Path],
) -> None:
    store, spec = swept
    (parent,) = store.parents()
    children = store.runs()
    assert len(children) == 2
    assert {parent_of(c) for c in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"t [{parent.data.tags[TAG + 'plan'][:8]}]"
    plan = expand(spec)
    assert parent.data.tags[PLAN_TAG] == plan_id(r.key for r in plan.runs)
    assert TAG + "run_key" not in parent.data.tags and parent_of(parent) is None
    assert parent.data.params["grid_size"] == "2"
    counts = counts_of(parent)
    assert counts["finished"] == 2
    assert counts["failed"] == counts["diverged"] == counts["killed"] == counts["to_do"] == 0
    # The Charts view of mlflow ui shows the parent's metrics: the best val loss, nothing else.
    assert set(parent.data.metrics) == {"best_val_loss"}
    best = min(children, key=lambda c: c.data.metrics["best_val_loss"])
    assert parent.data.metrics["best_val_loss"] == best.data.metrics["best_val_loss"]
    assert parent.data.tags[TAG + "best_run_id"] == best.info.run_id
    assert parent.data.tags[TAG + "best_run_name"] == best.info.run_name
    assert parent.data.tags["mlflow.note.content"].startswith("Sweep of t: 2 runs")
    spec_yaml = yaml.safe_load(artifact(store.client, parent.info.run_id, "spec.yaml"))
    assert spec_yaml["experiment"] == "t" and spec_yaml["train"]["max_iters"] == 40


@slow
def test_every_reader_of_runs_passes_the_parent_by(swept: tuple[Store, Path]) -> None:
    store, spec = swept
    (parent,) = store.parents()
    experiment = store.client.get_experiment_by_name("t")
    keys = {r.key for r in expand(spec).runs}
    assert set(existing_runs(store.uri, experiment.experiment_id)) == keys
    assert set(plan_records(expand(spec), store.uri)) == keys
    reported = load_experiment(store.uri, "t").runs  # the report's runs
    assert len(reported) == 2 and parent.info.run_id not in set(reported.index)
    assert {r.state for r in plan_records(expand(spec), store.uri).values()} == {RunState.FINISHED}
    sweep(store, spec)  # nothing to train: nothing written, parent included
    (again,) = store.parents()
    assert again.data.tags[TAG + "attempt"] == "1" and again.info.status == "FINISHED"
    assert len(store.runs()) == 2
    refused = invoke("sample", parent.info.run_id, "--tokens", "5", "--tracking-uri", store.uri)
    assert refused.exit_code == 2 and "parent run" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1
    by_name = invoke("sample", "t", "--tokens", "5", "--tracking-uri", store.uri)
    assert by_name.exit_code == 2 and "no finished run" in by_name.output  # the parent's name


@slow
def test_runs_log_their_loss_curve_and_attention_maps_as_png(swept: tuple[Store, Path]) -> None:
    store, _ = swept
    runs = store.by_name()
    for name, run in runs.items():
        paths = artifact_paths(store.client, run.info.run_id)
        assert_png(artifact(store.client, run.info.run_id, "loss_curve.png"))
        if name.startswith("multi_head"):
            assert {"attention.png", "attention.json"} <= paths  # the JSON stays
            assert_png(artifact(store.client, run.info.run_id, "attention.png"))
        else:
            assert "attention.png" not in paths and "attention.json" not in paths


@slow
def test_the_report_is_attached_to_the_latest_parent(
    swept: tuple[Store, Path], tmp_path: Path
) -> None:
    store, _ = swept
    (parent,) = store.parents()
    for _ in range(2):  # a second report replaces the first
        result = invoke("report", "--tracking-uri", store.uri, "--out", str(tmp_path))
        assert result.exit_code == 0, result.output
        assert "not attached" not in result.output
    paths = artifact_paths(store.client, parent.info.run_id, "report")
    assert paths == {"report/t.html", "report/t.csv"}
    assert (
        artifact(store.client, parent.info.run_id, "report/t.html")
        == (tmp_path / "t.html").read_bytes()
    )
    assert (
        artifact(store.client, parent.info.run_id, "report/t.csv")
        == (tmp_path / "t.csv").read_bytes()
    )
    for run in store.runs():  # nothing on the children
        assert not artifact_paths(store.client, run.info.run_id, "report")


# --- reruns, --set, --only --------------------------------------------------------------------


@slow
def test_a_rerun_reuses_the_parent_and_set_or_only_get_their_own(
    store: Store, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path)
    assert invoke("run", str(spec), "--dry-run", *store.args()).exit_code == 0
    assert not (tmp_path / "mlflow.db").exists()  # a dry run writes nothing, parent included
    sweep(store, spec)
    (first,) = store.parents()
    sweep(store, spec, "--force")  # the same plan again: the same parent, reopened and ended
    (parent,) = store.parents()
    assert parent.info.run_id == first.info.run_id
    assert parent.data.tags[TAG + "attempt"] == "2" and parent.info.status == "FINISHED"
    assert len(store.runs()) == 4
    assert {parent_of(r) for r in store.runs()} == {parent.info.run_id}
    assert counts_of(parent)["finished"] == 2  # the plan's two keys, each counted once

    sweep(store, spec, "--set", "train.max_iters=20")  # other runs: another parent
    sweep(store, spec, "--only", "bigram*", "--force")  # one of the first plan's: another
    parents = {p.data.params["grid_size"]: p for p in store.parents()}
    assert len(store.parents()) == 3 and set(parents) == {"2", "1"}
    children: dict[str | None, int] = {}
    for run in store.runs():  # one parent each, the one of the sweep that created it
        children[parent_of(run)] = children.get(parent_of(run), 0) + 1
    (set_parent,) = [p for p in store.parents() if p.info.run_id != first.info.run_id
                     and p.data.params["grid_size"] == "2"]  # fmt: skip
    assert children == {
        first.info.run_id: 4,
        set_parent.info.run_id: 2,
        parents["1"].info.run_id: 1,
    }
    assert {p.info.status for p in store.parents()} == {"FINISHED"}
    assert len({p.data.tags[PLAN_TAG] for p in store.parents()}) == 3
    names = {p.info.run_name: p.data.tags[PLAN_TAG][:8] for p in store.parents()}
    assert sorted(name.rsplit(" [", 1)[0] for name in names) == [  # what --set and --only made
        "t", "t iters=20", "t only=bigram*"]  # fmt: skip
    assert all(name.endswith(f" [{plan}]") for name, plan in names.items())

    report = ["report", "--tracking-uri", store.uri, "--out", str(tmp_path / "reports")]
    assert invoke(*report).exit_code == 0
    latest = parents["1"].info.run_id  # the parent a sweep opened last gets the report
    for p in store.parents():
        attached = artifact_paths(store.client, p.info.run_id, "report")
        assert attached == ({"report/t.html", "report/t.csv"} if p.info.run_id == latest else set())

    for p in store.parents():  # a store from before parents: the files only, and no warning
        store.client.delete_run(p.info.run_id)
    (tmp_path / "reports" / "t.html").unlink()
    result = invoke(*report)
    assert result.exit_code == 0 and "attached" not in result.output, result.output
    assert (tmp_path / "reports" / "t.html").exists()


# --- interruptions ----------------------------------------------------------------------------

LONG = {"max_iters": 3000, "eval_interval": 150, "eval_iters": 2, "device": "cpu"}


def long_spec(folder: Path) -> Path:
    return write_spec(folder, train=LONG, model={"n_embd": 32, "n_head": 4},
                      variants={"mh": {"model": {"kind": "multi_head"}}}, seeds=[1, 2])  # fmt: skip


def checkpoint_written(store: Store) -> bool:
    return any(store.checkpoints.rglob("checkpoint.pt"))


def newest_checkpoint(store: Store) -> float:
    return max((p.stat().st_mtime for p in store.checkpoints.rglob("checkpoint.pt")), default=0.0)


@slow
def test_resume_after_sigint_and_sigkill_of_the_driver_keeps_one_parent(
    store: Store, tmp_path: Path
) -> None:
    spec = long_spec(tmp_path)
    proc = start(spec, store, "--jobs", "2")
    wait_for(lambda: checkpoint_written(store), proc)
    os.kill(proc.pid, signal.SIGINT)  # interrupted: the parent ends KILLED, never FAILED
    proc.communicate(timeout=120)
    (parent,) = store.parents()
    assert parent.info.status == "KILLED"
    counts = counts_of(parent)
    assert counts["killed"] + counts["finished"] == 2, counts

    before = newest_checkpoint(store)
    proc = start(spec, store, "--jobs", "2")  # resumes, then is killed outright
    wait_for(lambda: newest_checkpoint(store) > before, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers end their runs KILLED
    proc.communicate(timeout=120)
    wait_for(lambda: all(r.info.status != "RUNNING" for r in store.runs()))
    assert "FAILED" not in {r.info.status for r in store.runs()}
    (parent,) = store.parents()
    assert parent.info.status in ("RUNNING", "KILLED")  # no process left to end it

    sweep(store, spec, "--jobs", "2")
    runs = store.runs()
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert len({r.data.tags[TAG + "run_key"] for r in runs}) == 2  # one run per key
    (parent,) = store.parents()
    assert {parent_of(r) for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG + "attempt"] == "3"
    assert counts_of(parent)["finished"] == 2


def test_sweeps_opening_one_plan_at_once_find_one_parent(store: Store, tmp_path: Path) -> None:
    """Four drivers open the plan's parent at the same moment: one creates it, the others
    reopen it (without the plan's lock, each would create its own)."""
    plan = expand(write_spec(tmp_path))
    experiment_id = ensure_experiment(store.uri, "t")
    barrier = threading.Barrier(4)
    opened: list[str] = []

    def open_one() -> None:
        claims = Claims(store.checkpoints / "t")  # a process of its own: its own lock files
        barrier.wait()
        opened.append(open_parent(client(store.uri), experiment_id, plan, {}, claims).run_id)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    (parent,) = store.parents()
    assert opened == [parent.info.run_id] * 4
    assert parent.data.tags[TAG + "attempt"] == "4"


@slow
def test_two_sweeps_of_one_plan_at_once_share_one_parent(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seeds=[1, 2])
    store.client.search_experiments()  # an existing store
    procs = [start(spec, store, "--jobs", "1") for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    (parent,) = store.parents()
    runs = store.runs()
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    assert {parent_of(r) for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and counts_of(parent)["finished"] == 4


# --- a real server ----------------------------------------------------------------------------


@slow
def test_parent_pngs_and_report_through_a_tracking_server(tmp_path: Path) -> None:
    backend = Store(tmp_path)
    spec = write_spec(tmp_path)
    with mlflow_server(backend.uri, tmp_path) as url:
        store = Store(tmp_path, uri=url)
        done = subprocess.run(
            [sys.executable, "-m", "workbench", "run", str(spec), *store.args()],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        result = invoke("report", "--tracking-uri", url, "--out", str(tmp_path / "reports"))
        assert result.exit_code == 0, result.output
        client = MlflowClient(url)
        (parent,) = store.parents()
        runs = store.runs()
        assert {parent_of(r) for r in runs} == {parent.info.run_id} and len(runs) == 2
        assert artifact_paths(client, parent.info.run_id, "report") == {
            "report/t.html", "report/t.csv"
        }  # fmt: skip
        html = artifact(client, parent.info.run_id, "report/t.html")
        assert html == (tmp_path / "reports" / "t.html").read_bytes()
        multi_head = next(r for r in runs if r.info.run_name.startswith("multi_head"))
        assert_png(artifact(client, multi_head.info.run_id, "attention.png"))
        for run in runs:
            assert_png(artifact(client, run.info.run_id, "loss_curve.png"))


@pytest.mark.slow
def test_a_dead_sweeps_parent_is_ended_by_the_next_command(store: Store, tmp_path: Path) -> None:
    """A driver killed outright left its parent RUNNING until the same plan ran again (the
    second hostile round); `workbench report` and a `workbench run` of any plan of the
    experiment find its process gone and end it KILLED. A live sweep's parent is left alone."""
    import subprocess
    import sys

    spec = write_spec(tmp_path)
    sweep(store, spec)
    (parent,) = store.parents()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid: a process that has ended
    store.client.set_tag(parent.info.run_id, TAG + "driver_pid", str(gone.pid))
    store.client.update_run(parent.info.run_id, status="RUNNING")
    report = ["report", "--tracking-uri", store.uri, "--out", str(tmp_path / "reports")]
    assert invoke(*report).exit_code == 0
    ended = store.client.get_run(parent.info.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[TAG + "reason"] == "its sweep's process is gone"

    store.client.update_run(parent.info.run_id, status="RUNNING")  # again, and this time alive
    store.client.set_tag(parent.info.run_id, TAG + "driver_pid", str(os.getpid()))
    start = process_start(os.getpid())  # None where the OS does not say: the pid alone
    if start is not None:
        store.client.set_tag(parent.info.run_id, TAG + "driver_pid_start", start)
    assert invoke(*report).exit_code == 0
    assert store.client.get_run(parent.info.run_id).info.status == "RUNNING"

    store.client.set_tag(parent.info.run_id, TAG + "driver_pid", str(gone.pid))
    sweep(store, spec, "--set", "train.max_iters=20")  # another plan of the experiment
    assert store.client.get_run(parent.info.run_id).info.status == "KILLED"
