"""Local execution: a few long-lived worker processes, one run at a time each.

Why not ``ProcessPoolExecutor``: one crashed worker breaks the whole pool and every queued job
fails with it (docs/mlflow-notes.md). Here each worker is a process of its own with its own
pipe; a worker that dies (segfault, ``os._exit``, kill -9) costs only the run it held and can
garble only its own pipe, and a fresh worker takes its place. Workers are reused between runs,
since importing torch and mlflow costs seconds per process; each opens the tracking store
itself, and sends the driver only its events (``Started``, ``Progress``, ``Ended``) over its
pipe. How a worker starts: :func:`worker_context`.

Signals: workers ignore SIGINT (a Ctrl-C reaches the whole process group); the driver forwards
exactly one SIGTERM, which a worker turns into KeyboardInterrupt so its run is marked KILLED.
A worker whose driver vanished (kill -9) notices at its next message or poll, marks its run
KILLED (resumable) and exits. A worker that dies itself is a crash, not a verdict on the run:
its run is marked KILLED too, and the next ``workbench run`` resumes it from its checkpoint.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any, TypeAlias

from workbench.sweep.events import CrashFn, Ended, EventFn, Item, Started
from workbench.sweep.jobs import (
    DriverLost,
    JobResult,
    JobStatus,
    end_killed,
)
from workbench.sweep.packs import Unit, execute_unit, members
from workbench.sweep.signals import describe_exit, signals_deferred, signals_ignored
from workbench.tracking import RunState

PARENT_CHECK_S = 1.0


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    """A signal handler that makes SIGTERM behave like Ctrl-C."""
    raise KeyboardInterrupt


# What a job imports (``_worker_main``, ``jobs.preload``), imported once by the forkserver.
PRELOAD = [
    "workbench.tracking",
    "workbench.train.factory",
    "workbench.sweep.jobs",
    "workbench.sweep.record",
    "workbench.mlflow_model",
    "workbench.report.attention",
    "workbench.report.figures",
    "mlflow.store.tracking.sqlalchemy_store",
    "matplotlib.backends.backend_agg",
    "workbench.sweep.executors.server_exit",  # last: the server ends without a teardown
]


WorkerContext: TypeAlias = SpawnContext | ForkServerContext


def worker_context(gpus: int) -> WorkerContext:
    """How workers start. On Linux without GPUs: forked from one server process that imported
    what a job needs once (multiprocessing's ``forkserver``, preloaded), so that a worker
    starts in milliseconds instead of seconds of imports: every worker after the first, in
    this sweep and in any later one of this process. The server never runs a job, and each
    worker takes the driver's environment and working folder of the moment it starts
    (``_worker_main``), not the server's. Elsewhere (macOS forks badly once frameworks are
    loaded; CUDA must not be near a fork) each worker is spawned and imports for itself."""
    if gpus or not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # Started (once per process) with SIGINT and SIGTERM ignored, which it keeps: a Ctrl-C or
    # a SIGTERM to the process group is for the driver and the workers to handle; the server
    # ends when the driver does. (A worker's death is read from the server: it must outlive
    # them.)
    with signals_ignored():
        forkserver.ensure_running()
    return ctx


def _worker_main(env: dict[str, str], cwd: str, conn: Connection, early: bool = False) -> None:
    # The driver's environment now (CUDA_VISIBLE_DEVICES, thread counts), before torch is
    # imported where it was not (spawn); a forkserver's dates from when it started.
    os.environ.clear()
    os.environ.update(env)
    with contextlib.suppress(OSError):  # a folder deleted since: the worker stays where it is
        os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    parent = os.getppid()
    # What every job needs, imported now. A worker started early (``warm_up``, for a new SQLite
    # store) imports all of it while the driver is still creating the store and its runs, not
    # after its first job arrives.
    driver = _DriverPipe(conn)
    try:
        import workbench.tracking
        import workbench.train.factory  # noqa: F401  (torch; each job sets its own threads)

        if early:
            from workbench.sweep.jobs import preload

            preload()
    except KeyboardInterrupt:  # stopped before it held any job
        os._exit(0)

    while True:
        try:
            while not conn.poll(PARENT_CHECK_S):
                if os.getppid() != parent:  # the driver died without a word
                    return
            unit: Unit | None = conn.recv()
        except (KeyboardInterrupt, EOFError, OSError):
            break
        if unit is None:
            break
        try:
            for job in members(unit):
                driver.send(Started(job.key, os.getpid()))
            # A send to a driver that is gone raises DriverLost: the job stops, resumable.
            results = execute_unit(unit, driver.send)
        except (KeyboardInterrupt, DriverLost):  # before the job function could handle it
            reason = "the driver process is gone" if driver.lost else "interrupted"
            results = [end_killed(job, reason) for job in members(unit)]
        try:
            for result in results:
                driver.send(Ended(result.key, result))
        except (KeyboardInterrupt, DriverLost):  # nobody to tell, or told to stop
            break
    # Every run this worker held is ended in the store and reported: nothing is left to write,
    # so skip the interpreter's teardown of torch and mlflow (about a second the driver waits).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class _DriverPipe:
    """A worker's end of its pipe: its events to the driver."""

    conn: Connection
    lost: bool = False  # the driver is gone

    def send(self, event: Any) -> None:
        """Send an event; a driver that is gone raises DriverLost (the run stops, resumable)."""
        try:
            self.conn.send(event)
        except OSError:
            self.lost = True
            raise DriverLost("the driver process is gone") from None


