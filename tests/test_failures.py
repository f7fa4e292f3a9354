"""What a hostile user and a crashing machine do to a sweep: every kind of interruption ends,
after one plain `workbench run`, with exactly the numbers of an uninterrupted sweep; two
processes never train one run twice; files and values from outside are never trusted.

Real processes, real signals, a real SQLite store and, where the case needs one, a real loopback
`mlflow server`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from runs import Store, invoke, start, wait_for, wait_healthy
from specs import write_spec

from workbench.tracking import TAG, experiment_slug

pytestmark = pytest.mark.slow

# Three runs long enough to be interrupted after a checkpoint (a few seconds each).
TRAIN = {"max_iters": 3000, "eval_interval": 150, "eval_iters": 2, "device": "cpu"}
SWEEP = {
    "train": TRAIN,
    "model": {"n_embd": 32, "n_head": 4},
    "variants": {"mh": {"model": {"kind": "multi_head"}}},
    "seeds": [1, 2, 3],
}
METRICS = ("val_loss", "train_loss", "train_loss_smooth", "best_val_loss", "final_val_loss")


def sweep_spec(folder: Path, **overrides: Any) -> Path:
    return write_spec(folder, **{**SWEEP, **overrides})


def histories(store: Store) -> dict[str, list[tuple[int, float]]]:
    """Run key → val_loss curve, for a store holding one FINISHED run per key."""
    return {
        run.data.tags[TAG + "run_key"]: store.history(run.info.run_id, "val_loss")
        for run in store.runs()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, float]]]:
    """The sweep, uninterrupted, with the tests' own --jobs."""
    folder = tmp_path_factory.mktemp("reference")
    store = Store(folder)
    spec = sweep_spec(folder)
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "run", str(spec), "--jobs", "2", *store.args()],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return histories(store)


def assert_like_uninterrupted(store: Store, reference: dict[str, list[tuple[int, float]]]) -> None:
    """Every run FINISHED, one MLflow run per key, no metric step twice, the same losses."""
    runs = store.runs()
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * len(reference)
    keys = [r.data.tags[TAG + "run_key"] for r in runs]
    assert sorted(keys) == sorted(reference), "a key trained twice, or missing"
    for run in runs:
        for key in METRICS:
            steps = [s for s, _ in store.history(run.info.run_id, key)]
            assert steps == sorted(set(steps)), (run.info.run_name, key, "a step stored twice")
    got = histories(store)
    for key, curve in reference.items():
        assert_same_curve(got[key], curve)


def resume_to_uninterrupted(store: Store, spec: Path, reference: Any) -> None:
    """One plain `workbench run` after the interruption ends with the uninterrupted numbers."""
    resumed = invoke("run", str(spec), "--jobs", "2", *store.args())
    assert resumed.exit_code == 0, resumed.output
    assert_like_uninterrupted(store, reference)


