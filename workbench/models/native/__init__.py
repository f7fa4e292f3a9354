"""Native CPU kernels, compiled on first use with the machine's C compiler.

One kernel so far: causal attention over short blocks (``tiny_attention.c``), the ``native``
backend of :mod:`workbench.models.attention`, for blocks of up to ``MAX_BLOCK`` positions on a
CPU. At 8 positions a head is a few hundred multiply-adds, so PyTorch's per-call cost, not
arithmetic, sets the speed: one C call replaces the ~20 PyTorch calls of the torch backend's
forward and backward (``benchmarks/bench_step.py``).

The library is built once per head size and machine into ``~/.cache/workbench/kernels`` (a file
named by a hash of the source, the compiler and the CPU, written atomically, so concurrent runs
share it), in about a second; it is loaded only while its content is what was built
(:mod:`workbench.cache`), and built again otherwise. :func:`load` raises
:class:`KernelUnavailable` saying why there is no kernel (no C compiler,
``WORKBENCH_NATIVE=0``, ...); :func:`tiny_attention`, what ``train.attention: auto`` asks,
returns ``None`` instead (warning where a build failed).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from workbench import cache
from workbench.errors import WorkbenchError
from workbench.settings import load_settings

SOURCE = Path(__file__).with_name("tiny_attention.c")
MAX_BLOCK = 32  # the C file's MAX_BLOCK: its scratch space
# Reassociation lets the dot products vectorize. Not -ffast-math: linking with it would flush
# denormals for the whole process (crtfastmath), and it would drop NaN checks.
FLAGS = ["-O3", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math"]  # fmt: skip
NATIVE = ["-march=native"]  # tried first; some compilers (older clang on arm64) refuse it


# The /proc/cpuinfo lines that say which instructions a CPU has: x86, then ARM.
CPUINFO_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture",
                "CPU variant", "CPU part")  # fmt: skip
MAX_HEAD = 1024  # the C code keeps four head-sized vectors on the stack


class KernelUnavailable(WorkbenchError):
    """No attention kernel here: turned off, a head too large, or no build."""


class KernelBuildError(KernelUnavailable):
    """The C compiler is missing or failed, or there is nowhere to cache the library."""


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for, so that a cache shared by different machines
    never hands one a library built for the other."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = {line for line in cpuinfo if line.startswith(CPUINFO_KEYS)}
        return platform.machine() + "".join(sorted(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()} {platform.mac_ver()[0]}"


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def build(head_size: int, kernel_dir: Path, compiler: list[str]) -> Path:
    """The shared library of the attention kernel for ``head_size``: from the cache, or
    compiled into it."""
    version = _run([*compiler, "--version"])
    if version.returncode != 0:
        raise KernelBuildError(f"{shlex.join(compiler)} --version failed: {version.stderr.strip()}")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            part if isinstance(part, bytes) else part.encode()
            for part in (source, version.stdout, _cpu_identity(), " ".join(FLAGS + NATIVE))
        )
    ).hexdigest()[:16]
    target = cache.checked_folder(kernel_dir) / f"tiny_attention_h{head_size}_{key}.so"
    if cache.verified(target):  # built here before, and unchanged since: else built again
        return target
    with tempfile.TemporaryDirectory(dir=kernel_dir) as scratch:
        obj, library = Path(scratch) / "kernel.o", Path(scratch) / "kernel.so"
        for arch in (NATIVE, []):
            compiled = _run(
                [*compiler, *FLAGS, *arch, f"-DHEAD={head_size}", "-c", str(SOURCE), "-o", str(obj)]
            )
            if compiled.returncode == 0:
                break
        else:
            raise KernelBuildError(
                f"{compiler[0]} could not compile {SOURCE.name}: {compiled.stderr}"
            )
        # Linked in a second step, without the math flags (see FLAGS).
        linked = _run([*compiler, "-shared", str(obj), "-o", str(library)])
        if linked.returncode != 0:
            raise KernelBuildError(f"{compiler[0]} could not link {SOURCE.name}: {linked.stderr}")
        os.replace(library, target)  # atomic: a concurrent build of the same file is harmless
        cache.record(target)
    return target


def _compiler(configured: str | None) -> list[str]:
    """The compiler command: ``CC`` as the shell would split it (``ccache gcc``), else the
    first of cc, gcc, clang on the PATH."""
    for command in [shlex.split(configured)] if configured else [["cc"], ["gcc"], ["clang"]]:
        found = shutil.which(command[0]) if command else None
        if found:
            return [found, *command[1:]]
    raise KernelBuildError(f"no C compiler found ({configured or 'cc, gcc, clang'})")


class TinyAttention:
    """Causal attention on qkv rows ``(B * T, 3 * n_head * head_size)`` → rows
    ``(B * T, n_head * head_size)``, through the compiled kernel for one head size."""

    def __init__(self, library: ctypes.CDLL, head_size: int) -> None:
        pointer, length, real = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
        self._forward = library.tiny_attention_forward
        self._forward.argtypes = [pointer, pointer, pointer, length, length, length, real]
        self._forward.restype = None
        self._backward = library.tiny_attention_backward
        self._backward.argtypes = [pointer, pointer, pointer, pointer, length, length, length, real]
        self._backward.restype = None
        self.head_size = head_size

    def __call__(self, qkv: torch.Tensor, n_head: int, block: int) -> torch.Tensor:
        if qkv.requires_grad and torch.is_grad_enabled():
            return _TinyAttentionFunction.apply(qkv, n_head, block, self)  # type: ignore[no-untyped-call]
        return self.forward(qkv, n_head, block, probs=None)

    def blocks(self, qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        """Causal attention on ``qkv`` (B, T, 3 * n_head * head_size) → (B, T, n_head *
        head_size): the same kernel, with no reshape for autograd to record."""
        B, T, width = qkv.shape
        if qkv.requires_grad and torch.is_grad_enabled():
            return _TinyAttentionFunction.apply(qkv, n_head, T, self)  # type: ignore[no-untyped-call]
        return self.forward(qkv.reshape(B * T, width), n_head, T, probs=None).view(B, T, -1)

    def batch_size(self, qkv: torch.Tensor, n_head: int, block: int) -> int:
        """The number of blocks in ``qkv``; raises on any layout the C code would read out of
        bounds."""
        _require_float32_rows(qkv, "qkv")
        rows, width = qkv.shape
        if width != 3 * n_head * self.head_size or not 0 < block <= MAX_BLOCK or rows % block:
            raise ValueError(
                f"qkv rows {tuple(qkv.shape)} do not fit {n_head} heads of {self.head_size} "
                f"over blocks of {block} (at most {MAX_BLOCK})"
            )
        return rows // block

    def forward(
        self, qkv: torch.Tensor, n_head: int, block: int, probs: torch.Tensor | None
    ) -> torch.Tensor:
        """Heads concatenated as rows; fills ``probs`` (B * n_head, T, T) if one is given."""
        batch = self.batch_size(qkv, n_head, block)
        if probs is not None:
            _require_shape(probs, (batch * n_head, block, block), "probs")
        out = qkv.new_empty(qkv.size(0), n_head * self.head_size)
        self._forward(
            qkv.data_ptr(),
            out.data_ptr(),
            None if probs is None else probs.data_ptr(),
            batch,
            block,
            n_head,
            self.head_size**-0.5,
        )
        return out

    def backward(
        self, qkv: torch.Tensor, probs: torch.Tensor, dout: torch.Tensor, n_head: int
    ) -> torch.Tensor:
        """The gradient of ``qkv``, given the forward's ``probs`` and the outputs' gradient."""
        block = probs.size(-1) if probs.dim() == 3 else 0
        batch = self.batch_size(qkv, n_head, block)
        _require_shape(probs, (batch * n_head, block, block), "probs")
        dout = dout.to(torch.float32).contiguous()
        _require_shape(dout, (qkv.size(0), n_head * self.head_size), "dout")
        dqkv = torch.empty_like(qkv)
        self._backward(
            qkv.data_ptr(),
            probs.data_ptr(),
            dout.data_ptr(),
            dqkv.data_ptr(),
            batch,
            block,
            n_head,
            self.head_size**-0.5,
        )
        return dqkv


def _require_float32_rows(tensor: torch.Tensor, name: str) -> None:
    if not (
        tensor.dim() == 2
        and tensor.dtype == torch.float32
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
    ):
        raise ValueError(
            f"the attention kernel takes {name} as contiguous float32 CPU rows, not "
            f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        )


def _require_shape(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if not (
        tensor.shape == shape
        and tensor.dtype == torch.float32
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
    ):
        raise ValueError(
            f"the attention kernel needs {name} as contiguous float32 {shape} on the CPU, not "
            f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        )


class _TinyAttentionFunction(torch.autograd.Function):
    """The kernel under autograd; ``qkv`` as rows (B * T, W) or as blocks (B, T, W)."""

    @staticmethod
    def forward(
        ctx: Any, qkv: torch.Tensor, n_head: int, block: int, kernel: TinyAttention
    ) -> torch.Tensor:
        rows = qkv if qkv.dim() == 2 else qkv.reshape(-1, qkv.size(-1))
        batch = kernel.batch_size(rows, n_head, block)  # checked before anything is allocated
        probs = rows.new_empty(batch * n_head, block, block)
        out = kernel.forward(rows, n_head, block, probs)
        ctx.save_for_backward(rows, probs)
        ctx.n_head, ctx.kernel, ctx.shape = n_head, kernel, qkv.shape
        return out if qkv.dim() == 2 else out.view(*qkv.shape[:-1], out.size(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, probs = ctx.saved_tensors
        dout = dout if dout.dim() == 2 else dout.reshape(-1, dout.size(-1))
        dqkv = ctx.kernel.backward(rows, probs, dout, ctx.n_head)
        return dqkv.view(ctx.shape), None, None, None


def load(head_size: int) -> TinyAttention:
    """The attention kernel for ``head_size``, from the cache or built; raises
    :class:`KernelUnavailable` saying why there is none."""
    settings = load_settings()
    if not settings.native_kernels:
        raise KernelUnavailable("WORKBENCH_NATIVE=0 turns native kernels off")
    if head_size > MAX_HEAD:
        raise KernelUnavailable(f"heads of {head_size} are over the kernel's {MAX_HEAD}")
    if settings.kernel_dir is None:
        raise KernelBuildError("no cache directory (no home directory, and no XDG_CACHE_HOME)")
    try:
        compiler = _compiler(settings.c_compiler)
        path = build(head_size, settings.kernel_dir, compiler)
        try:
            return TinyAttention(ctypes.CDLL(str(path)), head_size)
        except (OSError, AttributeError):  # a library that does not load: built again, once
            cache.discard(path)
            path = build(head_size, settings.kernel_dir, compiler)
            return TinyAttention(ctypes.CDLL(str(path)), head_size)
    except (OSError, AttributeError, subprocess.SubprocessError, cache.CacheRefused) as error:
        raise KernelBuildError(str(error)) from error


@functools.cache
def tiny_attention(head_size: int) -> TinyAttention | None:
    """The attention kernel for ``head_size``, built on first use; ``None`` (after one warning)
    where it cannot be built, and quietly for heads over ``MAX_HEAD`` or where
    ``WORKBENCH_NATIVE=0`` turns native kernels off."""
    settings = load_settings()
    if not settings.native_kernels or head_size > MAX_HEAD:
        return None
    try:
        return load(head_size)
    except KernelBuildError as error:
        warnings.warn(
            f"workbench: no native attention kernel ({error}); using PyTorch ops, which are "
            "slower on a CPU. Install a C compiler, or set WORKBENCH_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