@dataclass
class _Worker:
    process: Any
    conn: Connection
    job: Unit | None = None  # a run alone or a pack
    open_keys: set[str] = field(default_factory=set)  # its runs that have not ended yet

    def hand(self, unit: Unit) -> None:
        self.job = unit
        self.open_keys = {job.key for job in members(unit)}


def worker_gpu(slot: int, gpus: int, jobs_per_gpu: int, visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of worker ``slot``: consecutive slots share a GPU
    ``jobs_per_gpu`` at a time. The GPUs are the driver's own visible ones (a scheduler's
    ``CUDA_VISIBLE_DEVICES=2,3``, UUIDs or MIG instances), not physical indices from 0."""
    entries = [entry.strip() for entry in (visible or "").split(",") if entry.strip()]
    index = (slot // jobs_per_gpu) % gpus
    return entries[index] if index < len(entries) else str(index)


@dataclass
class LocalExecutor:
    """Runs jobs in ``jobs`` worker processes at once."""

    jobs: int
    threads_per_job: int | None = None  # torch threads at a worker's start (each job sets its own)
    gpus: int = 0
    jobs_per_gpu: int = 1
    workers: list[_Worker] = field(default_factory=list)

    def run(
        self,
        items: Sequence[Item],
        prepare: Callable[[Item], Unit],
        on_event: EventFn,
        on_crash: CrashFn,
    ) -> list[JobResult]:
        """Run every item; ``prepare`` turns an item into a job (or a pack) just before it is
        dispatched (so runs that never start are never created); ``on_crash(job, reason,
        status)`` records a run whose worker died or never answered. Returns results in
        completion order.

        On KeyboardInterrupt the workers are interrupted too: each marks its run KILLED and
        the interrupt is re-raised once they have.
        """
        ctx = worker_context(self.gpus)
        pending = deque(items)
        results: list[JobResult] = []
        slots = max(1, min(self.jobs, len(items)))
        threads = self.threads_per_job
        try:
            for worker in self.workers[slots:]:  # warmed up for more runs than there are
                self._stop_worker(worker)
            self.workers = self.workers[:slots]
            self.workers += [self._start(ctx, s, threads) for s in range(len(self.workers), slots)]
            while pending or any(w.job is not None for w in self.workers):
                for worker in self.workers:
                    if worker.job is None and pending:
                        worker.hand(prepare(pending.popleft()))
                        with contextlib.suppress(OSError):  # it died idle: handled just below
                            worker.conn.send(worker.job)
                self._drain(results, on_event, timeout=0.2)
                for slot, worker in enumerate(self.workers):
                    if worker.job is not None and not worker.process.is_alive():
                        self._drain(results, on_event, timeout=0.2, all_of=True)
                        if worker.job is not None:  # died without a word
                            self._crashed(
                                worker,
                                describe_exit(worker.process.exitcode),
                                RunState.KILLED,
                                results,
                                on_event,
                                on_crash,
                            )
                        self.workers[slot] = self._start(ctx, slot, threads)
        except KeyboardInterrupt:
            self._interrupt(results, on_event, on_crash)
            raise
        finally:
            self._stop()
        return results

    def warm_up(self, runs: int) -> None:
        """Start the workers for up to ``runs`` runs now, so that their imports (seconds each)
        overlap what the driver does before the first job; ``run`` uses them, ``close`` stops
        them if ``run`` never comes. With a forkserver, only the server starts now (a worker's
        start waits for its imports), and ``run`` forks the workers from it."""
        if not self.workers:
            ctx = worker_context(self.gpus)  # a forkserver: started, importing meanwhile
            if ctx.get_start_method() == "forkserver":
                return
            slots = max(1, min(self.jobs, runs))
            threads = self.threads_per_job
            self.workers = [self._start(ctx, s, threads, early=True) for s in range(slots)]

    def close(self) -> None:
        """Stop any worker still running (``run`` stops its own when it returns)."""
        self._stop()

    def _start(
        self, ctx: WorkerContext, slot: int, threads: int | None, early: bool = False
    ) -> _Worker:
        env = dict(os.environ)
        if threads is not None:  # torch reads it when it is first imported
            env["OMP_NUM_THREADS"] = str(threads)
        if self.gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = worker_gpu(slot, self.gpus, self.jobs_per_gpu, visible)
        parent_conn, child_conn = ctx.Pipe()
        process = ctx.Process(
            target=_worker_main, args=(env, os.getcwd(), child_conn, early), daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _drain(
        self, results: list[JobResult], on_event: EventFn, timeout: float, all_of: bool = False
    ) -> None:
        """Handle the events that arrive within ``timeout`` seconds, or until a worker is
        free: its next job (or the sweep's end) does not wait out the timeout. ``all_of``: the
        whole timeout (a dead worker's last words, an interrupted sweep's)."""
        open_workers = {id(w.conn): w for w in self.workers}
        deadline = time.monotonic() + timeout
        freed = False
        while (all_of or not freed) and open_workers and (left := deadline - time.monotonic()) > 0:
            ready = wait([w.conn for w in open_workers.values()], timeout=left)
            if not ready:
                return
            for conn in ready:
                worker = open_workers[id(conn)]
                with signals_deferred():  # a message is read whole: no pipe left half-read
                    try:
                        event = worker.conn.recv()
                    except (EOFError, OSError):  # the worker is gone; its slot is checked later
                        del open_workers[id(conn)]
                        continue
                if isinstance(event, Ended):
                    results.append(event.result)
                    worker.open_keys.discard(event.key)
                    if not worker.open_keys:
                        worker.job = None
                        freed = True
                on_event(event)

    def _crashed(
        self,
        worker: _Worker,
        reason: str,
        status: JobStatus,
        results: list[JobResult],
        on_event: EventFn,
        on_crash: CrashFn,
    ) -> None:
        assert worker.job is not None
        for job in members(worker.job):
            if job.key in worker.open_keys:
                result = on_crash(job, reason, status)
                results.append(result)
                on_event(Ended(job.key, result))
        worker.job, worker.open_keys = None, set()

    def _interrupt(
        self,
        results: list[JobResult],
        on_event: EventFn,
        on_crash: CrashFn,
        grace_s: float = 30.0,
    ) -> None:
        for worker in self.workers:
            if worker.job is not None and worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(w.job is not None and w.process.is_alive() for w in self.workers):
            if time.monotonic() > deadline:
                break
            try:
                self._drain(results, on_event, timeout=0.2)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
                break
        with contextlib.suppress(KeyboardInterrupt):
            self._drain(results, on_event, timeout=0.2, all_of=True)
        for worker in self.workers:
            if worker.job is not None:  # never answered: mark it from here
                self._crashed(worker, "interrupted", RunState.KILLED, results, on_event, on_crash)

    def _stop(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    worker.conn.send(None)
        deadline = time.monotonic() + 5
        for worker in self.workers:
            self._stop_worker(worker, max(0.0, deadline - time.monotonic()))
        self.workers = []

    @staticmethod
    def _stop_worker(worker: _Worker, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError, ValueError):
            worker.conn.send(None)  # a second None to a worker already told is harmless
        worker.process.join(timeout=timeout)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
