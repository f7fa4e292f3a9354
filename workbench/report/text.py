"""Small text formats of the report's tables: steps, durations, plurals."""

from __future__ import annotations


def step(stopped: float, last: float) -> str:
    for value in (stopped, last):
        if value == value and value is not None:
            return str(int(value))
    return "—"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration(seconds: float) -> str:
    if seconds != seconds:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
