"""Time one whole ``workbench run`` command in a fresh SQLite store, and unpack another commit's
package to run beside this tree's (shared by benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
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


def unpack(revision: str, into: Path) -> Path:
    """``revision``'s ``workbench`` package, unpacked under ``into`` (put it on PYTHONPATH)."""
    root = Path(__file__).resolve().parents[1]
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", revision, "workbench"], cwd=root, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into
