"""Ray execution: every grid point is one Ray task (Ray core, not Tune) running the same job
function as a local worker, with its own CPU/GPU request (fractional GPUs pack small runs).

Worker crashes (``WorkerCrashedError``: a segfault, an OOM kill, a lost node) are retried here,
up to ``max_retries`` times per run in each sweep (a run resumed from an earlier sweep gets the
same budget), each attempt tagged and resumed from the run's checkpoint; exceptions from
training never reach Ray (the job marks its run FAILED itself), so they are not retried.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench.store import client
from workbench.sweep.events import CrashFn, Ended, EventFn, Item, Progress, Started
from workbench.sweep.jobs import Job, JobResult, ended_result
from workbench.sweep.packs import Pack, Unit, execute_unit, members
from workbench.tracking import TAG, RunState, mlflow_status

PROGRESS_EVERY_S = 1.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise WorkbenchError(
            "--executor ray needs Ray: pip install -e '.[ray]'  (or: pip install ray)"
        ) from None
    return ray


def _run_job(unit: Unit, progress_queue: Any) -> list[JobResult]:
    """The Ray task: the job function (of a run alone or a pack), with progress sent at most
    once a second."""
    last = 0.0

    def progress(event: Progress) -> None:
        nonlocal last
        if time.time() - last < PROGRESS_EVERY_S:
            return
        last = time.time()
        with contextlib.suppress(Exception):  # a full or gone queue never stops training
            progress_queue.put_nowait(event)

    for job in members(unit):
        progress_queue.put_nowait(Started(job.key, os.getpid()))
    return execute_unit(unit, progress)


@dataclass
class RayExecutor:
    """Runs jobs as Ray tasks on the cluster at ``address`` (None: a local one)."""

    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_retries: int = 2
    num_cpus: int | None = None  # for a local cluster started here

    def warm_up(self, runs: int) -> None:
        """Nothing to start ahead: Ray starts its workers when tasks are submitted."""

    def close(self) -> None:
        """Nothing to stop: ``warm_up`` started nothing."""

    def run(
        self,
        items: Sequence[Item],
        prepare: Callable[[Item], Unit],
        on_event: EventFn,
        on_crash: CrashFn,
    ) -> list[JobResult]:
        ray = _ray()
        from ray.exceptions import RayError, RayTaskError, TaskCancelledError
        from ray.util.queue import Queue

        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    num_cpus=self.num_cpus if self.address is None else None,
                    log_to_driver=False,
                    include_dashboard=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise WorkbenchError(f"--address {self.address}: {exc}") from None
        remote = ray.remote(_run_job).options(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=0
        )
        queue = Queue(maxsize=10_000)
        waiting = deque(items)
        pending: dict[Any, Unit] = {}
        results: list[JobResult] = []
        # Worker deaths per run key in this sweep: the retry budget. Not job.attempt, which also
        # counts the attempts of earlier sweeps (each resume is one).
        crashes: dict[str, int] = {}
        # Runs are created in MLflow when submitted: keep only what the cluster can start
        # (plus a little) in flight, so queued runs never sit RUNNING with no process.
        limit = self._slots(ray) + 2

        def finish(job: Job, result: JobResult) -> None:
            results.append(result)
            on_event(Ended(job.key, result))

        def drain_progress() -> None:
            while not queue.empty():
                try:
                    on_event(queue.get_nowait())
                except Exception:
                    return

        try:
            while waiting or pending:
                while waiting and len(pending) < limit:
                    unit = prepare(waiting.popleft())
                    pending[remote.remote(unit, queue)] = unit
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                drain_progress()
                for ref in ready:
                    unit = pending.pop(ref)
                    try:
                        for job, result in zip(members(unit), ray.get(ref), strict=True):
                            finish(job, result)
                    except (RayTaskError, TaskCancelledError) as exc:
                        cause = getattr(exc, "cause", None) or exc
                        reason = f"{type(cause).__name__}: {cause}"[:500]
                        for job in members(unit):
                            finish(job, on_crash(job, reason, RunState.FAILED))
                    except RayError as exc:  # the worker died: crash, OOM kill, lost node
                        # Counted per run: a pack's runs died together.
                        for job in members(unit):
                            crashes[job.key] = crashes.get(job.key, 0) + 1
                        died = max(crashes[job.key] for job in members(unit))
                        if died <= self.max_retries:
                            retry = _retry(unit, finish)
                            if retry is not None:
                                for job in members(retry):
                                    self._tag_attempt(job)
                                pending[remote.remote(retry, queue)] = retry
                        else:  # still a crash, not a verdict: the next sweep resumes it
                            reason = f"worker died {died} times: {type(exc).__name__}"
                            for job in members(unit):
                                finish(job, on_crash(job, reason, RunState.KILLED))
        except KeyboardInterrupt:
            self._interrupt(ray, pending, finish, on_crash)
            raise
        return results

    def _slots(self, ray: Any) -> int:
        resources = ray.cluster_resources()
        slots = [resources.get("CPU", 1) / max(self.cpus_per_run, 1e-3)]
        if self.gpus_per_run:
            slots.append(resources.get("GPU", 0) / self.gpus_per_run)
        return max(1, int(min(slots)))

    @staticmethod
    def _tag_attempt(job: Job) -> None:
        mlflow_client = client(job.tracking_uri)
        mlflow_client.set_tag(job.run_id, TAG + "attempt", str(job.attempt))
        mlflow_client.update_run(job.run_id, status=mlflow_status(RunState.RUNNING))

    @staticmethod
    def _interrupt(
        ray: Any,
        pending: dict[Any, Unit],
        finish: Callable[[Job, JobResult], None],
        on_crash: CrashFn,
        grace_s: float = 30.0,
    ) -> None:
        """Ctrl-C: running tasks get a KeyboardInterrupt (the job marks its run KILLED)."""
        for ref in pending:
            ray.cancel(ref, force=False)
        deadline = time.time() + grace_s
        for ref, unit in list(pending.items()):
            try:
                got = ray.get(ref, timeout=max(0.1, deadline - time.time()))
            except Exception:
                got = [on_crash(job, "interrupted", RunState.KILLED) for job in members(unit)]
            for job, result in zip(members(unit), got, strict=True):
                finish(job, result)


def _retry(unit: Unit, finish: Callable[[Job, JobResult], None]) -> Unit | None:
    """The unit again after its worker died: each run's next attempt, from its checkpoint. A
    pack's members that ended before the worker died keep their verdict (a FINISHED run is
    never reopened) and are finished here; None when none is left."""
    left, rows = [], []
    layout, width = unit.layout() if isinstance(unit, Pack) else ((0,), 1)
    for job, row in zip(members(unit), layout, strict=True):
        ended = ended_result(client(job.tracking_uri), job)
        if ended is None:
            left.append(replace(job, attempt=job.attempt + 1, resumed=True))
            rows.append(row)
        else:
            finish(job, ended)
    if not left:
        return None
    if isinstance(unit, Pack):  # each member in its row, as wide as the pack started
        return Pack(tuple(left), tuple(rows), width)
    return left[0]
