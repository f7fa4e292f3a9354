"""What a training job sets for its whole process, once, where it starts: the device, torch's
CPU threads and TF32 matmuls. Nothing else in ``workbench.train`` changes process-wide state,
except the factory's seeding of torch's global generator right before it builds a model (see
:func:`workbench.train.factory.build_trainer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from workbench.spec import TrainConfig


class DeviceUnavailable(RuntimeError):
    """A device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; a device named that this machine lacks
    raises :class:`DeviceUnavailable`."""
    if name != "auto":
        device = torch.device(name)
        if (device.type == "cuda" and not torch.cuda.is_available()) or (
            device.type == "mps" and not torch.backends.mps.is_available()
        ):
            raise DeviceUnavailable(f"no {device.type} device on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_process(train: TrainConfig) -> torch.device:
    """Resolve the run's device and set up the process for it: ``train.threads`` CPU threads
    (on any device: a GPU run's host work uses them too; unset, torch's default), TF32 matmuls
    (on CUDA). Returns the device."""
    device = resolve_device(train.device)
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


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
