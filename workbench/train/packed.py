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
) -> PackedTrainer:
    """The trainer of a pack, each member built as ``build_trainer`` builds its solo run.

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
    return PackedTrainer(members)


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
    trainable parameters are moved into this trainer's optimizer (row k of its buffer). A
    member that diverges is masked out: its row is zeroed and stepped at rate 0 from then on.
    """

    def __init__(self, members: list[Trainer]) -> None:
        first = members[0]
        self.members = members
        self.device = first.device
        self.train_config = first.train_config  # the shapes and schedules the members share
        self.active = [True] * len(members)
        self.active_mask = torch.ones(len(members), dtype=torch.bool, device=self.device)
        groups = [[p for p in m.model.parameters() if p.requires_grad] for m in members]
        decay = torch.tensor([m.train_config.weight_decay for m in members])
        self.optimizer = FlatAdamW(
            groups, lr=torch.zeros(len(members)), weight_decay=decay, fused=first.optimizer.fused
        )  # the members' own choice
        self.grad_clip = torch.tensor([m.train_config.grad_clip for m in members]).to(self.device)
        self.clips = any(m.train_config.grad_clip > 0 for m in members)  # known here: no sync
        self.params = self._stacked_params()
        self.eval_sets = {
            split: (
                torch.stack([m.eval_sets[split][0] for m in members]),
                torch.stack([m.eval_sets[split][1] for m in members]),
            )
            for split in first.eval_sets
        }
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
        K, models = len(self.members), [m.model for m in self.members]
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
        return buffer.view(len(self.members), -1)  # (K, P)

    # -- one step, one eval ------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One optimizer step of every member; returns the (detached) losses (K,)."""
        step = self.members[0].loop.step
        self.optimizer.lr = torch.tensor(
            [
                learning_rate_at(step, m.train_config) * on
                for m, on in zip(self.members, self.active, strict=True)
            ]
        )
        batches = [m.sampler.sample() for m in self.members]
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
        return losses.detach()

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
        rows = max(1, self.members[0].eval_rows // len(self.members))
        losses: list[dict[str, float]] = [{} for _ in self.members]
        for split, (x_all, y_all) in self.eval_sets.items():
            total, count = torch.zeros(len(self.members), device=self.device), 0
            for start in range(0, x_all.size(1), rows):
                x = x_all[:, start : start + rows].to(self.device)
                y = y_all[:, start : start + rows].to(self.device)
                with self.members[0].autocast():
                    loss = self.losses(self.params, x, y)
                total += loss.float() * x.size(1)
                count += x.size(1)
            for k, value in enumerate((total / count).tolist()):
                losses[k][f"{split}_loss"] = value
        return losses

    # -- the loop's Steps ----------------------------------------------------------------

    def fit(self) -> list[TrainResult]:
        """Train every member to the end or to its divergence; one result per member."""
        return fit_members(self)

    def load(self) -> bool:
        """Each member from its checkpoint (all or none: ``build_packed_trainer``), then its
        moments into row k."""
        resumed = [m.load_checkpoint() for m in self.members]
        if any(resumed):
            self._load_optimizer_rows()
        return any(resumed)

    def drop(self, k: int) -> None:
        """Member k diverged: masked out, its row zeroed (nothing non-finite left to compute)
        and stepped at rate 0 from now on."""
        self.active[k] = False
        self.active_mask[k] = False
        with torch.no_grad():
            for buffer in (self.optimizer.flat, self.optimizer.exp_avg, self.optimizer.exp_avg_sq):
                self._rows(buffer)[k].zero_()

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
        solo.exp_avg.copy_(self._rows(self.optimizer.exp_avg)[k])
        solo.exp_avg_sq.copy_(self._rows(self.optimizer.exp_avg_sq)[k])
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
        """After each member loaded its checkpoint (weights straight into row k), its moments
        from its solo optimizer into row k."""
        for k, member in enumerate(self.members):
            self._rows(self.optimizer.exp_avg)[k].copy_(member.optimizer.exp_avg)
            self._rows(self.optimizer.exp_avg_sq)[k].copy_(member.optimizer.exp_avg_sq)
        self.optimizer.steps.copy_(self.members[0].optimizer.steps)
        self.optimizer.step_number = self.members[0].optimizer.step_number
