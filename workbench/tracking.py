"""MLflow: the runs of a sweep, what state each is in, and a metric logger that batches.

mlflow is imported inside functions so that importing this module costs nothing. Opening and
checking the store is :mod:`workbench.store`. Facts this design rests on (measured, see
docs/mlflow-notes.md): one ``log_batch`` per flush instead of a call per metric; MLflow never
marks a run KILLED itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.processes import pid_alive, process_start
from workbench.states import RunState as RunState

# The store's names (and the run states) that other modules import from here (mypy: explicit
# re-exports).
from workbench.store import client as client
from workbench.store import ensure_experiment as ensure_experiment
from workbench.store import sqlite_path as sqlite_path
from workbench.store import store_error_types as store_error_types
from workbench.store import store_errors as store_errors
from workbench.store import tracking_uri as tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

TAG = "workbench."  # prefix of our own tags
STALE_AFTER_S = 600.0  # a RUNNING run whose heartbeat is older than this is stale
HEARTBEAT_EVERY_S = 30.0
# Progress metrics in the store: one point per this many steps (each point costs ~0.1 ms to
# store, and a short run's tracking budget is a few tens of ms); the last point always.
STORE_EVERY_STEPS = {"train_loss_smooth": 50, "lr": 500, "tokens_per_sec": 500}
STORE_EVERY_DEFAULT = 50


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
    params: dict[str, str] = field(default_factory=dict)  # the config values it applies

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

    @property
    def pack_members(self) -> tuple[str, ...] | None:
        """The run keys of the pack the run first started in, in order: () where it started
        alone, None where it was recorded before workbench stored how it started. Its
        resumes train the same way: float sums depend on it."""
        packed = self.tags.get(TAG + "packed")
        if packed is None:
            return None
        members = self.tags.get(TAG + "pack_members", "")
        return tuple(members.split("+")) if packed == "true" and members else ()

    def is_stale(self, now: float | None = None) -> bool:
        """A RUNNING run whose process is gone (kill -9, power loss) or silent for too long. A
        process is its pid and when it started (``process_start``): a pid the kernel handed to
        another process since, or one from before a reboot, is not the run's."""
        if self.status != "RUNNING":
            return False
        pids = {name: int_tag(self.tags, TAG + name) for name in ("pid", "driver_pid")}
        if self.tags.get(TAG + "host") == socket.gethostname() and any(pids.values()):
            return not any(
                pid and pid_alive(pid) and self._same_process(name, pid)
                for name, pid in pids.items()
            )
        now = time.time() if now is None else now  # elsewhere: silent for too long
        heartbeat = int_tag(self.tags, TAG + "heartbeat") or self.start_time // 1000
        return now - heartbeat > STALE_AFTER_S

    def _same_process(self, name: str, pid: int) -> bool:
        recorded = self.tags.get(f"{TAG}{name}_start")
        if not recorded:  # recorded before workbench stored start times: the pid alone
            return True
        now = process_start(pid)
        return now is None or now == recorded  # None: this OS does not say

    @classmethod
    def of(cls, run: Run) -> RunRecord:
        """The record of an MLflow run as the store hands it over."""
        return cls(
            run_id=run.info.run_id,
            status=run.info.status,
            tags=dict(run.data.tags),
            metrics=dict(run.data.metrics),
            start_time=run.info.start_time or 0,
            params=dict(run.data.params),
        )

    @property
    def state(self) -> RunState:
        """The run's state, from MLflow's status and workbench's tags: the one place that reads
        MLflow's status words (:func:`mlflow_status` is the one that writes them)."""
        if self.status == "FINISHED":
            return RunState.FINISHED
        if self.status == "FAILED":
            return RunState.DIVERGED if self.diverged else RunState.FAILED
        if self.status == "RUNNING":
            return RunState.STALE if self.is_stale() else RunState.RUNNING
        return RunState.KILLED


_MLFLOW_STATUS = {
    RunState.FINISHED: "FINISHED",
    RunState.FAILED: "FAILED",
    RunState.DIVERGED: "FAILED",  # with the workbench.diverged tag
    RunState.KILLED: "KILLED",
    RunState.RUNNING: "RUNNING",
}


def mlflow_status(state: RunState) -> str:
    """MLflow's status word for ``state``, as ``set_terminated`` and ``update_run`` take it."""
    return _MLFLOW_STATUS[state]


def int_tag(tags: dict[str, str], name: str) -> int | None:
    """A tag's positive integer value; None when absent or malformed (a shared store may hold
    runs that another tool, or a hand, tagged)."""
    value = tags.get(name, "")
    try:
        number = int(float(value)) if value.strip() else None
    except (ValueError, OverflowError):
        return None
    return number if number is not None and number > 0 else None


WORKBENCH_RUNS = f"tags.`{TAG}run_key` != ''"  # a search filter: runs workbench trained
# A sweep's parent run carries the plan's identity and no run key, so every reader of runs
# (WORKBENCH_RUNS, existing_runs, the report, sample) passes it by.
PLAN_TAG = TAG + "plan"
PARENT_RUNS = f"tags.`{PLAN_TAG}` != ''"  # a search filter: the sweeps' parent runs


def plan_id(run_keys: Iterable[str]) -> str:
    """A plan's identity: a hash of its sorted run keys (the same runs, the same plan)."""
    joined = "\n".join(sorted(set(run_keys)))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


