"""A process, identified across pid reuse and reboots: its pid and when it started (Linux's
/proc; the pid alone where the OS does not say). What a run records of the processes that train
it, and what tells a stale run from a live one (``tracking.RunRecord.is_stale``)."""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as ``<boot id>:<clock ticks after boot>`` (Linux's
    /proc), None where the OS does not say: with its pid, what identifies a process across pid
    reuse and reboots."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"  # the 22nd field, starttime (fields[0] is the 3rd)
    except (OSError, IndexError):
        return None


def process_tags(name: str) -> dict[str, str]:
    """This process as ``workbench.<name>`` (its pid) and ``workbench.<name>_start``."""
    pid = os.getpid()
    start = process_start(pid)
    tag = "workbench." + name
    return {tag: str(pid), **({f"{tag}_start": start} if start else {})}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaped (containers without an init) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
