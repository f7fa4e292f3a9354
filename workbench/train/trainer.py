"""The training loop. Like minGPT's trainer it has nothing to do with GPT: it is handed a model,
its optimizer, a batch sampler, fixed eval sets and a train config, and reports to a callback;
it knows nothing of MLflow, Ray or the CLI. ``workbench.train.factory.build_trainer`` builds
those parts from a run's config.

One optimizer step is :meth:`Trainer.step`; evaluation runs on the fixed eval sets in as few
forward passes as memory allows; checkpoints at eval points hold everything needed to continue
exactly (``workbench.train.checkpoint``). The loop itself is written once, in
``workbench.train.loop``: it advances a run alone or the K members of a pack, each member a
Trainer with its own loop state, divergence, metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from workbench.corpus import BatchSampler, CharTokenizer
from workbench.models import LanguageModel
from workbench.spec import TrainConfig, lr_varies
from workbench.train.checkpoint import CHECKPOINT_NAME, LoopState, load_checkpoint, save_checkpoint
from workbench.train.loop import Alone, Diverged, Ended, TrainResult, fit_members
from workbench.train.optim import FlatAdamW

SAMPLE_CHARS = 500


class Callback(Protocol):
    """Where the trainer's results go (a tracker, a progress line, a list in a test)."""

    def on_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def on_artifact(self, name: str, content: str | bytes) -> None: ...

    def on_checkpoint(self, step: int) -> None:
        """Called just before a checkpoint is written: the moment to store what was reported
        so far (see workbench.sweep.jobs)."""
        ...


class NullCallback:
    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def on_artifact(self, name: str, content: str | bytes) -> None:
        pass

    def on_checkpoint(self, step: int) -> None:
        pass


def learning_rate_at(step: int, train: TrainConfig) -> float:
    """Linear warmup, then constant or cosine decay to ``min_lr`` at ``max_iters``."""
    if train.warmup_iters and step < train.warmup_iters:
        return train.learning_rate * (step + 1) / train.warmup_iters
    if train.lr_schedule == "constant":
        return train.learning_rate
    span = max(1, train.max_iters - train.warmup_iters)
    progress = min(1.0, (step - train.warmup_iters) / span)
    return train.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (
        train.learning_rate - train.min_lr
    )


