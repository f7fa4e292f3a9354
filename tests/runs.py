"""Helpers for tests that drive `workbench run` end to end: a real SQLite store in a test's
folder, the CLI in-process or in a subprocess, and waiting on what it does."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from workbench.cli import app


class Store:
    """A tracking store (by default a SQLite file in ``folder``) and a checkpoint folder."""

    def __init__(self, folder: Path, uri: str | None = None) -> None:
        self.uri = uri or f"sqlite:///{folder / 'mlflow.db'}"
        self.checkpoints = folder / "checkpoints"
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:  # opened on first use: it creates a missing store
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def args(self) -> list[str]:
        return [
            "--tracking-uri",
            self.uri,
            "--checkpoint-dir",
            str(self.checkpoints),
            "--no-progress",
            "--checkpoint-every",
            "0",
        ]

    def runs(self, experiment: str = "t") -> list[Any]:
        """The trained runs (the sweeps' parent runs left out: see ``parents``)."""
        exp = self.client.get_experiment_by_name(experiment)
        found = [] if exp is None else self.client.search_runs([exp.experiment_id])
        return [r for r in found if "workbench.plan" not in r.data.tags]

    def parents(self, experiment: str = "t") -> list[Any]:
        exp = self.client.get_experiment_by_name(experiment)
        found = [] if exp is None else self.client.search_runs([exp.experiment_id])
        return [r for r in found if "workbench.plan" in r.data.tags]

    def by_name(self, experiment: str = "t") -> dict[str, Any]:
        return {r.info.run_name: r for r in self.runs(experiment)}

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def start(spec: Path, store: Store, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "workbench", "run", str(spec), *store.args(), *extra],
        cwd=spec.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(
    predicate: Any, proc: subprocess.Popen[Any] | None = None, timeout: float = 600.0
) -> Any:
    """Poll ``predicate`` until it returns something true, and return that. With ``proc`` (the
    process whose work the predicate watches): fail at once, with its output, if it exits
    first, and with its output too if the deadline passes (it is killed then). The deadline is
    generous: a loaded machine is slow, never a reason to fail; a dead process fails fast."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()  # what it did before it exited may be the condition
            if value:
                return value
            raise AssertionError(
                f"the process exited ({proc.returncode}) before the condition held:\n"
                + _output_of(proc)
            )
        if time.monotonic() > deadline:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"timed out after {timeout:.0f} s:\n" + _output_of(proc))
            raise AssertionError(f"timed out after {timeout:.0f} s")
        time.sleep(0.1)


def _output_of(proc: subprocess.Popen[Any]) -> str:
    """What an ended process printed, when its output was piped to the test."""
    try:
        out, err = proc.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ValueError):
        return "(its output could not be read)"
    text = "".join(part if isinstance(part, str) else part.decode(errors="replace")
                   for part in (out, err) if part)  # fmt: skip
    return text or "(it printed nothing)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path, port: int | None = None) -> Iterator[str]:
    """A real loopback ``mlflow server`` over ``backend_uri``, its artifacts under ``folder``;
    yields its URL once ``/health`` answers, and stops it on exit."""
    port = port or free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
               str(port), "--backend-store-uri", backend_uri, "--artifacts-destination",
               str(folder / "artifacts"), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the ``mlflow server`` at ``url`` answers ``/health`` (it must not exit first)."""

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_for(healthy, proc, timeout=300)
