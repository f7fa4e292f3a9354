"""Packed training: runs that differ only in seed and learning-rate settings, trained as one.

The K members of a pack share every shape: model, block and batch size, the schedule of steps,
evals and progress points, the device. Their trainable parameters live in one flat buffer of
shape (K, P), member k's in row k, so one ``FlatAdamW`` step, with a rate and a decay per
member, updates them all; the stacked (K, *shape) parameters the forward reads are strided
views into that buffer, and so are their gradients. One forward and one backward serve every
member: ``torch.func.vmap`` over ``functional_call`` of the ladder's own model, its attention
backend folded over the pack (``PackedAttention``).

Everything else a member has is its solo run's, built by ``build_trainer``: its initial
weights, batch sampler, eval sets, loop state, divergence rules, metrics, checkpoints and final
artifacts. So a member's curves are its solo run's to float rounding, and a checkpoint written
here resumes a solo run and the other way round. The loop is the solo run's own
(``workbench.train.loop.fit_members``): this class is its ``Steps`` for K members.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, vmap

from workbench.corpus import Corpus
from workbench.models import LanguageModel, build_model
from workbench.models.attention import PackedAttention
from workbench.spec import RunConfig, pack_key
from workbench.train.checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CheckpointError,
    load_checkpoint_file,
    save_checkpoint,
)
from workbench.train.factory import build_trainer
from workbench.train.loop import TrainResult, fit_members
from workbench.train.optim import FlatAdamW
from workbench.train.trainer import Callback, Trainer, learning_rate_at


def build_packed_trainer(
    configs: list[RunConfig],
    corpus: Corpus,
    callbacks: list[Callback | None],
    run_dirs: list[Path | None],
    *,
    log_interval: int = 10,
    checkpoint_every_s: float = 0.0,
    fused: bool | None = None,
    rows: Sequence[int] = (),
    width: int = 0,
) -> PackedTrainer:
    """The trainer of a pack, each member built as ``build_trainer`` builds its solo run.
    ``rows`` and ``width``: each member's row in a pack wider than its members. A resumed pack
    keeps the rows its members started in, and its width, though some members have ended or
    resume apart: the others' float sums depend on both (a row's place in the buffer sets its
    memory alignment, and so the order of a kernel's sums).

    Raises ValueError when the runs cannot share a pack: a run that is never packed, keys
    that differ, or checkpoints at different steps (a fresh run and a resumed one included:
    pack only runs that stand at one step).
    """
    if not configs or len(callbacks) != len(configs) or len(run_dirs) != len(configs):
        raise ValueError("a pack needs at least one run, and a callback and a run_dir for each")
    keys = [pack_key(config) for config in configs]
    if None in keys:
        raise ValueError("runs with dropout or train.compile are never packed")
    if len(set(keys)) > 1:
        raise ValueError("packed runs may differ only in seed and learning-rate settings")
    steps = sorted({checkpoint_step(run_dir) for run_dir in run_dirs})
    if len(steps) > 1:
        raise ValueError(f"packed runs must resume from one step, not from steps {steps}")
    members = [
        build_trainer(
            config,
            corpus,
            callback,
            run_dir,
            log_interval=log_interval,
            checkpoint_every_s=checkpoint_every_s,
            fused=fused,
        )
        for config, callback, run_dir in zip(configs, callbacks, run_dirs, strict=True)
    ]
    padding = [  # rows only: masked from the start, never recorded
        build_trainer(configs[0], corpus, None, None, fused=fused)
        for _ in range(max(width, len(configs)) - len(configs))
    ]
    return PackedTrainer(members, padding, rows)


def checkpoint_step(run_dir: Path | None, name: str = CHECKPOINT_NAME) -> int:
    """The step a run would resume from (0: no checkpoint)."""
    if run_dir is None or not (run_dir / name).exists():
        return 0
    return int(load_checkpoint_file(run_dir / name, mmap=True)["step"])


def align_checkpoints(run_dirs: Sequence[Path]) -> list[int]:
    """A pack stopped between two of its members' checkpoints (a kill at that moment) leaves
    some a checkpoint ahead of the others: those go back to the one before it (each member
    keeps it, ``PREVIOUS_NAME``) where it stands at the others' step, so that the pack goes
    on as one, its float sums the same as uninterrupted. The points they stored past that step
    are computed again, the same, and not stored twice. Returns each run's step after."""
    steps = [checkpoint_step(run_dir) for run_dir in run_dirs]
    behind = min(steps, default=0)
    for k, run_dir in enumerate(run_dirs):
        if steps[k] == behind:
            continue
        if behind == 0:  # the others start over: so does it, from its seed
            (run_dir / CHECKPOINT_NAME).unlink()
            steps[k] = 0
            continue
        try:
            previous = checkpoint_step(run_dir, PREVIOUS_NAME)
        except CheckpointError:  # not one workbench wrote: never used, never a verdict
            continue
        if previous == behind:
            os.replace(run_dir / PREVIOUS_NAME, run_dir / CHECKPOINT_NAME)
            steps[k] = behind
    return steps


