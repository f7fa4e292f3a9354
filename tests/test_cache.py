"""The cache folder is an input: an entry is used only while its content is what workbench
recorded when it wrote it, and a folder others can write to is refused (``workbench.cache``;
kernels, store templates and model archives each test their own entries)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from runs import invoke
from specs import write_spec

from workbench import cache


def test_an_entry_is_verified_only_while_it_holds_what_was_recorded(tmp_path: Path) -> None:
    entry = tmp_path / "entry.bin"
    entry.write_bytes(b"what workbench wrote")
    assert not cache.verified(entry)  # no record: not ours
    cache.record(entry)
    assert cache.verified(entry)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(entry.read_bytes())
    assert cache.is_copy_of(copy, entry)
    entry.write_bytes(b"what someone else wrote")
    assert not cache.verified(entry) and not cache.is_copy_of(entry, copy)
    cache.discard(entry)
    assert not entry.exists() and not cache.verified(entry)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_cache_folder_others_can_write_to_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    """As ssh refuses a key folder others can write to: `workbench run` stops before it reads
    anything from the cache, with one line and exit code 2, and writes nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cache" / "workbench" / "kernels"
    folder.mkdir(parents=True)
    os.chmod(folder, mode)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    result = invoke("run", str(write_spec(tmp_path)), "--tracking-uri", store)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"cache folder {folder} refused: other users can write to it"), line
    assert f"chmod go-w {folder}" in line
    assert not (tmp_path / "m.db").exists()
    with pytest.raises(cache.CacheRefused):
        cache.checked_folder(folder)
    os.chmod(folder, 0o755)
    cache.check_folders(tmp_path / "cache" / "workbench")  # its owner's alone: used
