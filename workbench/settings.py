"""The one place that reads the environment (``WORKBENCH_*``, ``MLFLOW_TRACKING_URI``, ``CC``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "workbench"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    tracking_uri: str | None
    kernel_dir: Path  # compiled CPU kernels (workbench.kernels)
    native_kernels: bool  # WORKBENCH_NATIVE=0 keeps to PyTorch ops
    c_compiler: str | None  # CC; None: the first of cc, gcc, clang on the PATH


OFF = ("0", "false", "no", "off")


def load_settings() -> Settings:
    data_dir = os.environ.get("WORKBENCH_DATA_DIR")
    cache_dir = _default_cache_dir()
    return Settings(
        data_dir=Path(data_dir).expanduser() if data_dir else cache_dir / "data",
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
        kernel_dir=cache_dir / "kernels",
        native_kernels=os.environ.get("WORKBENCH_NATIVE", "1").lower() not in OFF,
        c_compiler=os.environ.get("CC") or None,
    )
