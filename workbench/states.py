"""The states a run can be in: one light module (no torch, no MLflow), so that the training
code can say how a run ended in the words the store, the driver and the report use."""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    """What a run is: one word for each state in the plan, the progress line, the summary and
    the report. The first six come from the store (MLflow's status and our tags, read in
    :attr:`RunRecord.state` and nowhere else); the driver adds the last two."""

    FINISHED = "finished"
    FAILED = "failed"  # training raised
    DIVERGED = "diverged"  # FAILED in MLflow, with the workbench.diverged tag
    KILLED = "killed"  # interrupted or crashed: resumable
    RUNNING = "running"
    STALE = "stale"  # left RUNNING by a process that is gone, or silent for too long: resumable
    TO_DO = "to do"  # not in the store yet
    CLAIMED = "claimed"  # held by another live workbench process

    def __str__(self) -> str:
        return self.value
