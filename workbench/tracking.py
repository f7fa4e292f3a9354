"""MLflow: the store, the runs of a sweep, and a metric logger that batches.

mlflow is imported inside functions so that importing this module costs nothing.
Facts this design rests on (measured, see docs/mlflow-notes.md): a fresh SQLite store must be
created before any worker touches it; experiments are created by the driver, never by workers; one
``log_batch`` per flush instead of a call per metric; MLflow never marks a run KILLED itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from workbench import __version__
from workbench.errors import WorkbenchError, first_line

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "workbench."  # prefix of our own tags
STALE_AFTER_S = 600.0  # a RUNNING run whose heartbeat is older than this is a ghost
HEARTBEAT_EVERY_S = 30.0
# Progress metrics in the store: one point per this many steps (each point costs ~0.1 ms to
# store, and a short run's tracking budget is a few tens of ms); the last point always.
STORE_EVERY_STEPS = {"train_loss_smooth": 50, "lr": 500, "tokens_per_sec": 500}
STORE_EVERY_DEFAULT = 50


def tracking_uri(explicit: str | None, from_env: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own default."""
    return explicit or from_env or DEFAULT_TRACKING_URI


_OPENED: set[str] = set()  # stores this process has checked (and created) already


def client(uri: str) -> MlflowClient:
    """An MLflow client; the first one of a process for ``uri`` checks the store first (see
    :func:`open_store`)."""
    from mlflow.tracking import MlflowClient

    if uri not in _OPENED:
        open_store(uri)
        _OPENED.add(uri)
    return MlflowClient(tracking_uri=uri)


def store_error_types() -> tuple[type[BaseException], ...]:
    """What the store raises when it is unreachable, locked, full or broken."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, RequestException, SQLAlchemyError, sqlite3.Error, OSError)


@contextlib.contextmanager
def store_errors(uri: str, os_errors: bool = True) -> Iterator[None]:
    """A store that cannot be reached or read is one line for the user, not a traceback
    (``os_errors=False`` where an OSError would be about something else, a report's file)."""
    types = store_error_types()
    if not os_errors:
        types = tuple(t for t in types if t is not OSError)
    try:
        yield
    except types as exc:
        raise WorkbenchError(f"tracking store {uri}: {first_line(exc)}") from None


def open_store(uri: str) -> None:
    """Check a store before MLflow touches it, failing in seconds with one line.

    SQLite: the folder is made if missing; the file, if there is one, must be a complete MLflow
    database; the first process to open a new file creates and migrates it while holding
    ``<file>.lock``, so commands started at once on a fresh folder never race MLflow's schema
    setup (which otherwise leaves a half-made database behind). A server: it must answer within
    seconds, not after MLflow's minutes of retries.
    """
    database = sqlite_path(uri)
    if database is not None:
        _open_sqlite(uri, database)
    elif uri.startswith(("http://", "https://")):
        _probe_server(uri)


STORE_LOCK_TIMEOUT_S = 300.0  # a first migration takes ~6 s; a held lock longer is a stuck one
SERVER_PROBE_TIMEOUT_S = 5.0


def _open_sqlite(uri: str, database: Path) -> None:
    from filelock import FileLock, Timeout

    folder = database.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)  # as MLflow itself does
    except OSError as exc:
        raise WorkbenchError(
            f"tracking store {uri}: cannot create a store in {folder} ({first_line(exc)})"
        ) from None
    lock = FileLock(f"{database}.lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise WorkbenchError(
            f"tracking store {uri}: another process has held {lock.lock_file} for "
            f"{STORE_LOCK_TIMEOUT_S:.0f} s (a stuck first setup of the store?)"
        ) from None
    except OSError as exc:
        if not database.exists():
            raise WorkbenchError(
                f"tracking store {uri}: cannot create a store in {folder} ({first_line(exc)})"
            ) from None
        _check_sqlite(uri, database)  # a read-only folder: reading a store needs no lock
        return
    try:
        _check_sqlite(uri, database)
        with store_errors(uri):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri)._tracking_client.store  # noqa: B018  (creates it)
    finally:
        lock.release()


