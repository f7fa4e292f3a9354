"""`workbench run` end to end: a real SQLite MLflow store, real worker processes, real signals."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from runs import Store, invoke, start, wait_for
from specs import write_spec

from workbench.tracking import TAG, flatten

pytestmark = pytest.mark.slow


def test_run_records_every_run_then_skips_them(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    result = invoke("run", str(spec), "--jobs", "2", *store.args())
    assert result.exit_code == 0, result.output
    runs = store.by_name()
    assert set(runs) == {"bigram s=1", "multi_head s=1"}
    name = "multi_head s=1"
    run = runs[name]
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    for tag in (
        "run_key",
        "sweep",
        "variant",
        "seed",
        "variant_index",
        "version",
        "device",
        "torch_version",
        "git_commit",
    ):
        assert tags.get(TAG + tag), tag
    assert tags[TAG + "variant"] == "multi_head" and tags[TAG + "device"] == "cpu"
    assert tags[TAG + "attention"] in ("native", "torch")  # auto on a CPU, blocks of 8
    assert TAG + "attention" not in runs["bigram s=1"].data.tags  # no attention there
    assert "train.attention" not in params or params["train.attention"] == "auto"
    assert params["train.max_iters"] == "40" and params["model.kind"] == "multi_head"
    assert TAG + "kind" not in tags  # model.kind says it
    assert [runs[n].data.tags[TAG + "variant_index"] for n in ("bigram s=1", name)] == ["0", "1"]
    assert int(params["num_params"]) > 0 and len(params["data_sha256"]) == 64
    for key in (
        "best_val_loss",
        "final_val_loss",
        "wall_time_s",
        "val_loss",
        "train_loss",
        "tokens_per_sec",
    ):
        assert key in metrics, key
    assert "lr" not in metrics  # a constant rate: a param, not a curve
    assert [s for s, _ in store.history(run.info.run_id, "val_loss")] == [0, 20, 40]
    artifacts = {a.path for a in store.client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "tokenizer.json", "sample.txt", "attention.json"} <= artifacts
    assert run.outputs.model_outputs  # the weights: the run's logged model
    assert not any(store.checkpoints.rglob("checkpoint.pt"))  # removed once finished

    again = invoke("run", str(spec), *store.args())
    assert again.exit_code == 0, again.output
    # a rerun with nothing to do says so in one line
    assert again.output.strip().splitlines() == [
        "t: nothing to do, 2 of 2 runs finished (--force retrains)"
    ]
    assert len(store.runs()) == 2  # nothing trained twice

    plan = invoke("plan", str(spec), "--tracking-uri", store.uri)
    assert plan.output.count("│ finished") == 2  # the status column
    assert "2 runs: 2 finished, 0 to resume, 0 to train" in plan.output

    forced = invoke("run", str(spec), "--force", "--only", "bigram*", *store.args())
    assert forced.exit_code == 0, forced.output
    *_, total = forced.output.strip().splitlines()  # the summary's last line: the totals
    assert re.fullmatch(r"t: 1 run: 1 finished, in \d+s; best of this sweep: bigram s=1 "
                        r"\(best val loss \d\.\d{4}\)", total), total  # fmt: skip
    assert [r.info.run_name for r in store.runs()].count("bigram s=1") == 2

    shorter = invoke("run", str(spec), "--set", "train.max_iters=20", "--only", "b*", *store.args())
    assert shorter.exit_code == 0, shorter.output
    assert "bigram iters=20 s=1" in store.by_name()  # not another "bigram s=1"

    sample = invoke(
        "sample",
        "multi_head s=1",
        "--tokens",
        "50",
        "--prompt",
        "ROMEO:",
        "--tracking-uri",
        store.uri,
    )
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("ROMEO:") and len(sample.output.rstrip("\n")) >= 50


def totals(result: Any) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-2:]


def test_plan_and_dry_run_say_what_is_left(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seeds=[1, 2])
    assert invoke("run", str(spec), "--only", "bigram*", *store.args()).exit_code == 0
    plan = ["plan", str(spec), "--tracking-uri", store.uri]
    dry = ["run", str(spec), "--dry-run", *store.args()]
    first, left = totals(invoke(*plan))
    assert first == "4 runs: 2 finished, 0 to resume, 2 to train"
    assert re.fullmatch(
        r"left: 20.5k tokens, about \d+s one run at a time "
        r"\(from the step times of 2 finished runs\)",
        left,
    )
    assert totals(invoke(*dry)) == [first, left]  # --dry-run reads the store as plan does
    assert "0 finished, 0 to resume, 4 to train" in totals(invoke(*dry, "--force"))[0]

    killed = store.by_name()["bigram s=2"]
    store.client.set_terminated(killed.info.run_id, status="KILLED")  # as Ctrl-C leaves it
    first, left = totals(invoke(*plan))
    assert first == "4 runs: 1 finished, 1 to resume, 2 to train"
    assert left.startswith("left: 20.5k tokens, about")  # its steps are all stored already
    assert len(store.runs()) == 2  # plan and --dry-run wrote nothing

    assert invoke("run", str(spec), *store.args()).exit_code == 0
    assert totals(invoke(*dry)) == [
        "4 runs: 4 finished, 0 to resume, 0 to train",
        "nothing left to train",
    ]


class Unsafe:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_sample_takes_a_name_id_or_key_and_never_guesses(store: Store, tmp_path: Path) -> None:
    short = {"max_iters": 20, "eval_interval": 10, "eval_iters": 2, "device": "cpu"}
    bigram = {"bigram": {"model": {"kind": "bigram"}}}
    spec = write_spec(tmp_path, train=short, variants=bigram)
    assert invoke("run", str(spec), *store.args()).exit_code == 0
    write_spec(tmp_path, train={**short, "max_iters": 30}, variants=bigram)  # the spec edited
    assert invoke("run", str(spec), *store.args()).exit_code == 0
    assert invoke("run", str(spec), "--force", *store.args()).exit_code == 0
    runs = sorted(store.runs(), key=lambda r: r.info.start_time)
    assert {r.info.run_name for r in runs} == {"bigram s=1"}
    old_key, new_key = runs[0].data.tags[TAG + "run_key"], runs[2].data.tags[TAG + "run_key"]
    assert old_key != new_key == runs[1].data.tags[TAG + "run_key"]

    def sample(run: str) -> Any:
        return invoke("sample", run, "--tokens", "5", "--tracking-uri", store.uri)

    ambiguous = sample("bigram s=1")
    assert ambiguous.exit_code == 2 and "Traceback" not in ambiguous.output
    lines = ambiguous.stderr.splitlines()
    assert "'bigram s=1' names 3 finished runs of 2 different configs" in lines[0]
    assert "(they differ in train.max_iters)" in lines[0]  # which setting to look at
    assert len(lines) == 4
    for line, run in zip(lines[1:], reversed(runs), strict=True):  # newest first
        assert run.info.run_id in line and run.data.tags[TAG + "run_key"] in line
        assert "experiment t" in line and "started 20" in line
        assert line.endswith(f"train.max_iters={run.data.params['train.max_iters']}"), line
    assert ambiguous.stdout == ""
    for ok in (old_key, new_key, runs[0].info.run_id):  # the same key twice: the newest
        assert sample(ok).exit_code == 0, sample(ok).output

    # A run from before logged models (no model among its outputs) whose model.pt is a pickle.
    marker = tmp_path / "unpickled"
    payload = tmp_path / "unsafe" / "model.pt"
    payload.parent.mkdir()
    payload.write_bytes(pickle.dumps({"config": Unsafe(marker)}))
    old = store.client.create_run(runs[0].info.experiment_id, run_name="old").info.run_id
    store.client.log_artifact(old, str(payload))
    tokenizer = store.client.download_artifacts(
        runs[0].info.run_id, "tokenizer.json", str(tmp_path)
    )
    store.client.log_artifact(old, tokenizer)
    refused = sample(old)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"run {old}: model.pt refused: not a weights-only")
    assert not marker.exists()


MODEL_PARAMS = {  # what each kind logs of the spec's model section (n_embd 16, n_head 2)
    "bigram": {"model.kind": "bigram"},
    "multi_head": {
        "model.kind": "multi_head",
        "model.n_embd": "16",
        "model.n_head": "2",
        "model.dropout": "0.0",
    },
}


def test_params_and_config_yaml_say_only_what_applies(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    result = invoke("run", str(spec), *store.args())
    assert result.exit_code == 0, result.output
    for variant, model_params in MODEL_PARAMS.items():
        run = store.by_name()[f"{variant} s=1"]
        params = run.data.params
        assert {k: v for k, v in params.items() if k.startswith("model.")} == model_params
        assert "None" not in params.values()
        for absent in ("data.path", "train.threads", "train.min_lr", "model.head_size"):
            assert absent not in params, absent
        assert ("train.attention" in params) is (variant == "multi_head")  # bigram has none
        assert params["data.dataset"] == "tinyshakespeare" and params["train.device"] == "cpu"
        folder = store.client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
        logged = yaml.safe_load(Path(folder).read_text())
        expected = set(params) - {"num_params", "data_sha256"}
        assert set(flatten(logged)) == expected  # config.yaml holds what the params hold
        assert logged["seed"] == 1


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
    assert runs["ok s=1"].info.status == "FINISHED"
    hot = runs["hot s=1"]
    assert hot.info.status == "FAILED"
    assert hot.data.tags[TAG + "diverged"] == "true"
    assert "step" in hot.data.tags[TAG + "reason"]
    assert "diverged" in result.output

    # The val split (111,540 characters) is shorter than one block: a run that raises.
    broken = write_spec(
        tmp_path,
        name="broken.yaml",
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


# Long enough that a signal after the first checkpoint lands in training, not in the end of the
# run (its logged model and figures take a second or two).
LONG = {"max_iters": 1500, "eval_interval": 50, "eval_iters": 2, "device": "cpu"}


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

    os.kill(wait_for(worker_pid, proc), signal.SIGKILL)
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
    for run in runs:  # one logged model each, the one the run names as its output
        models = store.client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert [o.model_id for o in run.outputs.model_outputs] == [m.model_id for m in models]
        assert len(models) == 1


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
    wait_for(lambda: any(store.checkpoints.rglob("checkpoint.pt")), proc)
    if how in ("sigint", "sigterm"):  # Ctrl-C or a polite kill: KILLED, checkpoint kept
        os.kill(proc.pid, signal.SIGINT if how == "sigint" else signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, output
        (run,) = store.runs()
        assert run.info.status == "KILLED", output
    else:  # kill -9 of the whole process group: left RUNNING, stale
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        (run,) = store.runs()
        assert run.info.status == "RUNNING"
        plan = invoke("plan", str(spec), "--tracking-uri", store.uri)
        assert "stale" in plan.output
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
