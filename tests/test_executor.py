"""What a sweep decides and builds: each stored run's state and what the driver does with it,
which executor ``--executor`` builds, and which GPU each local worker gets."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from specs import write_spec

from workbench.errors import WorkbenchError
from workbench.grid import expand
from workbench.sweep.driver import Action, Options, decide
from workbench.sweep.events import Ended, Progress, Started
from workbench.sweep.executors import make_executor
from workbench.sweep.executors.local import LocalExecutor, worker_gpu
from workbench.sweep.executors.ray import RayExecutor
from workbench.sweep.jobs import JobResult
from workbench.tracking import TAG, RunRecord, RunState

ELSEWHERE = {TAG + "host": socket.gethostname() + "-elsewhere"}  # judged by its heartbeat
STORED = {  # what the store holds of a run in each state: MLflow's status and our tags
    RunState.FINISHED: ("FINISHED", {}),
    RunState.FAILED: ("FAILED", {}),
    RunState.DIVERGED: ("FAILED", {TAG + "diverged": "true"}),
    RunState.KILLED: ("KILLED", {}),
    RunState.RUNNING: ("RUNNING", {**ELSEWHERE, TAG + "heartbeat": f"{time.time() + 3600:.0f}"}),
    RunState.STALE: ("RUNNING", {**ELSEWHERE, TAG + "heartbeat": "1000"}),
}


@pytest.mark.parametrize("state", list(STORED))
def test_a_stored_run_has_one_state(state: RunState) -> None:
    status, tags = STORED[state]
    assert RunRecord("id", status, tags, {}, start_time=0).state is state
    assert str(state) == f"{state}" == state.value  # the word users see, in any string


@pytest.mark.parametrize(
    ("state", "flags", "action"),
    [
        (RunState.FINISHED, {}, Action.SKIP),
        (RunState.FINISHED, {"force": True}, Action.NEW),
        (RunState.KILLED, {}, Action.RESUME),
        (RunState.STALE, {}, Action.RESUME),
        (RunState.FAILED, {}, Action.SKIP),
        (RunState.DIVERGED, {"rerun_failed": True}, Action.NEW),
        (RunState.RUNNING, {"force": True}, Action.SKIP),
        (RunState.CLAIMED, {"force": True}, Action.SKIP),
        (RunState.TO_DO, {}, Action.NEW),
    ],
)
def test_the_driver_acts_on_each_state(
    tmp_path: Path, state: RunState, flags: dict[str, bool], action: Action
) -> None:
    plan = expand(write_spec(tmp_path))
    key = plan.runs[0].key
    records = {}
    if state in STORED:
        status, tags = STORED[state]
        records[key] = RunRecord("id", status, tags, {}, start_time=0)
    claimed = frozenset([key] if state is RunState.CLAIMED else [])
    options = Options("sqlite:///unused.db", tmp_path, tmp_path, **flags)
    decision = decide(plan, records, options, claimed)[0]
    assert (decision.state, decision.action) == (state, action)


def test_events_cross_a_process_boundary_unchanged() -> None:
    result = JobResult("key", "run", RunState.FINISHED, step=3, best_val_loss=1.5)
    for event in (Started("key", 42), Progress("key", 3, {"val_loss": 2.0}), Ended("key", result)):
        assert pickle.loads(pickle.dumps(event)) == event


@pytest.mark.parametrize(
    ("jobs_per_gpu", "expected"),
    [(1, ["0", "1", "0", "1"]), (2, ["0", "0", "1", "1"])],
)
def test_slots_fill_the_gpus_in_order(jobs_per_gpu: int, expected: list[str]):
    assert [worker_gpu(slot, 2, jobs_per_gpu, None) for slot in range(4)] == expected


@pytest.mark.parametrize(
    "visible",
    ["2,3", " 2, 3 ", "GPU-aaaa,GPU-bbbb", "MIG-1,MIG-2"],
)
def test_workers_stay_inside_the_drivers_visible_gpus(visible: str):
    entries = [entry.strip() for entry in visible.split(",")]
    assert [worker_gpu(slot, 2, 1, visible) for slot in range(3)] == [
        entries[0],
        entries[1],
        entries[0],
    ]


def test_an_empty_visible_list_means_indices():
    assert worker_gpu(1, 2, 1, "") == "1"


def test_make_executor_builds_the_local_executor_with_threads_per_slot() -> None:
    executor, threads = make_executor("local", jobs=2)
    assert isinstance(executor, LocalExecutor)
    assert (executor.jobs, executor.threads_per_job) == (2, threads)
    assert threads == max(1, (os.cpu_count() or 1) // 2)


def test_make_executor_builds_the_ray_executor_from_its_flags() -> None:
    executor, threads = make_executor(
        "ray", address="auto", cpus_per_run=2.5, gpus_per_run=0.25, max_retries=5
    )
    assert executor == RayExecutor("auto", 2.5, 0.25, 5)
    assert threads == 2


def test_make_executor_refuses_an_unknown_name() -> None:
    with pytest.raises(WorkbenchError, match="must be local or ray"):
        make_executor("dask")


def test_a_signal_held_back_without_a_python_handler_still_acts() -> None:
    """signals_deferred with SIGTERM at its default: the process still ends by it, afterwards
    (it used to be dropped)."""
    script = (
        "import os, signal\n"
        "from workbench.sweep.signals import signals_deferred\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "with signals_deferred():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('held back', flush=True)\n"
        "print('survived', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout == "held back\n" and done.returncode == -signal.SIGTERM, done


# --- liveness: a process is its pid and when it started -----------------------------------------


def test_a_running_run_whose_pid_now_names_another_process_is_stale(tmp_path: Path) -> None:
    """A pid the kernel handed to another process (after a crash, or a reboot) keeps no run
    RUNNING: the start time recorded beside the pid tells the two apart."""
    from workbench.processes import process_start

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        here = {TAG + "host": socket.gethostname(), TAG + "pid": str(other.pid)}
        start = process_start(other.pid)
        if start is None:
            pytest.skip("this OS does not say when a process started (/proc)")
        boot = start.split(":")[0]
        cases = {
            start: RunState.RUNNING,  # its own process, alive
            f"{boot}:1": RunState.STALE,  # the pid of a process started since
            f"another-boot:{start.split(':')[1]}": RunState.STALE,  # from before a reboot
        }
        for recorded, state in cases.items():
            tags = {**here, TAG + "pid_start": recorded}
            assert RunRecord("id", "RUNNING", tags, {}, start_time=0).state is state, recorded
        # A run recorded before start times were: the pid alone, as before.
        assert RunRecord("id", "RUNNING", here, {}, start_time=0).state is RunState.RUNNING
    finally:
        other.kill()
        other.wait()
    tags = {**here, TAG + "pid_start": start}
    assert RunRecord("id", "RUNNING", tags, {}, start_time=0).state is RunState.STALE  # gone


@pytest.mark.slow
def test_a_run_left_running_by_a_reused_pid_is_resumed(store: Any, tmp_path: Path) -> None:
    """The second hostile round: a RUNNING run whose recorded pid belongs to a live, unrelated
    process was skipped as "running elsewhere" for as long as that process lived."""
    from runs import invoke

    spec = write_spec(tmp_path)
    assert invoke("run", str(spec), *store.args()).exit_code == 0
    run = store.runs()[0]
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for name in ("pid", "driver_pid"):  # both now name the unrelated process
            store.client.set_tag(run.info.run_id, TAG + name, str(unrelated.pid))
        store.client.update_run(run.info.run_id, status="RUNNING")
        result = invoke("run", str(spec), *store.args())
        assert result.exit_code == 0, result.output
        again = store.client.get_run(run.info.run_id)
        assert again.info.status == "FINISHED" and again.data.tags[TAG + "attempt"] == "2"
        assert unrelated.poll() is None  # still alive, and not taken for the run
    finally:
        unrelated.kill()
        unrelated.wait()


@pytest.mark.slow
def test_workers_take_the_drivers_environment_of_the_moment_they_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Linux without GPUs the workers fork from a forkserver that imported torch and MLflow
    once, in the environment of the first sweep of this process. Each sweep's workers still
    take the environment of their own start (here: WORKBENCH_PUBLIC_APIS, which chooses the
    AdamW update), and spawned workers (macOS, GPUs) train a run to the same numbers."""
    import multiprocessing as mp

    from runs import Store, invoke

    from workbench.sweep.executors import local

    expected = "forkserver" if sys.platform.startswith("linux") else "spawn"
    assert local.worker_context(0).get_start_method() == expected
    assert local.worker_context(1).get_start_method() == "spawn"
    spec = write_spec(tmp_path, variants={"multi_head": {"model": {"kind": "multi_head"}}})
    monkeypatch.chdir(tmp_path)

    def sweep(name: str, public: str) -> Any:
        monkeypatch.setenv("WORKBENCH_PUBLIC_APIS", public)
        store = Store(tmp_path / name)
        result = invoke("run", str(spec), *store.args())
        assert result.exit_code == 0, result.output
        (run,) = store.runs()
        return store, run

    _, fused = sweep("fused", "0")
    _, elementwise = sweep("elementwise", "1")
    assert fused.data.tags[TAG + "adamw"] == "fused"
    assert elementwise.data.tags[TAG + "adamw"] == "elementwise"
    monkeypatch.setattr(local, "worker_context", lambda gpus: mp.get_context("spawn"))
    spawned_store, spawned = sweep("spawned", "0")
    assert spawned.data.tags[TAG + "adamw"] == "fused"
    assert spawned.data.metrics["val_loss"] == fused.data.metrics["val_loss"]  # same arithmetic
    assert spawned_store.history(spawned.info.run_id, "val_loss") == Store(
        tmp_path / "fused"
    ).history(fused.info.run_id, "val_loss")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are spawned there")