def _check_sqlite(uri: str, database: Path) -> None:
    """Refuse a file that is not an MLflow database, or one whose setup was cut short."""
    if not database.exists() or database.stat().st_size == 0:
        return  # MLflow creates it
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{quote(str(database))}?mode=ro", uri=True, timeout=30)
        ) as connection:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}  # fmt: skip
    except sqlite3.Error as exc:
        raise WorkbenchError(
            f"tracking store {uri}: {database} is not a readable SQLite database "
            f"({first_line(exc)})"
        ) from None
    half_made = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if half_made or (tables and "alembic_version" not in tables):
        what = f"leftover table {half_made[0]}" if half_made else "no alembic_version table"
        raise WorkbenchError(
            f"tracking store {uri}: {database} is a half-made or foreign MLflow database "
            f"({what}; its setup was probably interrupted): move it away and run again"
        )


def _tls_verify() -> bool | str:
    """MLflow's own TLS settings, so the probe reaches whatever MLflow reaches."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def _probe_server(uri: str) -> None:
    """Any HTTP answer will do; no answer within seconds is one line, not minutes of retries."""
    import requests

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name"
    try:
        requests.get(
            url,
            params={"experiment_name": "Default"},
            timeout=SERVER_PROBE_TIMEOUT_S,
            verify=_tls_verify(),
        )
    except requests.RequestException as exc:
        raise WorkbenchError(f"tracking store {uri}: unreachable ({first_line(exc)})") from None


def ensure_experiment(uri: str, name: str) -> str:
    """Create (and migrate) the store and the experiment, once, before any worker starts."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    database = sqlite_path(uri)
    if database is not None and not (
        os.access(database, os.W_OK) and os.access(database.parent, os.W_OK)
    ):  # SQLite writes a journal beside the file
        raise WorkbenchError(f"tracking store {uri}: read-only: runs cannot be recorded there")
    with store_errors(uri):
        for _ in range(2):  # a second try: another process created it in between
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    mlflow_client.restore_experiment(experiment.experiment_id)
                return str(experiment.experiment_id)
            try:
                return str(mlflow_client.create_experiment(name))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise WorkbenchError(f"tracking store {uri}: experiment {name!r} could not be created")


