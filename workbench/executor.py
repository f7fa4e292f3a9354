"""Local execution: a few long-lived worker processes, one run at a time each.

Why not ``ProcessPoolExecutor``: one crashed worker breaks the whole pool and every queued job
fails with it (EXECUTOR-NOTES.md). Here each worker is a spawned process with its own task
queue; a worker that dies (segfault, ``os._exit``, kill -9) costs only the run it held, and a
fresh worker takes its place. Workers are reused between runs, since importing torch and mlflow
costs seconds per process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workbench.jobs import Job, JobResult, describe_exit, execute_job

Event = tuple[Any, ...]
"""("started", key, pid) | ("progress", key, step, metrics) | ("done", key, JobResult)"""


def _worker_main(env: dict[str, str], tasks: Any, events: Any) -> None:
    os.environ.update(env)  # before torch is imported: CUDA_VISIBLE_DEVICES, thread counts

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    while True:
        try:
            job = tasks.get()
        except KeyboardInterrupt:
            return
        if job is None:
            return
        events.put(("started", job.key, os.getpid()))

        def progress(key: str, step: int, metrics: dict[str, float]) -> None:
            events.put(("progress", key, step, metrics))

        try:
            result = execute_job(job, progress)
        except KeyboardInterrupt:
            result = JobResult(job.key, job.run_id, "killed", reason="interrupted")
        events.put(("done", job.key, result))


@dataclass
class _Worker:
    process: Any
    tasks: Any
    job: Job | None = None
    started: float = 0.0


@dataclass
class LocalExecutor:
    """Runs jobs in ``jobs`` worker processes at once."""

    jobs: int
    threads_per_job: int | None = None
    gpus: int = 0
    jobs_per_gpu: int = 1
    workers: list[_Worker] = field(default_factory=list)

    def run(
        self,
        items: list[Any],
        prepare: Callable[[Any], Job],
        on_event: Callable[[Event], None],
        on_crash: Callable[[Job, str, str], JobResult],
    ) -> list[JobResult]:
        """Run every item; ``prepare`` turns an item into a Job just before it is dispatched
        (so runs that never start are never created); ``on_crash(job, reason, status)`` records
        a run whose worker died or never answered. Returns results in completion order.

        On KeyboardInterrupt the workers are interrupted too: each marks its run KILLED and
        the interrupt is re-raised once they have.
        """
        ctx = mp.get_context("spawn")
        events: Any = ctx.Queue()
        pending = deque(items)
        results: list[JobResult] = []
        slots = max(1, min(self.jobs, len(items)))
        self.workers = [self._start(ctx, slot, events) for slot in range(slots)]
        try:
            while pending or any(w.job is not None for w in self.workers):
                for worker in self.workers:
                    if worker.job is None and pending:
                        worker.job = prepare(pending.popleft())
                        worker.started = time.time()
                        worker.tasks.put(worker.job)
                self._drain(events, results, on_event, timeout=0.2)
                for slot, worker in enumerate(self.workers):
                    if worker.job is not None and not worker.process.is_alive():
                        self._drain(events, results, on_event, timeout=0.5)
                        if worker.job is not None:  # died without a word
                            reason = describe_exit(worker.process.exitcode)
                            result = on_crash(worker.job, reason, "failed")
                            results.append(result)
                            on_event(("done", worker.job.key, result))
                        self.workers[slot] = self._start(ctx, slot, events)
        except KeyboardInterrupt:
            self._interrupt(events, results, on_event, on_crash)
            raise
        finally:
            self._stop()
        return results

    def _start(self, ctx: Any, slot: int, events: Any) -> _Worker:
        env: dict[str, str] = {}
        if self.threads_per_job is not None:
            env["OMP_NUM_THREADS"] = str(self.threads_per_job)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str((slot // self.jobs_per_gpu) % self.gpus)
        tasks = ctx.Queue()
        process = ctx.Process(target=_worker_main, args=(env, tasks, events), daemon=True)
        process.start()
        return _Worker(process, tasks)

    def _drain(
        self,
        events: Any,
        results: list[JobResult],
        on_event: Callable[[Event], None],
        timeout: float,
    ) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                event = events.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                return
            if event[0] == "done":
                result: JobResult = event[2]
                results.append(result)
                for worker in self.workers:
                    if worker.job is not None and worker.job.key == result.key:
                        worker.job = None
            on_event(event)
            if time.time() >= deadline:
                return

    def _interrupt(
        self,
        events: Any,
        results: list[JobResult],
        on_event: Callable[[Event], None],
        on_crash: Callable[[Job, str, str], JobResult],
        grace_s: float = 30.0,
    ) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGINT)
        deadline = time.time() + grace_s
        while any(w.job is not None and w.process.is_alive() for w in self.workers):
            if time.time() > deadline:
                break
            try:
                self._drain(events, results, on_event, timeout=0.2)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
                break
        self._drain(events, results, on_event, timeout=0.2)
        for worker in self.workers:
            if worker.job is not None:  # never answered: mark it from here
                result = on_crash(worker.job, "interrupted", "killed")
                results.append(result)
                on_event(("done", worker.job.key, result))
                worker.job = None

    def _stop(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    worker.tasks.put(None)
        deadline = time.time() + 5
        for worker in self.workers:
            worker.process.join(timeout=max(0.0, deadline - time.time()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
