"""The one place that reads the environment (``WORKBENCH_*``, ``MLFLOW_TRACKING_URI``, ``CC``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

OFF = ("0", "false", "no", "off")


def _default_cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/workbench``, else ``~/.cache/workbench``; None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "workbench"
    try:
        return Path.home() / ".cache" / "workbench"
    except RuntimeError:  # no HOME and no passwd entry (a container with an arbitrary uid)
        return None


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    tracking_uri: str | None
    kernel_dir: Path | None  # compiled kernels (workbench.models.native); None: nowhere to cache
    native_kernels: bool  # WORKBENCH_NATIVE=0 keeps to PyTorch ops
    c_compiler: str | None  # CC; None: the first of cc, gcc, clang on the PATH
    store_template_dir: Path | None = None  # empty MLflow databases, one per MLflow version
    export_template_dir: Path | None = None  # traced model archives, one per model shape
    cache_dir: Path | None = None  # the folder of the three above (and of data, by default)


def public_apis_only() -> bool:
    """``WORKBENCH_PUBLIC_APIS=1``: no private API (``workbench.compat``). A function of its own:
    it needs no home or data folder, and the CLI asks it at every exit."""
    return os.environ.get("WORKBENCH_PUBLIC_APIS", "0").lower() not in OFF


def load_settings() -> Settings:
    data_dir = os.environ.get("WORKBENCH_DATA_DIR")
    cache_dir = _default_cache_dir()
    if data_dir:
        data = Path(data_dir).expanduser()
    elif cache_dir is not None:
        data = cache_dir / "data"
    else:
        raise RuntimeError("no home directory to cache data in: set WORKBENCH_DATA_DIR")
    return Settings(
        data_dir=data,
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
        kernel_dir=cache_dir / "kernels" if cache_dir else None,
        native_kernels=os.environ.get("WORKBENCH_NATIVE", "1").lower() not in OFF,
        c_compiler=os.environ.get("CC") or None,
        store_template_dir=cache_dir / "stores" if cache_dir else None,
        export_template_dir=cache_dir / "exports" if cache_dir else None,
        cache_dir=cache_dir,
    )
