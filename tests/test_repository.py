"""The repository stands on its own: no tracked file points at documents outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Notes that lived beside the repository while it was written; what the code relies on from them
# is in docs/. The shared data folder (../shared/data, WORKBENCH_DATA_DIR in CI) is the one
# outside path the tests and CI may name.
OUTSIDE = re.compile(
    r"LECTURE\.md|MLFLOW-NOTES|EXECUTOR-NOTES|STYLE\.md|LAYOUT\.md|shared/(?!data)"
)


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_refers_to_a_file_outside_the_repository() -> None:
    found = []
    for path in tracked_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_the_docs_the_code_cites_exist() -> None:
    for name in ("docs/lecture.md", "docs/mlflow-notes.md"):
        assert (REPO / name).is_file(), name


def test_the_pattern_finds_what_it_should() -> None:
    for bad in ("see LECTURE.md", "MLFLOW-NOTES.md", "/shared/checkpoints", "shared/STYLE.md"):
        assert OUTSIDE.search(bad), bad
    for good in ("../shared/data", "docs/lecture.md", "docs/mlflow-notes.md"):
        assert not OUTSIDE.search(good), good


def test_what_users_read_names_no_team_folder() -> None:
    """The README and docs/ are for users, who have no ../shared: not even its data folder."""
    readable = [
        p
        for p in tracked_files()
        if p.suffix == ".md" and (p.name == "README.md" or "docs" in p.parts)
    ]
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in readable
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "../shared" in line
    ]
    assert not found, found
