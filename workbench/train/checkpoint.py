"""A run's checkpoint: what it holds, written atomically, read back as plain data only.

A checkpoint holds everything needed to continue a run exactly: the model, the optimizer, the
loop's counters (:class:`LoopState`), the batch sampler's generator and torch's global RNG
states (dropout draws from them).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.corpus import BatchSampler
from workbench.errors import first_line
from workbench.train.optim import FlatAdamW

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"  # a pack member's checkpoint before its last one

CHECKPOINT_KEYS = ("model", "optimizer", "step", "best_val_loss", "smoothed_loss", "history",
                   "sampler_rng", "torch_rng", "cuda_rng")  # fmt: skip


class CheckpointError(Exception):
    """A checkpoint file that is not one workbench wrote: refused, never executed."""


@dataclass
class LoopState:
    """Where the training loop stands, besides the model, the optimizer and the RNGs."""

    step: int = 0
    best_val_loss: float = math.inf
    smoothed_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # eval points
    # The losses and the count of the steps since the last progress point: a checkpoint
    # between two progress points must not shorten the next mean.
    window_loss: float = 0.0
    window_steps: int = 0


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: FlatAdamW,
    sampler: BatchSampler,
    loop: LoopState,
    keep_previous: bool = False,
) -> None:
    """Write the run's checkpoint at ``path``; with ``keep_previous``, the one it replaces is
    kept beside it (``PREVIOUS_NAME``) first, so that a crash at any moment leaves both files
    whole: the new one and its predecessor, or the old one and its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": loop.step,
        "best_val_loss": loop.best_val_loss,
        "smoothed_loss": loop.smoothed_loss,
        "history": loop.history,
        "window": [loop.window_loss, loop.window_steps],
        "sampler_rng": sampler.state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory: a full disk fails in write(), saying so
    if keep_previous and path.exists():
        link = path.with_name(f".{PREVIOUS_NAME}.link")
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.link(path, link)  # the same file under a second name, then renamed into place
        os.replace(link, path.with_name(PREVIOUS_NAME))
    write_atomically(path, buffer.getvalue())


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: FlatAdamW, sampler: BatchSampler
) -> LoopState:
    """Restore the model, the optimizer, the sampler and torch's global RNG states from
    ``path``; returns the loop's counters."""
    # Model, two optimizer moments, RNG states and the eval history: a file many times that
    # size is not one this run wrote.
    num_params = sum(p.numel() for p in model.parameters())
    state = load_checkpoint_file(path, max_bytes=64 * 4 * num_params + (8 << 20))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.set_state(state["sampler_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    window_loss, window_steps = state.get("window", [0.0, 0])
    return LoopState(
        step=state["step"],
        best_val_loss=state["best_val_loss"],
        smoothed_loss=state["smoothed_loss"],
        history=state["history"],
        window_loss=window_loss,
        window_steps=window_steps,
    )


def load_checkpoint_file(
    path: Path, max_bytes: int | None = None, mmap: bool = False
) -> dict[str, Any]:
    """Tensors and plain values only (``weights_only=True``): a pickle that would run code when
    loaded (dropped into a shared checkpoint folder, say) is refused with one line, and so is a
    file over ``max_bytes``. ``mmap``: tensors mapped from the file, not read (to read the
    counters of a file of any size).

    Onto the CPU: the RNG states must stay CPU byte tensors; the model and optimizer states are
    copied onto the device by their ``load_state_dict``.
    """
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"checkpoint {path} refused: {size:,} bytes, over {max_bytes:,}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} refused: it holds objects other than tensors and plain values "
            "(loading it could run code)"
        ) from None
    except (RuntimeError, ValueError, EOFError, OSError) as exc:  # OSError: mapping a cut file
        raise CheckpointError(
            f"checkpoint {path} refused: unreadable ({type(exc).__name__}: {first_line(exc, 200)})"
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
