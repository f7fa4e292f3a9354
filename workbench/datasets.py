"""Where the text comes from: known data sets (downloaded once, checked, cached) or a local file.

No torch here: the CLI's ``plan`` needs checksums without paying for the tensor imports.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import DataError


@dataclass(frozen=True)
class KnownDataset:
    name: str
    url: str
    sha256: str
    filename: str
    vocab_size: int


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "tinyshakespeare": KnownDataset(
        name="tinyshakespeare",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        vocab_size=65,
    ),
}

DEFAULT_DATASET = "tinyshakespeare"

ProgressFn = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) while downloading."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_known(
    name: str,
    data_dir: Path,
    *,
    url: str | None = None,
    progress: ProgressFn | None = None,
    timeout_s: float = 30.0,
) -> Path:
    """The cached file of a known data set, downloading and checking it the first time.

    A cached file whose checksum does not match is an error, never silently used.
    """
    known = KNOWN_DATASETS[name]
    target = data_dir / known.filename
    if target.exists():
        actual = sha256_file(target)
        if actual != known.sha256:
            raise DataError(
                f"{target}: sha256 {actual} does not match {name}'s {known.sha256}; "
                "delete the file to download it again"
            )
        return target
    source = url or known.url
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        _download(source, target, known.sha256, progress, timeout_s)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"cannot download {name} from {source} ({reason}); offline, put the file at "
            f"{target} or set WORKBENCH_DATA_DIR to a folder holding {known.filename}"
        ) from None
    return target


def _download(
    url: str, target: Path, sha256: str, progress: ProgressFn | None, timeout_s: float
) -> None:
    digest = hashlib.sha256()
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            total = resp.headers.get("Content-Length")
            total_bytes = int(total) if total else None
            done = 0
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total_bytes)
        if digest.hexdigest() != sha256:
            raise DataError(
                f"downloaded {url} has sha256 {digest.hexdigest()}, expected {sha256}; not using it"
            )
        os.replace(partial, target)  # atomic: a crash never leaves a half file in the cache
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def data_checksum(dataset: str | None, path: str | None) -> str:
    """The sha256 that identifies a run's data, without downloading anything."""
    if dataset is not None:
        return KNOWN_DATASETS[dataset].sha256
    assert path is not None
    return sha256_file(Path(path))


def resolve_text_path(
    dataset: str | None, path: str | None, data_dir: Path, progress: ProgressFn | None = None
) -> Path:
    """The local file holding the text (downloading a known data set if needed)."""
    if dataset is not None:
        return fetch_known(dataset, data_dir, progress=progress)
    assert path is not None
    return Path(path)


def vocab_size(dataset: str | None, path: str | None) -> int:
    """Distinct characters of the data, without downloading a known data set."""
    if dataset is not None:
        return KNOWN_DATASETS[dataset].vocab_size
    assert path is not None
    return len(set(Path(path).read_text(encoding="utf-8")))
