"""What workbench keeps in its cache folder (``$XDG_CACHE_HOME/workbench``, else
``~/.cache/workbench``) is an input like any other, trusted no further than this:

- an entry is used only while its content is what workbench wrote: its sha256, recorded beside
  it (``<entry>.sha256``) when written, must match. Anything else (a file replaced, cut short or
  planted without its record) is made again, never used: a compiled kernel is never loaded, a
  store template never copied, a traced archive never read.
- a cache folder that another user owns, or that others can write to, is refused, as ssh refuses
  a key folder others can write to: whoever can write there could plant what workbench loads.

Kernels, store templates and traced model archives follow these rules; so must any cache that
comes later (tokenizers, say).
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from pathlib import Path

from workbench.datasets import sha256_file
from workbench.errors import WorkbenchError

DIGEST_SUFFIX = ".sha256"


class CacheRefused(WorkbenchError):
    """A cache folder others could write to."""


def checked_folder(folder: Path) -> Path:
    """``folder`` (a kind of entry under the cache folder, ``<cache>/kernels``), made where
    missing (only its owner may write it), then checked with the cache folder above it: owned
    by this user, writable by no one else. Raises :class:`CacheRefused` saying which."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (folder.parent, folder):
        _check(path)
    return folder


def check_folders(root: Path | None) -> None:
    """The cache folder and each folder in it, where they exist, checked as
    :func:`checked_folder` checks them: what ``workbench run`` does before anything else, so
    that a cache others can write to stops it in one line."""
    if root is None or not root.is_dir():
        return
    for path in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        _check(path)


def _check(path: Path) -> None:
    mode = path.stat()
    owner = getattr(os, "getuid", None)  # None on Windows: no owner to compare
    if owner is not None and mode.st_uid != owner():
        raise CacheRefused(f"cache folder {path} refused: another user owns it")
    if mode.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheRefused(
            f"cache folder {path} refused: other users can write to it "
            f"(mode {stat.filemode(mode.st_mode)}; chmod go-w {path})"
        )


def _record_path(entry: Path) -> Path:
    return entry.with_name(entry.name + DIGEST_SUFFIX)


def record(entry: Path) -> None:
    """Note ``entry``'s content as workbench's own (written atomically beside it)."""
    partial = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.partial")
    try:
        partial.write_text(sha256_file(entry) + "\n")
        os.replace(partial, _record_path(entry))
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def verified(entry: Path) -> bool:
    """Whether ``entry`` is a file whose content is what workbench recorded for it."""
    try:
        return _record_path(entry).read_text().strip() == sha256_file(entry)
    except OSError:
        return False


def is_copy_of(copy: Path, entry: Path) -> bool:
    """Whether ``copy`` holds what workbench recorded for ``entry`` (checked on the copy, so
    that an entry swapped between a check and its copy is never used)."""
    try:
        return _record_path(entry).read_text().strip() == sha256_file(copy)
    except OSError:
        return False


def discard(entry: Path) -> None:
    """Remove ``entry`` and its record (either may be missing)."""
    for path in (entry, _record_path(entry)):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
