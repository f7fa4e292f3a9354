"""Executors run jobs: ``local`` in worker processes on this machine, ``ray`` on a Ray cluster."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from workbench.errors import WorkbenchError
from workbench.sweep.events import CrashFn, EventFn, Item

if TYPE_CHECKING:
    from workbench.sweep.jobs import JobResult
    from workbench.sweep.packs import Unit

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    def run(
        self,
        items: Sequence[Item],
        prepare: Callable[[Item], Unit],
        on_event: EventFn,
        on_crash: CrashFn,
    ) -> list[JobResult]: ...

    def warm_up(self, runs: int) -> None:
        """Get ready for up to ``runs`` runs before ``run`` is called (may do nothing)."""

    def close(self) -> None:
        """Let go of whatever ``warm_up`` started and ``run`` did not use."""


def make_executor(
    name: str,
    jobs: int | None = None,
    jobs_per_gpu: int = 1,
    address: str | None = None,
    cpus_per_run: float = 1.0,
    gpus_per_run: float = 0.0,
    max_retries: int = 2,
) -> tuple[Executor, int]:
    """The executor ``name`` (local or ray) and the torch threads of a run that sets none.

    Local: ``jobs`` worker processes (default: one per GPU times ``jobs_per_gpu``, else one per
    core), each run with the cores divided by the slots, not by the runs left, since a run's
    numbers must not depend on what else is in the sweep (the count is recorded with each
    run). Ray: tasks asking for ``cpus_per_run``/``gpus_per_run`` on the cluster at
    ``address``, a crashed worker retried up to ``max_retries`` times per run.
    """
    if name == "ray":
        from workbench.sweep.executors.ray import RayExecutor

        threads = max(1, int(cpus_per_run))
        return RayExecutor(address, cpus_per_run, gpus_per_run, max_retries), threads
    if name == "local":
        from workbench.sweep.executors.local import LocalExecutor

        default_jobs, gpus = _default_jobs()
        n_jobs = jobs or default_jobs * (jobs_per_gpu if gpus else 1)
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        return LocalExecutor(n_jobs, threads, gpus, jobs_per_gpu), threads
    raise WorkbenchError(f"--executor: must be {' or '.join(EXECUTORS)} (got {name!r})")


def _default_jobs() -> tuple[int, int]:
    """(jobs, gpus): one per GPU, else one per core."""
    gpus = gpu_count()
    return (gpus, gpus) if gpus else (os.cpu_count() or 1, 0)


def gpu_count() -> int:
    """torch's CUDA device count, without importing torch (a second) where there can be none:
    no NVIDIA or AMD (ROCm) device node on this Linux machine, or none made visible."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return 0
    if sys.platform == "linux" and not any(
        os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
    ):
        return 0
    import torch

    return int(torch.cuda.device_count())
