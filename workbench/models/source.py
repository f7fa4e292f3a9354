"""The digest of this package's source as the process loaded it (what a kept model archive is
keyed by, :mod:`workbench.models.export`). Imported with the package, so the files are read when
the modules are, not when a model is first saved: a checkout in the middle of a sweep does not
change what it describes."""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_digest() -> str:
    """A sha256 of every Python source file of :mod:`workbench.models`, with its name."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(f"{source.relative_to(package)}\0".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


SOURCE_DIGEST = source_digest()
