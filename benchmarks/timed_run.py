"""Time one whole ``workbench run`` command in a fresh SQLite store (shared by benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(spec: Path, *flags: str) -> float:
    """Wall seconds of ``workbench run SPEC FLAGS`` in a new folder with a new store."""
    folder = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "workbench", "run", str(spec), *flags, "--no-progress",
         "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--checkpoint-dir", str(folder / "checkpoints")],
        cwd=folder, check=True, capture_output=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    return time.perf_counter() - start
