"""What an executor tells the driver (and the driver the progress display) about a job as it
runs: it started, it made progress, it ended. Frozen and picklable: a local worker sends them
through its pipe, a Ray task through a queue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, TypeVar

if TYPE_CHECKING:
    from workbench.sweep.jobs import Job, JobResult, JobStatus


@dataclass(frozen=True)
class Started:
    key: str  # the run key
    pid: int  # the process training it


@dataclass(frozen=True)
class Progress:
    key: str
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class Ended:
    """The job's last word: finished, diverged, failed or killed (``result.status``)."""

    key: str
    result: JobResult


Event: TypeAlias = Started | Progress | Ended
EventFn: TypeAlias = Callable[[Event], None]
CrashFn: TypeAlias = Callable[["Job", str, "JobStatus"], "JobResult"]
"""Records a job whose worker died or never answered: (job, reason, status) -> its result."""
Item = TypeVar("Item")
"""What the driver hands an executor, in order: an executor turns each into a unit (a run's job
or a pack) with the driver's ``prepare`` just before dispatching it, and never looks inside."""