def experiment_slug(name: str) -> str:
    """A folder name for an experiment: its safe characters, then a hash of the whole name, so
    that no name (``../x``, ``/abs``, ``a/b``) is ever a path and two names never share one."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40] or "experiment"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{readable}-{digest}"


@dataclass(frozen=True)
class RunRecord:
    """What the store knows of one grid point (the newest MLflow run with its key)."""

    run_id: str
    status: str  # FINISHED | FAILED | KILLED | RUNNING | SCHEDULED
    tags: dict[str, str]
    metrics: dict[str, float]
    start_time: int

    @property
    def diverged(self) -> bool:
        return self.tags.get(TAG + "diverged") == "true"

    @property
    def attempt(self) -> int:
        return int_tag(self.tags, TAG + "attempt") or 1

    @property
    def threads(self) -> int | None:
        """The torch threads the run was started with (its resume must use the same)."""
        return int_tag(self.tags, TAG + "threads")

    def is_ghost(self, now: float | None = None) -> bool:
        """A RUNNING run whose process is gone (kill -9, power loss) or silent for too long."""
        if self.status != "RUNNING":
            return False
        pids = [int_tag(self.tags, TAG + name) for name in ("pid", "driver_pid")]
        if self.tags.get(TAG + "host") == socket.gethostname() and any(pids):  # ask the OS
            return not any(pid and _pid_alive(pid) for pid in pids)
        now = time.time() if now is None else now  # elsewhere: silent for too long
        heartbeat = int_tag(self.tags, TAG + "heartbeat") or self.start_time // 1000
        return now - heartbeat > STALE_AFTER_S

    @property
    def state(self) -> str:
        """done | failed | diverged | killed | running | ghost (for plans and the driver)."""
        if self.status == "FINISHED":
            return "done"
        if self.status == "FAILED":
            return "diverged" if self.diverged else "failed"
        if self.status == "RUNNING":
            return "ghost" if self.is_ghost() else "running"
        return "killed"


def int_tag(tags: dict[str, str], name: str) -> int | None:
    """A tag's positive integer value; None when absent or malformed (a shared store may hold
    runs that another tool, or a hand, tagged)."""
    value = tags.get(name, "")
    try:
        number = int(float(value)) if value.strip() else None
    except (ValueError, OverflowError):
        return None
    return number if number is not None and number > 0 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaped (containers without an init) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


WORKBENCH_RUNS = f"tags.`{TAG}run_key` != ''"  # a search filter: runs workbench created


def search_workbench_runs(mlflow_client: Any, experiment_id: str) -> Iterator[Any]:
    """Every workbench run of an experiment, newest first, page by page."""
    token = None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id],
            filter_string=WORKBENCH_RUNS,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def existing_runs(uri: str, experiment_id: str) -> dict[str, RunRecord]:
    """The newest MLflow run of each run key in the experiment."""
    records: dict[str, RunRecord] = {}
    for run in search_workbench_runs(client(uri), experiment_id):
        key = run.data.tags.get(TAG + "run_key")
        if key and key not in records:
            records[key] = RunRecord(
                run_id=run.info.run_id,
                status=run.info.status,
                tags=dict(run.data.tags),
                metrics=dict(run.data.metrics),
                start_time=run.info.start_time or 0,
            )
    return records


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI (None for other stores, or in memory)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except ArgumentError:
        raise WorkbenchError(f"tracking store {uri}: not a valid sqlite URI") from None
    if not database or database == ":memory:":
        return None
    return Path(database)


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``folder``, or (None, None)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class MetricBuffer:
    """Collects metric points and writes them in one ``log_batch`` per flush.

    The trainer reports every few steps; the buffer is flushed just before each checkpoint is
    written, so nothing reported before a checkpoint is ever lost. A resumed run redoes the
    steps after its checkpoint, and ``skip_stored`` drops the points the store already has.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        every_step_keys: tuple[str, ...] = (),
        store_every: dict[str, int] | None = None,
    ) -> None:
        self.client = client(uri)
        self.run_id = run_id
        self.every_step_keys = every_step_keys  # stored whenever reported (eval losses)
        self.store_every = STORE_EVERY_STEPS if store_every is None else store_every
        self.points: list[Any] = []
        # The driver writes a heartbeat when it creates or resumes a run, just before handing
        # it to a worker: the next one is due a HEARTBEAT_EVERY_S later (a call costs ~25 ms).
        self.last_heartbeat = time.time()
        self.stored_until: dict[str, int] = {}  # key -> last step already in the store
        # key -> (value, timestamp, step): the newest point not stored (between samples)
        self.latest: dict[str, tuple[float, int, int]] = {}
        self.pending_tags: dict[str, str] = {}  # stored with the next flush

    def skip_stored(self, keys: list[str]) -> None:
        """A resumed run redoes steps since its checkpoint; don't store those points twice."""
        for key in keys:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                self.stored_until[key] = max(m.step for m in history)

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if not math.isfinite(value) or step <= self.stored_until.get(key, -1):
                continue
            every = self.store_every.get(key, STORE_EVERY_DEFAULT)
            if key not in self.every_step_keys and step % every:
                self.latest[key] = (float(value), now, step)  # kept for the end of the run only
            else:
                self.points.append(Metric(key, float(value), now, step))
                self.latest.pop(key, None)

    def tags(self, tags: dict[str, str]) -> None:
        """Tags stored with the next flush (a store call costs ~25 ms; a short run makes two or
        three)."""
        self.pending_tags.update(tags)

    def flush(self, heartbeat: bool = True, final: bool = False) -> None:
        """Store what was collected; ``final`` also stores each key's last point."""
        from mlflow.entities import RunTag

        if final:
            from mlflow.entities import Metric

            self.points.extend(Metric(key, *point) for key, point in self.latest.items())
            self.latest = {}
        tags = [RunTag(k, v) for k, v in self.pending_tags.items()]
        self.pending_tags = {}
        if heartbeat:
            self.last_heartbeat = time.time()
            tags.append(RunTag(TAG + "heartbeat", f"{self.last_heartbeat:.0f}"))
        if self.points or tags:
            self.client.log_batch(self.run_id, metrics=self.points, tags=tags)
        self.points = []

    def heartbeat_due(self) -> bool:
        return time.time() - self.last_heartbeat > HEARTBEAT_EVERY_S

    def heartbeat(self) -> None:
        self.last_heartbeat = time.time()
        self.client.set_tag(self.run_id, TAG + "heartbeat", f"{self.last_heartbeat:.0f}")


def base_tags() -> dict[str, str]:
    return {TAG + "version": __version__, TAG + "host": socket.gethostname()}