def assert_same_curve(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same eval steps, and losses equal to 1e-6."""
    assert [step for step, _ in got] == [step for step, _ in want]
    worst = max((abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)), default=0.0)
    assert worst <= 1e-6, f"losses differ by up to {worst:.3g}"


def checkpoint_written(store: Store) -> bool:
    return any(store.checkpoints.rglob("checkpoint.pt"))


def nothing_running(store: Store) -> bool:
    return all(r.info.status != "RUNNING" for r in store.runs())


# --- 1. kill -9 of the driver alone -----------------------------------------------------------


def test_driver_killed_alone_leaves_its_runs_resumable(
    store: Store, tmp_path: Path, reference: Any
) -> None:
    spec = sweep_spec(tmp_path)
    proc = start(spec, store, "--jobs", "2")
    wait_for(lambda: checkpoint_written(store), proc)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers live on, orphaned
    proc.communicate(timeout=120)  # the workers share its stdout: they have exited too
    wait_for(lambda: nothing_running(store))
    statuses = {r.info.status for r in store.runs()}
    assert "FAILED" not in statuses and "KILLED" in statuses
    killed = [r for r in store.runs() if r.info.status == "KILLED"]
    reasons = [r.data.tags[TAG + "reason"] for r in killed]
    assert all("driver" in reason for reason in reasons), reasons

    resume_to_uninterrupted(store, spec, reference)


# --- 2 (kill -9 of one worker) is in test_run.py; here, the numbers after it ----------------


def test_killed_worker_resumes_to_the_uninterrupted_numbers(
    store: Store, tmp_path: Path, reference: Any
) -> None:
    spec = sweep_spec(tmp_path)
    proc = start(spec, store, "--jobs", "2")

    def a_worker() -> int | None:
        if not checkpoint_written(store):  # the store is not opened here before the sweep made it
            return None
        for run in store.runs():
            pid = run.data.tags.get(TAG + "pid")
            if run.info.status == "RUNNING" and pid:
                return int(pid)
        return None

    os.kill(wait_for(a_worker, proc), signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, output
    assert {r.info.status for r in store.runs()} <= {"FINISHED", "KILLED"}
    resume_to_uninterrupted(store, spec, reference)


# --- 3. a run's numbers do not depend on the rest of the sweep ----------------------------


def test_a_run_alone_gives_the_numbers_it_gives_in_a_sweep(
    store: Store, tmp_path: Path, reference: Any
) -> None:
    spec = sweep_spec(tmp_path)
    alone = invoke("run", str(spec), "--jobs", "2", "--only", "* s=3", *store.args())
    assert alone.exit_code == 0, alone.output
    (run,) = store.runs()
    assert run.data.tags[TAG + "threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    key = run.data.tags[TAG + "run_key"]
    assert_same_curve(store.history(run.info.run_id, "val_loss"), reference[key])


def test_a_resume_uses_the_runs_own_thread_count(store: Store, tmp_path: Path) -> None:
    spec = sweep_spec(tmp_path, seeds=[1])
    own = Store(tmp_path / "own")  # uninterrupted, -j 1
    done = invoke("run", str(spec), "--jobs", "1", *own.args())
    assert done.exit_code == 0, done.output
    (want,) = own.runs()

    proc = start(spec, store, "--jobs", "1")
    wait_for(lambda: checkpoint_written(store), proc)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    resumed = invoke("run", str(spec), "--jobs", "2", *store.args())  # other slots now
    assert resumed.exit_code == 0, resumed.output
    (run,) = store.runs()
    assert run.data.tags[TAG + "attempt"] == "2"
    assert run.data.tags[TAG + "threads"] == want.data.tags[TAG + "threads"]
    assert_same_curve(
        store.history(run.info.run_id, "val_loss"), own.history(want.info.run_id, "val_loss")
    )


HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))
# A setting workbench chooses per machine, the environment variable that turns its choice off,
# the tag that records it, and what it records with the variable 1 and 0.
CHOSEN = {
    "attention": ("WORKBENCH_NATIVE", "native", "torch"),  # auto: the native kernel, if built
    "adamw": ("WORKBENCH_PUBLIC_APIS", "elementwise", "fused"),  # fused: a private torch kernel
}


@pytest.mark.parametrize("tag", list(CHOSEN))
def test_a_resume_keeps_the_arithmetic_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str
) -> None:
    """What workbench chooses per machine (the attention path auto takes, torch's fused AdamW
    or the element-wise update) is recorded when a run starts: a resume takes it, whatever
    would be chosen now, and where it cannot run here the run stays resumable (KILLED,
    saying why) instead of continuing with other float sums."""
    if tag == "attention" and not HAS_COMPILER:
        pytest.skip("auto takes the torch path either way: no C compiler")
    variable, when_1, when_0 = CHOSEN[tag]
    spec = sweep_spec(tmp_path, seeds=[1])
    for value in ("0", "1"):
        started, now = (when_1 if value == "1" else when_0), ("1" if value == "0" else "0")
        monkeypatch.setenv(variable, value)
        own = Store(tmp_path / f"{value}-uninterrupted")
        assert invoke("run", str(spec), "--jobs", "1", *own.args()).exit_code == 0
        (want,) = own.runs()
        assert want.data.tags[TAG + tag] == started
        store = Store(tmp_path / f"{value}-interrupted")
        proc = start(spec, store, "--jobs", "1")
        wait_for(lambda: checkpoint_written(store), proc)  # noqa: B023 (called here)
        os.kill(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
        monkeypatch.setenv(variable, now)  # the machine would now choose the other way
        resumed = invoke("run", str(spec), "--jobs", "1", *store.args())
        (run,) = store.runs()
        if started in ("native", "fused"):  # what it started with cannot run now: no verdict
            assert run.info.status == "KILLED" and resumed.exit_code == 1, resumed.output
            assert "arithmetic it started with" in run.data.tags[TAG + "reason"]
            monkeypatch.setenv(variable, value)
            resumed = invoke("run", str(spec), "--jobs", "1", *store.args())
            (run,) = store.runs()
        assert resumed.exit_code == 0, resumed.output
        assert run.data.tags[TAG + tag] == started
        assert_same_curve(
            store.history(run.info.run_id, "val_loss"), own.history(want.info.run_id, "val_loss")
        )


# --- 4, 5. two processes at once ---------------------------------------------------------


def test_two_runs_of_one_spec_at_once_train_every_run_once(
    store: Store, tmp_path: Path, reference: Any
) -> None:
    spec = sweep_spec(tmp_path)
    MlflowClient(store.uri).search_experiments()  # an existing store (a fresh one: below)
    first = start(spec, store, "--jobs", "2")
    second = start(spec, store, "--jobs", "2")
    outputs = [proc.communicate(timeout=300)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert any("another workbench process" in output for output in outputs), outputs
    assert_like_uninterrupted(store, reference)


def test_commands_at_once_on_a_fresh_folder_share_one_store(store: Store, tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        train={"max_iters": 60, "eval_interval": 30, "eval_iters": 2, "device": "cpu"},
        variants={"bigram": {"model": {"kind": "bigram"}}},
        seeds=[1, 2],
    )
    procs = [start(spec, store, "--jobs", "1") for _ in range(3)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    runs = store.runs()
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert len({r.data.tags[TAG + "run_key"] for r in runs}) == 2
    again = invoke("plan", str(spec), "--tracking-uri", store.uri)  # the store is whole
    assert again.exit_code == 0 and again.output.count("│ finished") == 2, again.output


def one_line_error(result: Any, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_a_store_another_program_is_setting_up_is_waited_for(tmp_path: Path) -> None:
    """``mlflow ui`` or a client creating the store takes no lock of ours: for the seconds its
    migrations take the file looks half-made, and is waited for, not refused."""
    spec = sweep_spec(tmp_path)
    complete = tmp_path / "complete.db"
    MlflowClient(f"sqlite:///{complete}").search_experiments()  # a store MLflow finished
    database = tmp_path / "busy.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:  # mid-migration
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        connection.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250))")
    finisher = threading.Timer(1.5, shutil.copyfile, (complete, database))
    started = time.monotonic()
    finisher.start()
    result = invoke("plan", str(spec), "--tracking-uri", f"sqlite:///{database}")
    finisher.join()
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 1.5


def test_a_half_made_or_corrupt_store_is_one_line(tmp_path: Path) -> None:
    spec = sweep_spec(tmp_path)
    database = tmp_path / "half.db"
    store = Store(tmp_path, f"sqlite:///{database}")
    with contextlib.closing(sqlite3.connect(database)) as connection:  # a setup cut short
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        connection.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250))")
    an_hour_ago = time.time() - 3600  # left behind, not being set up right now
    os.utime(database, (an_hour_ago, an_hour_ago))
    one_line_error(invoke("run", str(spec), *store.args()), "half-made", "_alembic_tmp_tags")
    one_line_error(invoke("plan", str(spec), "--tracking-uri", store.uri), "half-made")

    database.write_bytes(os.urandom(8192))  # not a database at all
    os.utime(database, (an_hour_ago, an_hour_ago))
    one_line_error(invoke("run", str(spec), *store.args()), "not a readable SQLite database")
    assert database.stat().st_size == 8192  # left as it was

    (tmp_path / "a-file").write_text("")
    impossible = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"  # under a file, not a folder
    one_line_error(invoke("run", str(spec), "--tracking-uri", impossible), "cannot create")


# --- 6. checkpoints are data, never code -------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_poisoned_checkpoint_is_refused_not_executed(store: Store, tmp_path: Path) -> None:
    spec = sweep_spec(tmp_path, seeds=[1])
    proc = start(spec, store, "--jobs", "1")
    wait_for(lambda: checkpoint_written(store), proc)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    (checkpoint,) = store.checkpoints.rglob("checkpoint.pt")
    marker = tmp_path / "executed"
    torch.save({"model": _Payload(marker)}, checkpoint)

    result = invoke("run", str(spec), "--jobs", "1", *store.args())
    assert result.exit_code == 1, result.output
    assert not marker.exists(), "the checkpoint ran code"
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    assert "refused" in run.data.tags[TAG + "reason"]


# --- 7. a name is never a path ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../escape", "/tmp/workbench-escape", "a/b", "a_b", "..", ".", "\\..\\x", "é/ü"]
)
def test_experiment_names_are_never_paths(name: str) -> None:
    slug = experiment_slug(name)
    assert "/" not in slug and "\\" not in slug and not slug.startswith(".")
    assert (Path("/ck") / slug).resolve().parent == Path("/ck")
    others = {"../../escape", "/tmp/workbench-escape", "a/b", "a_b"} - {name}
    assert all(experiment_slug(other) != slug for other in others)


def test_an_experiment_named_like_a_path_stays_in_the_checkpoint_folder(
    store: Store, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    spec = write_spec(
        outside / "inner",
        experiment="../../escape",
        train={"max_iters": 30, "eval_interval": 15, "eval_iters": 2, "device": "cpu"},
        variants={"bigram": {"model": {"kind": "bigram"}}},
        seeds=[1],
    )
    checkpoints = outside / "inner" / "ck"
    result = invoke("run", str(spec), "--tracking-uri", store.uri, "--checkpoint-dir",
                    str(checkpoints), "--checkpoint-every", "0", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (outside / "escape").exists() and not (tmp_path / "escape").exists()
    locks = list(checkpoints.glob("*/*.lock"))  # the run's claim and its plan's parent's
    assert locks and {p.parent for p in locks} == {checkpoints / experiment_slug("../../escape")}


# --- 8. a small file that expands without bound ------------------------------------------

LAUGHS = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
)


@pytest.mark.parametrize(
    "tail",
    [
        "experiment: t\nseeds: *a8\n",
        "experiment: *a8\n",
        "experiment: t\ngrid: {train.block_size: *a8}\n",
        "experiment: t\nseeds: &s [1, *s]\n",
    ],
)
def test_yaml_bombs_are_refused_in_one_line(tmp_path: Path, tail: str) -> None:
    spec = tmp_path / "bomb.yaml"
    spec.write_text(LAUGHS + "\n" + tail)
    assert spec.stat().st_size < 1000
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "plan", str(spec), "--no-store"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert "refused" in line or "recursive alias" in line, line


def test_deep_or_huge_specs_are_refused_in_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("experiment: t\nseeds: " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_error(invoke("plan", str(deep), "--no-store"), "deep")
    huge = tmp_path / "huge.yaml"
    huge.write_text("experiment: t\n# " + "x" * (5 << 20) + "\n")
    one_line_error(invoke("plan", str(huge), "--no-store"), "at most")


# --- 9, 10. stores that are slow, read-only, malformed or go away ------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_unreachable_server_fails_in_seconds(tmp_path: Path, command: str) -> None:
    spec = sweep_spec(tmp_path)
    uri = f"http://127.0.0.1:{closed_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "workbench", command, str(spec), "--tracking-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,  # MLflow's own retries took minutes
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "unreachable" in line and uri in line


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, *options: str) -> Iterator[Path]:
    """A real small or read-only file system (needs root, as CI has)."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", ",".join(("size=16m", *options)), "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_folder_or_store_is_one_line(store: Store, tmp_path: Path) -> None:
    spec = sweep_spec(tmp_path)
    with mounted_tmpfs(tmp_path / "ro", "ro") as folder:
        fresh = f"sqlite:///{folder / 'mlflow.db'}"
        one_line_error(invoke("run", str(spec), "--tracking-uri", fresh), "cannot create")

    made = invoke("run", str(spec), "--only", "* s=1", *store.args())  # a real, whole store
    assert made.exit_code == 0, made.output
    with mounted_tmpfs(tmp_path / "ro2") as folder:
        shutil.copy(tmp_path / "mlflow.db", folder / "mlflow.db")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        plan = invoke("plan", str(spec), "--tracking-uri", uri)  # reading works
        assert plan.exit_code == 0 and "│ finished" in plan.output, plan.output
        result = invoke("run", str(spec), "--tracking-uri", uri, "--checkpoint-dir",
                        str(tmp_path / "ck"), "--no-progress")  # fmt: skip
        one_line_error(result, "read-only")


def test_malformed_workbench_tags_in_a_shared_store_do_not_crash(
    store: Store, tmp_path: Path
) -> None:
    spec = sweep_spec(tmp_path, seeds=[1])
    made = invoke("run", str(spec), *store.args())
    assert made.exit_code == 0, made.output
    (run,) = store.runs()
    forged = store.client.create_run(
        run.info.experiment_id,
        tags={
            TAG + "run_key": run.data.tags[TAG + "run_key"],
            TAG + "host": socket.gethostname(),
            TAG + "pid": "not-a-pid",
            TAG + "driver_pid": "-5",
            TAG + "heartbeat": "yesterday",
            TAG + "attempt": "many",
            TAG + "threads": "-3",
        },
    )
    plan = invoke("plan", str(spec), "--tracking-uri", store.uri)
    assert plan.exit_code == 0, plan.output
    assert "running" in plan.output  # the newest run of the key, alive as far as anyone knows
    again = invoke("run", str(spec), *store.args())
    assert again.exit_code == 0, again.output
    assert store.client.get_run(forged.info.run_id).info.status == "RUNNING"  # left alone


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    """A loopback `mlflow server` that a test can stop and start again on the same port."""
    folder = tmp_path / "server"
    folder.mkdir()
    port = closed_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
               str(port), "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []

    def up() -> None:
        proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        procs.append(proc)
        wait_healthy(uri, proc)

    def down() -> None:
        proc = procs[-1]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    up()
    yield uri, up, down
    with contextlib.suppress(ProcessLookupError):
        down()


def test_a_tracking_outage_leaves_runs_resumable(
    server: Any, tmp_path: Path, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, up, down = server
    monkeypatch.chdir(tmp_path)
    # MLflow's retries, shortened: an outage longer than them is what this is about.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    spec = sweep_spec(tmp_path)
    args = ["--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress",
            "--checkpoint-every", "0", "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(spec), *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    wait_for(lambda: any((tmp_path / "ck").rglob("checkpoint.pt")), proc)
    down()
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert any((tmp_path / "ck").rglob("checkpoint.pt")), "the checkpoints must survive"

    up()
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    resumed = invoke("run", str(spec), *args)
    assert resumed.exit_code == 0, resumed.output
    remote = Store(tmp_path, uri)
    assert_like_uninterrupted(remote, reference)
    for run in remote.runs():
        assert not str(run.data.tags.get(TAG + "reason", "")).startswith("Max retries")


def test_a_full_disk_during_a_checkpoint_says_so_and_stays_resumable(
    store: Store, tmp_path: Path, reference: Any
) -> None:
    spec = sweep_spec(tmp_path, seeds=[1])
    with mounted_tmpfs(tmp_path / "tiny", "size=16k") as tiny:
        args = ["--tracking-uri", store.uri, "--checkpoint-dir", str(tiny), "--no-progress",
                "--checkpoint-every", "0", "--jobs", "2"]  # fmt: skip
        full = invoke("run", str(spec), *args)
        assert full.exit_code == 1, full.output
        (run,) = store.runs()
        assert run.info.status == "KILLED"
        assert "no space left on device" in run.data.tags[TAG + "reason"]
        assert not list(tiny.rglob("*.tmp")), "a partial checkpoint was left behind"
        subprocess.run(["mount", "-o", "remount,size=16m", str(tiny)], check=True)
        resumed = invoke("run", str(spec), *args)
        assert resumed.exit_code == 0, resumed.output
    (run,) = store.runs()
    key = run.data.tags[TAG + "run_key"]
    assert run.info.status == "FINISHED"
    assert_same_curve(store.history(run.info.run_id, "val_loss"), reference[key])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "train.max_iters={[1]: 2}"], "expected an integer"),  # a key that is a list
        (["--tracking-uri", "sqlite:"], "not a valid sqlite URI"),
    ],
)
def test_odd_values_are_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    spec = sweep_spec(tmp_path)
    one_line_error(invoke("plan", str(spec), *args), words)


def test_a_pack_too_large_for_its_members_tag_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack's run keys are one MLflow tag (workbench.pack_members, at most 8000 characters)."""
    spec = sweep_spec(tmp_path)
    monkeypatch.chdir(tmp_path)  # where the default store would be made
    one_line_error(invoke("run", str(spec), "--pack-size", "257"), "--pack-size 257: at most 256")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_spec_that_never_ends_is_read_only_up_to_the_limit(tmp_path: Path) -> None:
    one_line_error(invoke("plan", "/dev/zero", "--no-store"), "at most 1 MiB")
    spec = tmp_path / "keys.yaml"
    spec.write_text("experiment: t\n? [1, 2]\n: 3\n")
    one_line_error(invoke("plan", str(spec), "--no-store"), "plain value")
