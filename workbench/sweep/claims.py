"""Which process trains which run: one lock file per run key, held for a whole sweep.

Two ``workbench run`` of one spec at once must never train a run twice, nor write and delete
the same checkpoint folder. MLflow has no atomic compare-and-set, so the claim is an OS file lock
(``flock``) on ``<checkpoint folder>/<experiment>/<key>.lock``: the kernel releases it when its
process dies, however it dies, so a crash never leaves a run claimed. Runs are claimed *before*
the store is read, so whatever another process finished before it let go is seen as done.

A sweep's parent run is found or created, and ended, by one process at a time: the same kind of
lock on ``plan-<plan id>.lock`` (:meth:`Claims.holding`), held for those moments only, so two
``workbench run`` of one plan share one parent and each can end it.

The locks only reach as far as the folder is shared: one machine, or a cluster whose nodes
share ``--checkpoint-dir``, as the README's cluster recipe has it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from workbench.errors import WorkbenchError

HOLD_TIMEOUT_S = 120.0  # what holding() waits for; held for a few store calls, never longer


class Claims:
    """The run keys this process holds."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.held: dict[str, FileLock] = {}
        _raise_open_file_limit()  # each held claim keeps a file open

    def claim(self, key: str) -> bool:
        """Take ``key`` unless another process holds it (never waits)."""
        if key in self.held:
            return True
        lock = FileLock(self.folder / f"{key}.lock", timeout=0, thread_local=False)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            return False
        except OSError as exc:
            raise WorkbenchError(f"--checkpoint-dir {self.folder.parent}: {exc}") from None
        self.held[key] = lock
        return True

    @contextlib.contextmanager
    def holding(self, name: str, timeout_s: float = HOLD_TIMEOUT_S) -> Iterator[None]:
        """``name`` held for the ``with`` block, waiting up to ``timeout_s`` while another
        process holds it (for the moments that a sweep finds or ends its parent run)."""
        lock = FileLock(self.folder / f"{name}.lock", timeout=timeout_s, thread_local=False)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise WorkbenchError(
                f"{lock.lock_file}: held by another process for {timeout_s:.0f} s"
            ) from None
        except OSError as exc:
            raise WorkbenchError(f"--checkpoint-dir {self.folder.parent}: {exc}") from None
        try:
            yield
        finally:
            lock.release()

    def release(self, key: str) -> None:
        lock = self.held.pop(key, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)


def _raise_open_file_limit() -> None:
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