class PackedTrainer:
    """Trains the models of K solo trainers (``members``) in one step.

    The members keep their models, samplers, eval sets, loop states and callbacks; their
    trainable parameters are moved into this trainer's optimizer (one row of its buffer each). A
    member that diverges is masked out: its row is zeroed and stepped at rate 0 from then on.
    ``padding``: rows masked out from the start, where the pack is wider than its members
    (``build_packed_trainer``), member k in row ``rows[k]``; the loop never sees them.
    """

    def __init__(
        self, members: list[Trainer], padding: Sequence[Trainer] = (), rows: Sequence[int] = ()
    ) -> None:
        first, width = members[0], len(members) + len(padding)
        self.row_of = list(rows) or list(range(len(members)))
        distinct = set(self.row_of) <= set(range(width)) and len(set(self.row_of)) == len(members)
        if len(self.row_of) != len(members) or not distinct:
            raise ValueError(f"rows {self.row_of}: one distinct row of {width} for each member")
        placed, spare = dict(zip(self.row_of, members, strict=True)), iter(padding)
        self.members = members
        # Every row's trainer, in row order: the members' and the padding's.
        self.trainers = [placed[r] if r in placed else next(spare) for r in range(width)]
        trainers = self.trainers
        self.device = first.device
        self.train_config = first.train_config  # the shapes and schedules the members share
        self.active = [True] * len(trainers)
        self.active_mask = torch.ones(len(trainers), dtype=torch.bool, device=self.device)
        groups = [[p for p in m.model.parameters() if p.requires_grad] for m in trainers]
        decay = torch.tensor([m.train_config.weight_decay for m in trainers])
        self.optimizer = FlatAdamW(
            groups, lr=torch.zeros(len(trainers)), weight_decay=decay, fused=first.optimizer.fused
        )  # the members' own choice
        self.grad_clip = torch.tensor([m.train_config.grad_clip for m in trainers]).to(self.device)
        self.clips = any(m.train_config.grad_clip > 0 for m in trainers)  # known here: no sync
        self.params = self._stacked_params()
        self.eval_sets = {
            split: (
                torch.stack([m.eval_sets[split][0] for m in trainers]),
                torch.stack([m.eval_sets[split][1] for m in trainers]),
            )
            for split in first.eval_sets
        }
        for row in set(range(width)) - set(self.row_of):
            self._mask(row)
        backend = first.model.attention_backend
        with torch.random.fork_rng(devices=[]):  # its weights are never used
            self.template = build_model(
                first.model.config,
                first.model.vocab_size,
                first.model.block_size,
                PackedAttention(backend) if backend is not None else None,
            ).to(self.device)
        self.losses: Callable[..., torch.Tensor] = vmap(self._member_loss)

    def _member_loss(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(self.template, params, (x, y))[1]

    def _stacked_params(self) -> dict[str, torch.Tensor]:
        """(K, *shape) views of the flat buffer, gradients likewise; untrainable ones stacked."""
        K, models = len(self.trainers), [m.model for m in self.trainers]
        row = self.optimizer.flat.numel() // K
        stacked: dict[str, torch.Tensor] = {}
        offset = 0
        for name, p in models[0].named_parameters():
            if not p.requires_grad:
                stacked[name] = torch.stack([m.get_parameter(name).detach() for m in models])
                continue
            size, stride = (K, *p.shape), (row, *p.contiguous().stride())
            view = nn.Parameter(self.optimizer.flat.as_strided(size, stride, offset))
            view.grad = self.optimizer.grad.as_strided(size, stride, offset)
            stacked[name] = view
            offset += p.numel()
        return stacked

    def _rows(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer.view(len(self.trainers), -1)  # (K, P)

    # -- one step, one eval ------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One optimizer step of every member; returns the members' (detached) losses (K,)."""
        step = self.members[0].loop.step
        self.optimizer.lr = torch.tensor(
            [
                learning_rate_at(step, m.train_config) * on
                for m, on in zip(self.trainers, self.active, strict=True)
            ]
        )
        batches = [m.sampler.sample() for m in self.trainers]
        x = torch.stack([b[0] for b in batches]).to(self.device)  # (K, B, T)
        y = torch.stack([b[1] for b in batches]).to(self.device)
        with self.members[0].autocast():
            losses = self.losses(self.params, x, y)  # (K,)
        self.optimizer.zero_grad()
        with warnings.catch_warnings():
            # The stacked views have gaps (rows of P), so autograd warns that their gradients
            # are not laid out as it would choose; it accumulates into them all the same.
            warnings.filterwarnings("ignore", "grad and param do not obey")
            torch.where(self.active_mask, losses, 0.0).sum().backward()  # type: ignore[no-untyped-call]
        self._check_gradients()
        if self.clips:
            self._clip_gradients()
        self.optimizer.step()
        for member in self.members:
            member.loop.step += 1
        return losses.detach()[self.row_of]

    def _check_gradients(self) -> None:
        first = next(p for p in self.params.values() if p.requires_grad)
        if first.grad is None or first.grad.data_ptr() != self.optimizer.grad.data_ptr():
            raise RuntimeError("the packed gradients no longer live in the optimizer's buffer")

    def _clip_gradients(self) -> None:
        """Each member's gradient clipped by its own norm, as a solo run's is."""
        grad = self._rows(self.optimizer.grad)
        norm = torch.linalg.vector_norm(grad, dim=1)
        scale = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
        grad.mul_(torch.where(self.grad_clip > 0, scale, 1.0)[:, None])

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        """Each member's mean loss over its own eval sets. A pass takes the windows a solo
        pass takes, shared by the members: one vmapped pass holds all K members' activations."""
        rows = max(1, self.members[0].eval_rows // len(self.trainers))
        losses: list[dict[str, float]] = [{} for _ in self.members]
        for split, (x_all, y_all) in self.eval_sets.items():
            total, count = torch.zeros(len(self.trainers), device=self.device), 0
            for start in range(0, x_all.size(1), rows):
                x = x_all[:, start : start + rows].to(self.device)
                y = y_all[:, start : start + rows].to(self.device)
                with self.members[0].autocast():
                    loss = self.losses(self.params, x, y)
                total += loss.float() * x.size(1)
                count += x.size(1)
            values = (total / count).tolist()
            for k, row in enumerate(self.row_of):
                losses[k][f"{split}_loss"] = values[row]
        return losses

    # -- the loop's Steps ----------------------------------------------------------------

    def fit(self) -> list[TrainResult]:
        """Train every member to the end or to its divergence; one result per member."""
        return fit_members(self)

    def load(self) -> bool:
        """Each member from its checkpoint (all or none: ``build_packed_trainer``), then its
        moments into its row."""
        resumed = [m.load_checkpoint() for m in self.members]
        if any(resumed):
            self._load_optimizer_rows()
        return any(resumed)

    def drop(self, k: int) -> None:
        """Member k diverged: masked out, its row zeroed (nothing non-finite left to compute)
        and stepped at rate 0 from now on."""
        self._mask(self.row_of[k])

    def _mask(self, row: int) -> None:
        self.active[row] = False
        self.active_mask[row] = False
        with torch.no_grad():
            for buffer in (self.optimizer.flat, self.optimizer.exp_avg, self.optimizer.exp_avg_sq):
                self._rows(buffer)[row].zero_()

    # -- members, checkpoints ---------------------------------------------------------

    def member_model(self, k: int) -> LanguageModel:
        """Member k's current weights as a plain ladder model of its own tensors."""
        model = self.members[k].model
        memo: dict[int, object] = {
            id(p): nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for p in model.parameters()
        }
        return copy.deepcopy(model, memo)

    def save(self, k: int) -> None:
        """Member k's checkpoint in the solo format: its optimizer state as its solo FlatAdamW
        (built by ``build_trainer``, otherwise unused) would hold it."""
        member = self.members[k]
        if member.checkpoint_path is None:
            return
        solo = member.optimizer
        solo.exp_avg.copy_(self._rows(self.optimizer.exp_avg)[self.row_of[k]])
        solo.exp_avg_sq.copy_(self._rows(self.optimizer.exp_avg_sq)[self.row_of[k]])
        solo.steps.copy_(self.optimizer.steps)
        solo.step_number = self.optimizer.step_number
        solo.lr = learning_rate_at(member.loop.step - 1, member.train_config)  # the last step's
        save_checkpoint(
            member.checkpoint_path,
            self.member_model(k),
            solo,
            member.sampler,
            member.loop,
            keep_previous=True,  # a kill before the next member's: align_checkpoints
        )

    def _load_optimizer_rows(self) -> None:
        """After each member loaded its checkpoint (weights straight into its row), its
        moments from its solo optimizer into that row."""
        for row, member in zip(self.row_of, self.members, strict=True):
            self._rows(self.optimizer.exp_avg)[row].copy_(member.optimizer.exp_avg)
            self._rows(self.optimizer.exp_avg_sq)[row].copy_(member.optimizer.exp_avg_sq)
        self.optimizer.steps.copy_(self.members[0].optimizer.steps)
        self.optimizer.step_number = self.members[0].optimizer.step_number
