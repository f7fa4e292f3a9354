"""Shared fixtures. Tests never reach the network: the data set comes from WORKBENCH_DATA_DIR
(CI sets it to ../shared/data; a checkout beside that folder finds it there too)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One torch thread per test process and per worker it spawns: tests train tiny models, where
# threads only contend (the 2-core CI machine runs them faster this way). Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite's own cache folder: compiled kernels, store templates and model archives land in a
# temporary folder of this test session, never in the user's ~/.cache (tests of the caches
# themselves point XDG_CACHE_HOME at their own tmp_path). Set before anything reads it; spawned
# workers and subprocesses inherit it.
_CACHE = Path(tempfile.mkdtemp(prefix="workbench-tests-cache-"))
os.environ["XDG_CACHE_HOME"] = str(_CACHE)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# The tests' `mlflow server`s track runs only: MLflow's job runner (its GenAI jobs; nine more
# processes, each importing mlflow) is left off, which makes a server healthy in about 8 s
# instead of 12-15 s on the 2-core CI machine.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

REPO = Path(__file__).resolve().parents[1]
_SHARED_DATA = REPO.parent / "shared" / "data"
if "WORKBENCH_DATA_DIR" not in os.environ and (_SHARED_DATA / "tinyshakespeare.txt").exists():
    os.environ["WORKBENCH_DATA_DIR"] = str(_SHARED_DATA)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    from workbench.datasets import fetch_known
    from workbench.settings import load_settings

    # fetch_known verifies the checksum of the cached copy and never downloads when it is there.
    return fetch_known("tinyshakespeare", load_settings().data_dir, url="http://127.0.0.1:9/")


@pytest.fixture(scope="session")
def shakespeare(shakespeare_path: Path):  # type: ignore[no-untyped-def]
    from workbench.corpus import Corpus

    return Corpus.from_file(shakespeare_path)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A real SQLite store in the test's folder, which is also the working folder (MLflow puts
    artifacts under it)."""
    from runs import Store

    monkeypatch.chdir(tmp_path)
    return Store(tmp_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``WORKBENCH_PUBLIC_APIS=1`` runs the suite on workbench.compat's public routes: a test of
    a private route itself (marked ``private_api``) has nothing to test then."""
    from workbench import compat

    if not compat.public_only():
        return
    skip = pytest.mark.skip(reason="WORKBENCH_PUBLIC_APIS=1: the private route is off")
    for item in items:
        if "private_api" in item.keywords:
            item.add_marker(skip)