def parent_runs(
    mlflow_client: MlflowClient, experiment_id: str, plan: str | None = None
) -> list[Any]:
    """The parent runs of an experiment (of one plan, if given), oldest first."""
    filter_string = PARENT_RUNS if plan is None else f"tags.`{PLAN_TAG}` = '{plan}'"
    return list(_search_pages(mlflow_client, experiment_id, filter_string, "ASC"))


def end_dead_parents(
    mlflow_client: MlflowClient,
    experiment_id: str,
    holding: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> int:
    """End KILLED each parent of the experiment left RUNNING by a sweep whose driver is gone;
    how many. Only a driver of this host is judged (its pid and start time, as a run's): a
    parent's heartbeat is not refreshed while its sweep runs, so silence says nothing of a
    driver elsewhere. With ``holding`` (a sweep's ``Claims.holding``), under each plan's lock, so
    that a sweep reopening the parent is never undone."""
    ended = 0
    for found in parent_runs(mlflow_client, experiment_id):
        tags = found.data.tags
        if found.info.status != "RUNNING" or tags.get(TAG + "host") != socket.gethostname():
            continue
        plan = tags.get(PLAN_TAG, "")
        with holding("plan-" + plan) if holding else contextlib.nullcontext():
            run = mlflow_client.get_run(found.info.run_id)  # as it is now, under the lock
            if not RunRecord.of(run).is_stale():  # is_stale: RUNNING, and its process is gone
                continue
            mlflow_client.set_tag(run.info.run_id, TAG + "reason", "its sweep's process is gone")
            mlflow_client.set_terminated(run.info.run_id, status=mlflow_status(RunState.KILLED))
            ended += 1
    return ended


def search_workbench_runs(mlflow_client: MlflowClient, experiment_id: str) -> Iterator[Any]:
    """Every workbench run of an experiment, newest first, page by page."""
    return _search_pages(mlflow_client, experiment_id, WORKBENCH_RUNS, "DESC")


def _search_pages(
    mlflow_client: MlflowClient, experiment_id: str, filter_string: str, order: str
) -> Iterator[Any]:
    """The runs ``filter_string`` finds, by start time (``order``: ASC or DESC), page by page."""
    token = None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=1000,
            order_by=[f"attributes.start_time {order}"],
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
            records[key] = RunRecord.of(run)
    return records


DATASET_DIGEST_LENGTH = 16
DATASET_CONTEXTS = {"train": "training", "val": "evaluation"}


def dataset_digest(data_sha256: str, part: str, val_fraction: float) -> str:
    """The MLflow digest of one part (``train`` or ``val``) of a text: derived from the text's
    sha256 and the split, so the two parts of one run, and texts split differently, never share
    a digest (MLflow keeps one dataset per name and digest in an experiment)."""
    blob = f"{data_sha256}:{part}:{val_fraction!r}".encode()
    return hashlib.sha256(blob).hexdigest()[:DATASET_DIGEST_LENGTH]


def dataset_inputs(
    dataset: str | None, path: str | None, data_sha256: str, val_fraction: float
) -> list[Any]:
    """What a run trained and was evaluated on, as MLflow dataset inputs (what
    ``mlflow.log_input`` records): named after the data set or the file, with its source (the
    data set's URL, or the file's path) as MLflow's HTTP and local dataset sources write it."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from workbench.datasets import KNOWN_DATASETS

    if dataset is not None:
        name, source_type, source = dataset, "http", {"url": KNOWN_DATASETS[dataset].url}
    else:
        assert path is not None
        name, source_type, source = Path(path).name, "local", {"uri": path}
    shares = {"train": f"the first {1 - val_fraction:.0%}", "val": f"the last {val_fraction:.0%}"}
    inputs = []
    for part, context in DATASET_CONTEXTS.items():
        profile = {"data_sha256": data_sha256, "part": part, "val_fraction": val_fraction,
                   "text": f"{shares[part]} of the characters"}  # fmt: skip
        data = Dataset(
            name=name,
            digest=dataset_digest(data_sha256, part, val_fraction),
            source_type=source_type,
            source=json.dumps(source),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(data, tags=[InputTag("mlflow.data.context", context)]))
    return inputs


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
        self.pending_params: dict[str, str] = {}

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

    def params(self, params: dict[str, str]) -> None:
        """Params stored with the next flush."""
        self.pending_params.update(params)

    def flush(self, heartbeat: bool = True, final: bool = False) -> None:
        """Store what was collected; ``final`` also stores each key's last point."""
        from mlflow.entities import RunTag

        if final:
            from mlflow.entities import Metric

            self.points.extend(Metric(key, *point) for key, point in self.latest.items())
            self.latest = {}
        from mlflow.entities import Param

        tags = [RunTag(k, v) for k, v in self.pending_tags.items()]
        params = [Param(k, v) for k, v in self.pending_params.items()]
        self.pending_tags, self.pending_params = {}, {}
        if heartbeat:
            self.last_heartbeat = time.time()
            tags.append(RunTag(TAG + "heartbeat", f"{self.last_heartbeat:.0f}"))
        if self.points or tags or params:
            self.client.log_batch(self.run_id, metrics=self.points, params=params, tags=tags)
        self.points = []

    def heartbeat_due(self) -> bool:
        return time.time() - self.last_heartbeat > HEARTBEAT_EVERY_S

    def heartbeat(self) -> None:
        self.last_heartbeat = time.time()
        self.client.set_tag(self.run_id, TAG + "heartbeat", f"{self.last_heartbeat:.0f}")
