"""What a run tells MLflow about where it came from, read back through MLflow's public client:
dataset inputs (training and evaluation), MLflow's source tags, the run's note, and MLflow's
system metrics behind ``--system-metrics``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.data
import pytest
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.tracking import MlflowClient
from runs import Store, invoke, mlflow_server
from specs import write_spec

from workbench.datasets import KNOWN_DATASETS
from workbench.grid import expand
from workbench.provenance import source_tags, user
from workbench.settings import load_settings
from workbench.sweep.driver import Options, run_sweep
from workbench.sweep.jobs import Job, JobResult
from workbench.sweep.record import run_note
from workbench.tracking import TAG, dataset_digest, dataset_inputs

SHAKESPEARE = KNOWN_DATASETS["tinyshakespeare"]


def contexts(run: Any) -> dict[str, Any]:
    """A run's dataset inputs by their context (``training``, ``evaluation``)."""
    found = {}
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        found[tags["mlflow.data.context"]] = item.dataset
    assert len(found) == len(run.inputs.dataset_inputs)
    return found


class Preparer:
    """An executor that creates (or reopens) each run in the store and trains nothing."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def run(
        self, items: list[Any], prepare: Callable[[Any], Job], on_event: Any, on_crash: Any
    ) -> list[JobResult]:
        self.jobs += [prepare(item) for item in items]
        return []

    def warm_up(self, runs: int) -> None:
        pass

    def close(self) -> None:
        pass


def prepare_runs(spec: Path, store: Store, *sets: str) -> Preparer:
    executor = Preparer()
    options = Options(store.uri, store.checkpoints, load_settings().data_dir)
    run_sweep(expand(spec, list(sets)), executor, options)
    return executor


# --- datasets -----------------------------------------------------------------------------------


def test_a_known_data_set_is_two_inputs_with_its_url(tmp_path: Path) -> None:
    sha = SHAKESPEARE.sha256
    train, val = dataset_inputs("tinyshakespeare", None, sha, 0.1)
    assert [i.tags[0].key for i in (train, val)] == ["mlflow.data.context"] * 2
    assert [i.tags[0].value for i in (train, val)] == ["training", "evaluation"]
    assert train.dataset.name == val.dataset.name == "tinyshakespeare"
    assert train.dataset.digest == dataset_digest(sha, "train", 0.1)
    assert val.dataset.digest == dataset_digest(sha, "val", 0.1)
    source = mlflow.data.get_source(train)  # read back by MLflow's own source classes
    assert isinstance(source, HTTPDatasetSource) and source.url == SHAKESPEARE.url


def test_a_file_is_named_by_its_name_with_its_path_as_source(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 50, encoding="utf-8")
    train, _ = dataset_inputs(None, str(text), "ab" * 32, 0.1)
    assert train.dataset.name == "corpus.txt"
    assert mlflow.data.get_source(train).to_dict() == {"uri": str(text)}


def test_digests_tell_apart_the_parts_and_the_splits_of_a_text() -> None:
    sha = SHAKESPEARE.sha256
    digests = {dataset_digest(sha, p, f) for p in ("train", "val") for f in (0.1, 0.2)}
    digests.add(dataset_digest("0" * 64, "train", 0.1))
    assert len(digests) == 5
    assert all(len(d) == 16 and int(d, 16) >= 0 for d in digests)  # MLflow allows 36
    assert dataset_digest(sha, "train", 0.1) == dataset_digest(sha, "train", 0.1)


def test_runs_record_their_data_once_and_can_be_found_by_it(store: Store, tmp_path: Path) -> None:
    text = tmp_path / "mine.txt"
    text.write_text("to be or not to be\n" * 100, encoding="utf-8")
    spec = write_spec(tmp_path, seeds=[1, 2])
    prepare_runs(spec, store)
    prepare_runs(spec, store, "data.path=mine.txt", "seeds=[1]")
    runs = store.runs()
    assert len(runs) == 6  # 2 variants x 2 seeds on Shakespeare, 2 x 1 on mine.txt
    for run in runs:
        assert set(contexts(run)) == {"training", "evaluation"}
    (experiment,) = {r.info.experiment_id for r in runs}

    def found(where: str) -> set[str]:
        return {r.info.run_id for r in store.client.search_runs([experiment], where)}

    on_shakespeare = found("dataset.name = 'tinyshakespeare'")
    assert len(on_shakespeare) == 4
    assert len(found("dataset.name = 'mine.txt'")) == 2
    digest = dataset_digest(SHAKESPEARE.sha256, "train", 0.1)
    assert found(f"dataset.digest = '{digest}'") == on_shakespeare
    trained = "dataset.name = 'tinyshakespeare' AND dataset.context = 'training'"
    assert found(trained) == on_shakespeare


def test_a_resume_keeps_the_run_s_inputs_and_note(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    first = prepare_runs(spec, store)
    for job in first.jobs:
        store.client.set_terminated(job.run_id, status="KILLED")
    again = prepare_runs(spec, store)
    assert [j.run_id for j in again.jobs] == [j.run_id for j in first.jobs]
    assert all(j.resumed for j in again.jobs)
    for run in store.runs():
        assert len(run.inputs.dataset_inputs) == 2
        assert run.data.tags["mlflow.note.content"].startswith("Variant `")


# --- source tags and the note -------------------------------------------------------------------


def git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout


def test_a_spec_in_a_checkout_names_its_file_commit_and_remote(tmp_path: Path) -> None:
    repo = tmp_path / "experiments-repo"
    spec = write_spec(repo / "specs", name="ablation.yaml")
    git(repo, "init", "-q")
    git(repo, "remote", "add", "origin", "https://me:s3cret@example.com/me/experiments.git")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "spec")
    tags = source_tags(spec)
    assert tags["mlflow.source.name"] == "specs/ablation.yaml"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert tags["mlflow.source.git.repoURL"] == "https://example.com/me/experiments.git"
    assert tags["mlflow.user"] == user() and user()
    assert tags[TAG + "git_dirty"] == "false"
    assert TAG + "git_commit" not in tags  # MLflow's tag says it
    spec.write_text(spec.read_text() + "# edited\n")
    assert source_tags(spec)[TAG + "git_dirty"] == "true"


def test_a_spec_outside_any_checkout_names_its_absolute_path(tmp_path: Path) -> None:
    if subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip("the temporary folder is inside a git checkout")
    spec = write_spec(tmp_path)
    tags = source_tags(spec)
    assert tags["mlflow.source.name"] == str(spec.resolve())
    assert not any(k.startswith("mlflow.source.git.") for k in tags)


def test_the_note_says_variant_seed_what_varies_and_the_spec(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seeds=[7])
    spec.write_text(spec.read_text() + "grid:\n  train.learning_rate: [0.001, 0.003]\n")
    run = expand(spec, ["train.max_iters=20"]).runs[1]
    assert run_note(run, "specs/s.yaml") == (
        "Variant `bigram`, seed 7; grid: `train.learning_rate=0.003`; "
        "--set: `train.max_iters=20` of `specs/s.yaml`."
    )
    assert "\n" not in run_note(run, "s.yaml")


def test_created_runs_carry_mlflow_s_tags_and_no_duplicates(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    prepare_runs(spec, store)
    for run in store.runs():
        tags = run.data.tags
        assert tags["mlflow.source.name"] == source_tags(spec)["mlflow.source.name"]
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"] == user() and run.info.user_id == user()
        assert tags["mlflow.note.content"].endswith(f"of `{tags['mlflow.source.name']}`.")
        assert TAG + "spec" not in tags  # mlflow.source.name says it
        assert run.info.run_name.endswith(" s=1")


# --- system metrics -----------------------------------------------------------------------------


def test_system_metrics_without_psutil_is_one_line_and_writes_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now fails
    spec = write_spec(tmp_path)
    result = invoke("run", str(spec), "--system-metrics", *store.args())
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "--system-metrics needs psutil, which is not installed: "
        "pip install 'workbench[system-metrics]'"
    ]
    assert not (tmp_path / "mlflow.db").exists() and not store.checkpoints.exists()


@pytest.mark.slow
def test_system_metrics_are_recorded_per_run(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("psutil", reason="the system-metrics extra is not installed")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # the workers inherit it
    spec = write_spec(tmp_path, train={"max_iters": 400, "eval_interval": 200, "device": "cpu"})
    result = invoke("run", str(spec), "--only", "bigram *", "--system-metrics", *store.args())
    assert result.exit_code == 0, result.output
    (run,) = store.runs()
    assert run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert TAG + "system_metrics" not in run.data.tags  # nothing went wrong

    plain = invoke("run", str(spec), "--only", "multi_head *", *store.args())
    assert plain.exit_code == 0, plain.output
    run = store.by_name()["multi_head s=1"]
    assert not any(k.startswith("system/") for k in run.data.metrics)  # off by default


# --- against a real server ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_on_a_server_shows_datasets_sources_and_notes(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "specs")
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as url:
        store = Store(tmp_path, url)
        result = invoke("run", str(spec), *store.args())
        assert result.exit_code == 0, result.output
        client = MlflowClient(url)
        every = client.search_runs([client.get_experiment_by_name("t").experiment_id])
        runs = [r for r in every if TAG + "run_key" in r.data.tags]  # not the sweep's parent
        assert sorted(r.info.run_name for r in runs) == ["bigram s=1", "multi_head s=1"]
        for run in runs:
            assert run.info.status == "FINISHED"
            data = contexts(run)
            assert {d.name for d in data.values()} == {"tinyshakespeare"}
            assert data["training"].digest == dataset_digest(SHAKESPEARE.sha256, "train", 0.1)
            assert mlflow.data.get_source(data["evaluation"]).url == SHAKESPEARE.url
            tags = run.data.tags
            assert tags["mlflow.source.name"] == str(spec.resolve())
            assert tags["mlflow.user"] == user()
            assert tags["mlflow.note.content"] == (
                f"Variant `{tags[TAG + 'variant']}`, seed 1 of `{spec.resolve()}`."
            )
        experiment = runs[0].info.experiment_id
        found = client.search_runs([experiment], "dataset.name = 'tinyshakespeare'")
        assert len(found) == 2
        assert not client.search_runs([experiment], "dataset.name = 'other'")


def test_the_report_reads_the_spec_and_commit_from_mlflow_s_tags(
    store: Store, tmp_path: Path
) -> None:
    from workbench.report.load import load_experiment
    from workbench.report.page import _provenance

    repo = tmp_path / "repo"
    spec = write_spec(repo, name="ablation.yaml")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "spec")
    prepare_runs(spec, store)
    for run in store.runs():
        assert TAG + "spec" not in run.data.tags and TAG + "git_commit" not in run.data.tags
    provenance = _provenance(load_experiment(store.uri, "t"))
    assert provenance["spec"] == "ablation.yaml"
    assert provenance["commit"] == git(repo, "rev-parse", "HEAD").strip()[:12]
