"""Which GPU each local worker gets."""

from __future__ import annotations

import pytest

from workbench.sweep.executors.local import worker_gpu


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
