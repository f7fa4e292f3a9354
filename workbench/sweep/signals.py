"""SIGINT and SIGTERM held back, ignored or redirected for a moment (the main thread's
handlers; elsewhere no-ops), and a worker's exit code in words."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM held back for a moment, then handled as they would have been (main
    thread only; elsewhere a no-op). The handler is swapped, not the signal mask blocked: a
    mask holds the signal back from this thread only, not from the others."""
    caught: list[int] = []
    with _signals_handled_by(lambda signum, frame: caught.append(signum)) as saved:
        yield
    if not caught:
        return
    first = saved.get(caught[0])
    if callable(first):
        first(caught[0], None)
    elif first == signal.SIG_DFL:  # no handler of Python's: the signal's own default (exit)
        signal.raise_signal(caught[0])


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT/SIGTERM ignored for a moment (main thread only; elsewhere a no-op)."""
    with _signals_handled_by(signal.SIG_IGN):
        yield


@contextlib.contextmanager
def _signals_handled_by(handler: Any) -> Iterator[dict[int, Any]]:
    """SIGINT and SIGTERM go to ``handler`` for a moment; yields the handlers it replaced."""
    saved: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield saved
    finally:
        for number, previous in saved.items():
            signal.signal(number, previous)


def describe_exit(exitcode: int | None) -> str:
    """Why a worker process ended, in words."""
    if exitcode is None:
        return "worker process vanished"
    if exitcode < 0:
        try:
            return f"worker process killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"worker process killed by signal {-exitcode}"
    return f"worker process exited with code {exitcode}"
