"""The training loop. It knows a model, batches, a config and a callback for metrics; it has
nothing to do with MLflow, Ray or the CLI (minGPT's trainer is the model for this).

One optimizer step is :meth:`Trainer.step`; evaluation runs on a fixed eval set in as few
forward passes as memory allows; checkpoints at eval points hold everything needed to continue
exactly (model, optimizer, step, every RNG state).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from workbench.corpus import BatchSampler, Corpus, eval_set
from workbench.errors import first_line
from workbench.models import LanguageModel, build_model
from workbench.spec import RunConfig, TrainConfig, lr_varies
from workbench.train.optim import FlatAdamW

CHECKPOINT_NAME = "checkpoint.pt"
SAMPLE_CHARS = 500
ATTENTION_PROMPT_CHARS = 32


class Callback(Protocol):
    """Where the trainer's results go (a tracker, a progress line, a list in a test)."""

    def on_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def on_artifact(self, name: str, content: str | bytes) -> None: ...

    # Optional: ``on_checkpoint(step)``, called just before a checkpoint is written, the moment
    # to store what was reported so far (see workbench.sweep.jobs).


class NullCallback:
    def on_checkpoint(self, step: int) -> None:
        pass

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def on_artifact(self, name: str, content: str | bytes) -> None:
        pass


