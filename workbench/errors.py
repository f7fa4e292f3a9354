"""The few exception types that reach the user; the CLI prints them as one line each."""

from __future__ import annotations


class WorkbenchError(Exception):
    """A problem the user can fix; printed without a traceback, exit code 2."""

    def lines(self) -> list[str]:
        return [str(self)]


class SpecError(WorkbenchError):
    """One or more problems in a spec file or in --set/--only; every problem is one line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(dict.fromkeys(problems))  # keep order, drop repeats
        super().__init__("\n".join(self.problems))

    def lines(self) -> list[str]:
        return self.problems


class DataError(WorkbenchError):
    """The data set is missing, unreachable or corrupt."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one bounded line (its type where it says nothing)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
