"""Which executor ``--executor`` builds, and which GPU each local worker gets."""

from __future__ import annotations

import os

import pytest

from workbench.errors import WorkbenchError
from workbench.sweep.executors import make_executor
from workbench.sweep.executors.local import LocalExecutor, worker_gpu
from workbench.sweep.executors.ray import RayExecutor


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