@dataclass
class TrainResult:
    status: Literal["finished", "diverged"]
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


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def _rows_per_pass(device: torch.device, block_size: int, width: int) -> int:
    """How many eval windows one forward pass takes: a budget of activation floats."""
    # On a CPU, passes of ~512 windows of a small model stay in cache: 30% faster than one
    # pass over the whole eval set (measured on rung 6; see benchmarks/RESULTS.md).
    budget = (1 << 27) if device.type == "cuda" else (1 << 19)
    return max(1, budget // (block_size * width))


class Diverged(Exception):
    pass


class Trainer:
    """Trains one run; ``fit()`` resumes from ``run_dir``'s checkpoint when there is one."""

    def __init__(
        self,
        config: RunConfig,
        corpus: Corpus,
        callback: Callback | None = None,
        run_dir: Path | None = None,
        log_interval: int = 10,
        checkpoint_every_s: float = 0.0,
    ) -> None:
        self.config = config
        self.train_config = config.train
        self.corpus = corpus
        self.callback = callback or NullCallback()
        self.run_dir = run_dir
        self.log_interval = log_interval
        self.checkpoint_every_s = checkpoint_every_s  # at eval points at most this often
        train = config.train
        self.device = resolve_device(train.device)
        if train.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(train.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(config.seed)  # init weights and dropout: from the run's seed
        self.model: LanguageModel = build_model(
            config.model, corpus.tokenizer.vocab_size, train.block_size
        ).to(self.device)
        self.forward_model: Any = self.model
        if train.compile and self.device.type == "cuda":
            self.forward_model = torch.compile(self.model)
        self.optimizer = FlatAdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=train.learning_rate,
            weight_decay=train.weight_decay,
        )
        self.sampler = BatchSampler(corpus.train, train.block_size, train.batch_size, config.seed)
        self.eval_sets = {
            split: eval_set(
                corpus.split(split),
                train.block_size,
                train.batch_size,
                train.eval_iters,
                config.seed,
                split,
            )
            for split in ("train", "val")
        }
        self.step_count = 0
        self.best_val_loss = math.inf
        self.smoothed_loss: float | None = None
        self.history: list[dict[str, float]] = []
        self.window_loss, self.window_steps = 0.0, 0  # the progress mean's steps so far

    # -- one step, one eval ------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        """One optimizer step on one batch; returns the (detached) loss on the device."""
        self.optimizer.lr = learning_rate_at(self.step_count, self.train_config)
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
        self.step_count += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over every window of each split's fixed eval set."""
        self.model.eval()
        width = max(self.corpus.tokenizer.vocab_size, 4 * self.config.model.n_embd)
        rows = _rows_per_pass(self.device, self.train_config.block_size, width)
        losses = {}
        for split, (x_all, y_all) in self.eval_sets.items():
            total, count = torch.zeros((), device=self.device), 0
            for start in range(0, len(x_all), rows):
                x = x_all[start : start + rows].to(self.device)
                y = y_all[start : start + rows].to(self.device)
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
        train = self.train_config
        resumed = self.load_checkpoint()
        tokens_per_step = train.batch_size * train.block_size
        start = time.perf_counter()
        train_time, last_eval = 0.0, None
        if not resumed:
            last_eval = self._eval_point()
        last_checkpoint = time.perf_counter()
        window_start, window_steps = time.perf_counter(), self.window_steps
        # Losses of the steps since the last progress point, carried over a resume (a
        # checkpoint between two progress points must not shorten the next mean).
        pending = torch.tensor(self.window_loss, device=self.device)
        try:
            while self.step_count < train.max_iters:
                loss = self.step()
                pending += loss
                window_steps += 1
                if self.device.type == "cpu" and not math.isfinite(loss.item()):
                    raise Diverged(f"loss became {loss.item()} at step {self.step_count}")
                if self.step_count % self.log_interval == 0 or self.step_count == train.max_iters:
                    mean_loss = (pending / window_steps).item()
                    self._check_divergence(mean_loss)
                    elapsed = time.perf_counter() - window_start
                    train_time += elapsed
                    self._log_progress(mean_loss, window_steps * tokens_per_step / elapsed)
                    pending.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                at_eval = self.step_count % train.eval_interval == 0
                if at_eval or self.step_count == train.max_iters:
                    last_eval = self._eval_point()
                    due = time.perf_counter() - last_checkpoint >= self.checkpoint_every_s
                    if at_eval and self.step_count < train.max_iters and due:
                        # Flush, then checkpoint: a crash between the two makes the resume
                        # redo points already stored (the tracker drops them), never lose any.
                        _before_checkpoint(self.callback, self.step_count)
                        self.window_loss, self.window_steps = pending.item(), window_steps
                        self.save_checkpoint()
                        last_checkpoint = time.perf_counter()
                    window_start = time.perf_counter()
        except Diverged as exc:
            return self._result("diverged", start, train_time, last_eval, str(exc))
        loop_end = time.perf_counter()
        self._final_artifacts()
        return self._result("finished", start, train_time, last_eval, None, loop_end)

    def _check_divergence(self, loss: float, what: str = "loss") -> None:
        """Non-finite, or ``divergence_factor`` times the loss at step 0 (chance level)."""
        if not math.isfinite(loss):
            raise Diverged(f"{what} became {loss} by step {self.step_count}")
        factor = self.train_config.divergence_factor
        initial = self.history[0]["val_loss"] if self.history else math.inf
        if factor > 0 and loss > factor * initial:
            raise Diverged(
                f"{what} {loss:.4g} exceeded {factor:g}x the initial {initial:.4g} "
                f"by step {self.step_count}"
            )

    def _log_progress(self, mean_loss: float, tokens_per_sec: float) -> None:
        beta = 0.9
        self.smoothed_loss = (
            mean_loss
            if self.smoothed_loss is None
            else beta * self.smoothed_loss + (1 - beta) * mean_loss
        )
        metrics = {"train_loss_smooth": self.smoothed_loss, "tokens_per_sec": tokens_per_sec}
        if lr_varies(self.train_config):  # a constant is a param, not a curve
            metrics["lr"] = learning_rate_at(self.step_count - 1, self.train_config)  # the last
        self.callback.on_metrics(metrics, self.step_count)

    def _eval_point(self) -> dict[str, float]:
        losses = self.evaluate()
        for name, value in losses.items():
            self._check_divergence(value, name)
        self.best_val_loss = min(self.best_val_loss, losses["val_loss"])
        self.history.append({"step": float(self.step_count), **losses})
        self.callback.on_metrics(losses, self.step_count)
        return losses

    def _result(
        self,
        status: Literal["finished", "diverged"],
        start: float,
        train_time: float,
        last_eval: dict[str, float] | None,
        reason: str | None,
        loop_end: float | None = None,  # when steps and evals ended (default: now)
    ) -> TrainResult:
        end = time.perf_counter()
        wall = end - start
        tokens = self.step_count * self.train_config.batch_size * self.train_config.block_size
        final = last_eval or (self.history[-1] if self.history else {})
        return TrainResult(
            status=status,
            step=self.step_count,
            best_val_loss=self.best_val_loss,
            final_val_loss=final.get("val_loss", math.nan),
            final_train_loss=final.get("train_loss", math.nan),
            wall_time_s=wall,
            tokens_per_sec=tokens / train_time if train_time > 0 else 0.0,
            num_params=self.model.num_params(),
            device=str(self.device),
            reason=reason,
            history=list(self.history),
            loop_time_s=(end if loop_end is None else loop_end) - start,
        )

    # -- end of run -------------------------------------------------------------------

    def _final_artifacts(self) -> None:
        tokenizer = self.corpus.tokenizer
        self.callback.on_artifact("sample.txt", self.sample(SAMPLE_CHARS))
        prompt_ids = self.corpus.val[: min(self.train_config.block_size, ATTENTION_PROMPT_CHARS)]
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
        tokenizer = self.corpus.tokenizer
        start_ids = tokenizer.encode(prompt if all(c in tokenizer.chars for c in prompt) else "")
        if not start_ids:
            start_ids = [0]
        idx = torch.tensor([start_ids], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.model.eval()
        out = self.model.generate(idx, max_new_tokens, temperature, generator=generator)
        self.model.train()
        return tokenizer.decode(out[0].tolist())

    # -- checkpoints ------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def save_checkpoint(self) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "best_val_loss": self.best_val_loss,
            "smoothed_loss": self.smoothed_loss,
            "history": self.history,
            "window": [self.window_loss, self.window_steps],
            "sampler_rng": self.sampler.state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)  # in memory: a full disk fails in write(), saying so
        write_atomically(path, buffer.getvalue())

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        # Model, two optimizer moments, RNG states and the eval history: a file many times that
        # size is not one this run wrote.
        state = load_checkpoint_file(path, max_bytes=64 * 4 * self.model.num_params() + (8 << 20))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step"]
        self.best_val_loss = state["best_val_loss"]
        self.smoothed_loss = state["smoothed_loss"]
        self.history = state["history"]
        self.window_loss, self.window_steps = state.get("window", [0.0, 0])
        self.sampler.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True


class CheckpointError(Exception):
    """A checkpoint file that is not one workbench wrote: refused, never executed."""


CHECKPOINT_KEYS = ("model", "optimizer", "step", "best_val_loss", "smoothed_loss", "history",
                   "sampler_rng", "torch_rng", "cuda_rng")  # fmt: skip


def load_checkpoint_file(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """Tensors and plain values only (``weights_only=True``): a pickle that would run code when
    loaded (dropped into a shared checkpoint folder, say) is refused with one line, and so is a
    file over ``max_bytes``.

    Onto the CPU: the RNG states must stay CPU byte tensors; the model and optimizer states are
    copied onto the device by their ``load_state_dict``.
    """
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"checkpoint {path} refused: {size:,} bytes, over {max_bytes:,}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} refused: it holds objects other than tensors and plain values "
            "(loading it could run code)"
        ) from None
    except (RuntimeError, ValueError, EOFError) as exc:
        raise CheckpointError(
            f"checkpoint {path} refused: unreadable ({first_line(exc, 200)})"
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"checkpoint {path} refused: not a workbench checkpoint")
    return state


def write_atomically(path: Path, data: bytes) -> None:
    """Write a new file beside ``path``, then rename it over: a crash mid-write never leaves a
    torn file, and a full disk leaves the previous file and no partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # write() names no file; the reason should
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _before_checkpoint(callback: Callback | NullCallback, step: int) -> None:
    hook = getattr(callback, "on_checkpoint", None)  # optional for simple callbacks
    if hook is not None:
        hook(step)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's CPU threads (for benchmarks that compare thread counts)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
