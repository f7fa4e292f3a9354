"""The one place that reads the environment (``WORKBENCH_*`` and ``MLFLOW_TRACKING_URI``)."""

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


def load_settings() -> Settings:
    data_dir = os.environ.get("WORKBENCH_DATA_DIR")
    return Settings(
        data_dir=Path(data_dir).expanduser() if data_dir else _default_cache_dir() / "data",
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
    )