def test_the_forkserver_ends_without_a_teardown(tmp_path: Path) -> None:
    """Preloaded last, ``server_exit`` ends the server at once when its driver is gone: a
    teardown registered before it (as torch's and MLflow's are) never runs, so the server
    lets go of the driver's stdout and stderr at once. Imported anywhere else, it does
    nothing."""
    import textwrap

    marker = tmp_path / "torn_down"
    (tmp_path / "planted_teardown.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
    )
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent("""\
        import multiprocessing as mp
        import sys

        def nothing():
            pass

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(sys.argv[1:])
            worker = ctx.Process(target=nothing)
            worker.start()
            worker.join()
        """)
    )

    def server_tore_down(*preload: str) -> bool:
        marker.unlink(missing_ok=True)
        # Returns once every holder of the pipes let go: the driver, its worker, its server.
        path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
        done = subprocess.run([sys.executable, str(driver), *preload], capture_output=True,
                              text=True, timeout=300, env=env)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return marker.exists()

    assert server_tore_down("planted_teardown")  # nothing stops a teardown: the check can fail
    assert not server_tore_down("planted_teardown", "workbench.sweep.executors.server_exit")
    elsewhere = subprocess.run(
        [sys.executable, "-c", "import multiprocessing.forkserver, "
         "workbench.sweep.executors.server_exit; raise SystemExit(3)"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert elsewhere.returncode == 3, elsewhere.stderr
    from workbench.sweep.executors import local

    assert local.PRELOAD[-1] == "workbench.sweep.executors.server_exit"  # after every teardown
