"""Every private torch, MLflow or CPython API that workbench calls lives here, and nowhere else.

Each one is named below with why it is worth it, the versions it was checked on, and the public
route taken instead when it is missing, or when ``WORKBENCH_PUBLIC_APIS=1`` forces every public
route (the tests run once that way: ``.ci/run``). ``tests/test_contracts.py`` checks each private
call against what it stands for, so an upgrade that changes one fails there, by name.

Checked on torch 2.13.0 (CPU) and MLflow 3.17.2, CPython 3.11.

- ``torch._fused_adamw_``: one fused AdamW kernel over one flat buffer (a rung-2 training step
  0.49 ms against torch.optim.AdamW's 0.60 ms, ``benchmarks/bench_step.py``). Public route: the
  same update in element-wise ops (``FlatAdamW(fused=False)``).
- ``torch._C.PyTorchFileReader`` and ``PyTorchFileWriter``, ``torch._export.serde.schema``: a
  run's pt2 archive is its model shape's kept archive with the run's weights written in, so no
  ``torch.export`` per run (0.2-0.3 s) nor per process (about 1 s more). Public route: the shape
  traced once per process, the run's weights copied into the program's state dict, and
  ``torch.export.save``.
- ``mlflow.models.utils._save_example``, ``mlflow.utils.environment._process_pip_requirements``
  and ``_PythonEnv``: the model directory ``mlflow.pytorch.save_model`` writes, without its own
  trace of the model. Public route: ``mlflow.pytorch.save_model(serialization_format="pt2")``.
- ``atexit._run_exitfuncs``: the console script exits after atexit's handlers without the
  interpreter's teardown of MLflow, SQLAlchemy and pandas (about 0.4 s of a rerun). Public
  route: an ordinary exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workbench.settings import public_apis_only

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's exit must not import it
    import torch


def public_only() -> bool:
    """``WORKBENCH_PUBLIC_APIS=1``: every public route, whatever is installed."""
    return public_apis_only()


# --- torch ---------------------------------------------------------------------------------------


def fused_adamw(device: torch.device) -> Callable[..., Any] | None:
    """torch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``'s, called over one flat
    buffer), where ``device`` has it; None: take the element-wise update."""
    import torch

    kernel = getattr(torch, "_fused_adamw_", None)
    if kernel is None or public_only() or device.type not in ("cpu", "cuda"):
        return None
    return kernel


def archive_io() -> tuple[Callable[[str], Any], Callable[[str], Any]] | None:
    """torch's pt2 archive reader and writer classes (what ``torch.export.save`` and ``load``
    use), or None: the archive is written by ``torch.export.save`` itself."""
    import torch

    c_module = getattr(torch, "_C", None)
    reader = getattr(c_module, "PyTorchFileReader", None)
    writer = getattr(c_module, "PyTorchFileWriter", None)
    if reader is None or writer is None or public_only():
        return None
    return reader, writer


def archive_weight_schema() -> tuple[Any, Any]:
    """The values a pt2 archive's weights config uses for float32 and strided tensors (only
    called where :func:`archive_io` is not None)."""
    from torch._export.serde.schema import Layout, ScalarType

    return ScalarType.FLOAT, Layout.Strided


# --- MLflow --------------------------------------------------------------------------------------


def mlflow_model_helpers() -> tuple[Callable[..., Any], Callable[..., Any], Any] | None:
    """MLflow's ``_save_example``, ``_process_pip_requirements`` and ``_PythonEnv`` (what
    ``mlflow.pytorch.save_model`` writes a model directory with), or None: call
    ``mlflow.pytorch.save_model`` itself."""
    if public_only():
        return None
    try:
        from mlflow.models.utils import _save_example
        from mlflow.utils.environment import _process_pip_requirements, _PythonEnv
    except ImportError:
        return None
    return _save_example, _process_pip_requirements, _PythonEnv


# --- CPython -------------------------------------------------------------------------------------


def exit_without_teardown(code: int) -> None:
    """Run atexit's handlers, flush stdout and stderr, then end the process without the
    interpreter's teardown; with the public route, an ordinary ``SystemExit``."""
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None or public_only():
        raise SystemExit(code)
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)
