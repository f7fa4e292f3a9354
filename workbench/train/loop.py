"""The training loop, written once: steps, progress points, evals, divergence, checkpoints
and the end, for a run alone or for the K members of a pack.

How the members advance by one step is a :class:`Steps`, chosen when the job starts as the
attention backend is: :class:`Alone` (one ``Trainer``'s own step) or
``workbench.train.packed.PackedTrainer`` (K members in one vmapped step). Everything else a
member has (its loop state, divergence rules, metrics, checkpoints, final artifacts) is its
``Trainer``'s, so a member of a pack reports what its run alone reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

import torch

from workbench.states import RunState

if TYPE_CHECKING:
    from workbench.train.trainer import Trainer


class Diverged(Exception):
    pass


Ended: TypeAlias = Literal[RunState.FINISHED, RunState.DIVERGED]
"""How training itself ends (a failure raises; an interruption raises KeyboardInterrupt, or
DriverLost in a worker whose driver is gone)."""


@dataclass
class TrainResult:
    status: Ended
    step: int
    best_val_loss: float
    final_val_loss: float
    final_train_loss: float
    wall_time_s: float
    tokens_per_sec: float
    num_params: int
    device: str
    reason: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # eval points
    loop_time_s: float = 0.0  # training steps and evals only: the span the lecture's scripts time


class Steps(Protocol):
    """How the loop advances its members (trainers) by one step: one run alone, or a pack of
    K runs in one vmapped step (``workbench.train.packed``). Chosen when the job starts, as the
    attention backend is; the loop (:func:`fit_members`) is the same for both."""

    members: list[Trainer]

    def load(self) -> bool:
        """Continue every member from its checkpoint; whether there was one."""
        ...

    def step(self) -> torch.Tensor:
        """One optimizer step of every active member: their (detached) losses, shape (K,)."""
        ...

    def evaluate(self) -> list[dict[str, float]]:
        """Each member's eval losses."""
        ...

    def save(self, k: int) -> None:
        """Member k's checkpoint."""
        ...

    def drop(self, k: int) -> None:
        """Member k diverged: it takes no further part in the arithmetic."""
        ...


class Alone:
    """One run: its trainer's own step, eval and checkpoint."""

    def __init__(self, trainer: Trainer) -> None:
        self.members = [trainer]
        self.trainer = trainer

    def load(self) -> bool:
        return self.trainer.load_checkpoint()

    def step(self) -> torch.Tensor:
        return self.trainer.step()[None]

    def evaluate(self) -> list[dict[str, float]]:
        return [self.trainer.evaluate()]

    def save(self, k: int) -> None:
        self.trainer.save_checkpoint()

    def drop(self, k: int) -> None:
        pass


def fit_members(steps: Steps) -> list[TrainResult]:
    """The training loop: steps, progress points, evals, divergence, checkpoints and the end,
    for every member of ``steps``; one result per member, in order. A member that diverges
    ends there (its result says why) and the others go on."""
    members = steps.members
    first, train = members[0], members[0].train_config  # the schedule the members share
    K = len(members)
    resumed = steps.load()
    tokens_per_step = train.batch_size * train.block_size
    start, train_time = time.perf_counter(), 0.0
    results: list[TrainResult | None] = [None] * K
    last_eval: list[dict[str, float] | None] = [None] * K
    active = list(range(K))

    def diverged(k: int, exc: Diverged) -> None:
        results[k] = members[k].result(RunState.DIVERGED, start, train_time, last_eval[k], str(exc))
        active.remove(k)
        steps.drop(k)

    def eval_point() -> None:
        losses = steps.evaluate()
        for k in list(active):
            try:
                last_eval[k] = members[k].record_eval(losses[k])
            except Diverged as exc:
                diverged(k, exc)

    if not resumed:
        eval_point()
    last_checkpoint = window_start = time.perf_counter()
    # Steps since the last progress point (the members step together: one count), and their
    # losses, carried over a resume (a checkpoint between two progress points must not shorten
    # the next mean).
    window_steps = first.loop.window_steps
    pending = torch.tensor([m.loop.window_loss for m in members], device=first.device)
    on_cpu = first.device.type == "cpu"  # where reading a loss costs no device sync
    while active and first.loop.step < train.max_iters:
        losses = steps.step()
        step = first.loop.step
        pending += losses
        window_steps += 1
        if on_cpu and not math.isfinite((losses if K == 1 else losses.sum()).item()):
            for k, value in enumerate(losses.tolist()):
                if not math.isfinite(value) and k in active:
                    diverged(k, Diverged(f"loss became {value} at step {step}"))
            if not active:
                break
        if step % first.log_interval == 0 or step == train.max_iters:
            means = (pending / window_steps).tolist()
            elapsed = time.perf_counter() - window_start
            train_time += elapsed
            for k in list(active):
                try:
                    members[k].check_divergence(means[k])
                except Diverged as exc:
                    diverged(k, exc)
                    continue
                members[k].log_progress(means[k], window_steps * tokens_per_step / elapsed)
            pending.zero_()
            window_start, window_steps = time.perf_counter(), 0
            if not active:
                break
        at_eval = step % train.eval_interval == 0
        if at_eval or step == train.max_iters:
            eval_point()
            due = time.perf_counter() - last_checkpoint >= first.checkpoint_every_s
            if at_eval and step < train.max_iters and due:
                # Flush, then checkpoint: a crash between the two makes the resume redo points
                # already stored (the tracker drops them), never lose any.
                window_losses = pending.tolist()
                for k in active:
                    members[k].callback.on_checkpoint(step)
                    members[k].loop.window_loss = window_losses[k]
                    members[k].loop.window_steps = window_steps
                    steps.save(k)
                last_checkpoint = time.perf_counter()
            window_start = time.perf_counter()
    loop_end = time.perf_counter()
    for k in active:
        members[k].final_artifacts()
        results[k] = members[k].result(
            RunState.FINISHED, start, train_time, last_eval[k], None, loop_end
        )
    return [result for result in results if result is not None]