class Trainer:
    """Trains one model; ``fit()`` resumes from ``run_dir``'s checkpoint when there is one.

    The model, the optimizer over its parameters, the sampler and the eval sets (inputs and
    targets per split, on the CPU) are the caller's; so is anything process-wide (threads, TF32,
    the seed the weights were drawn from). ``forward_model`` is what the steps and evals call
    (the model, or a compiled wrapper of it); ``eval_rows`` how many eval windows one forward
    pass takes; ``tokenizer``, ``attention_prompt`` (token ids) and ``seed`` make the final
    sample and attention maps.
    """

    def __init__(
        self,
        model: LanguageModel,
        optimizer: FlatAdamW,
        sampler: BatchSampler,
        eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
        train: TrainConfig,
        *,
        device: torch.device,
        eval_rows: int,
        tokenizer: CharTokenizer,
        attention_prompt: torch.Tensor,
        seed: int,
        forward_model: Callable[..., Any] | None = None,
        callback: Callback | None = None,
        run_dir: Path | None = None,
        log_interval: int = 10,
        checkpoint_every_s: float = 0.0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.eval_sets = eval_sets
        self.train_config = train
        self.device = device
        self.eval_rows = eval_rows
        self.tokenizer = tokenizer
        self.attention_prompt = attention_prompt
        self.seed = seed
        self.forward_model: Callable[..., Any] = forward_model or model
        self.callback: Callback = callback or NullCallback()
        self.run_dir = run_dir
        self.log_interval = log_interval
        self.checkpoint_every_s = checkpoint_every_s  # at eval points at most this often
        self.loop = LoopState()

    # -- one step, one eval ------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        """One optimizer step on one batch; returns the (detached) loss on the device."""
        self.optimizer.lr = learning_rate_at(self.loop.step, self.train_config)
        x, y = self.sampler.sample()
        if self.device.type != "cpu":
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            _, loss = self.forward_model(x, y)
        assert loss is not None
        self.optimizer.zero_grad()
        loss.backward()
        if self.train_config.grad_clip > 0:
            self.optimizer.clip_grad_norm_(self.train_config.grad_clip)
        self.optimizer.step()
        self.loop.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over every window of each split's fixed eval set."""
        self.model.eval()
        losses = {}
        for split, (x_all, y_all) in self.eval_sets.items():
            total, count = torch.zeros((), device=self.device), 0
            for start in range(0, len(x_all), self.eval_rows):
                x = x_all[start : start + self.eval_rows].to(self.device)
                y = y_all[start : start + self.eval_rows].to(self.device)
                with self.autocast():
                    _, loss = self.forward_model(x, y)
                assert loss is not None
                total += loss.float() * len(x)
                count += len(x)
            losses[f"{split}_loss"] = (total / count).item()
        self.model.train()
        return losses

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``max_iters`` (or to divergence), resuming from ``run_dir``'s checkpoint."""
        (result,) = fit_members(Alone(self))
        return result

    def check_divergence(self, loss: float, what: str = "loss") -> None:
        """Non-finite, or ``divergence_factor`` times the loss at step 0 (chance level)."""
        if not math.isfinite(loss):
            raise Diverged(f"{what} became {loss} by step {self.loop.step}")
        factor = self.train_config.divergence_factor
        initial = self.loop.history[0]["val_loss"] if self.loop.history else math.inf
        if factor > 0 and loss > factor * initial:
            raise Diverged(
                f"{what} {loss:.4g} exceeded {factor:g}x the initial {initial:.4g} "
                f"by step {self.loop.step}"
            )

    def log_progress(self, mean_loss: float, tokens_per_sec: float) -> None:
        beta = 0.9
        self.loop.smoothed_loss = (
            mean_loss
            if self.loop.smoothed_loss is None
            else beta * self.loop.smoothed_loss + (1 - beta) * mean_loss
        )
        metrics = {"train_loss_smooth": self.loop.smoothed_loss, "tokens_per_sec": tokens_per_sec}
        if lr_varies(self.train_config):  # a constant is a param, not a curve
            metrics["lr"] = learning_rate_at(self.loop.step - 1, self.train_config)  # last step's
        self.callback.on_metrics(metrics, self.loop.step)

    def record_eval(self, losses: dict[str, float]) -> dict[str, float]:
        """Check, keep and report one eval point's losses."""
        for name, value in losses.items():
            self.check_divergence(value, name)
        self.loop.best_val_loss = min(self.loop.best_val_loss, losses["val_loss"])
        self.loop.history.append({"step": float(self.loop.step), **losses})
        self.callback.on_metrics(losses, self.loop.step)
        return losses

    def result(
        self,
        status: Ended,
        start: float,
        train_time: float,
        last_eval: dict[str, float] | None,
        reason: str | None,
        loop_end: float | None = None,  # when steps and evals ended (default: now)
    ) -> TrainResult:
        end = time.perf_counter()
        wall = end - start
        tokens = self.loop.step * self.train_config.batch_size * self.train_config.block_size
        final = last_eval or (self.loop.history[-1] if self.loop.history else {})
        return TrainResult(
            status=status,
            step=self.loop.step,
            best_val_loss=self.loop.best_val_loss,
            final_val_loss=final.get("val_loss", math.nan),
            final_train_loss=final.get("train_loss", math.nan),
            wall_time_s=wall,
            tokens_per_sec=tokens / train_time if train_time > 0 else 0.0,
            num_params=self.model.num_params(),
            device=str(self.device),
            reason=reason,
            history=list(self.loop.history),
            loop_time_s=(end if loop_end is None else loop_end) - start,
        )

    # -- end of run -------------------------------------------------------------------

    def final_artifacts(self) -> None:
        tokenizer = self.tokenizer
        self.callback.on_artifact("sample.txt", self.sample(SAMPLE_CHARS))
        prompt_ids = self.attention_prompt
        self.model.eval()
        with torch.no_grad():
            weights = self.model.attention_weights(prompt_ids[None].to(self.device))
        self.model.train()
        if weights is not None:
            payload = {
                "prompt": tokenizer.decode(prompt_ids),
                "shape": ["layer", "head", "query", "key"],
                "weights": weights.float().cpu().tolist(),
            }
            self.callback.on_artifact("attention.json", json.dumps(payload))

    def sample(self, max_new_tokens: int, prompt: str = "\n", temperature: float = 1.0) -> str:
        tokenizer = self.tokenizer
        start_ids = tokenizer.encode(prompt if all(c in tokenizer.chars for c in prompt) else "")
        if not start_ids:
            start_ids = [0]
        idx = torch.tensor([start_ids], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.model.eval()
        out = self.model.generate(idx, max_new_tokens, temperature, generator=generator)
        self.model.train()
        return tokenizer.decode(out[0].tolist())

    # -- checkpoints ------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(
                self.checkpoint_path, self.model, self.optimizer, self.sampler, self.loop
            )

    def load_checkpoint(self) -> bool:
        """Continue from ``run_dir``'s checkpoint, if there is one."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        self.loop = load_checkpoint(path, self.model, self.optimizer, self.sampler)
        return True
