"""Where a sweep's runs come from: the spec's git checkout, the user and the host, as MLflow's
own source tags (``mlflow ui``'s Source, Version and User columns) and workbench's."""

from __future__ import annotations

import getpass
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from workbench import __version__
from workbench.tracking import TAG


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``folder``, or (None, None)."""
    checkout = git_checkout(folder)
    return (None, None) if checkout is None else (checkout.commit, checkout.dirty)


@dataclass(frozen=True)
class GitCheckout:
    root: Path
    commit: str
    dirty: bool  # tracked files changed since the commit
    remote_url: str | None  # origin's (else the first remote's) URL, without credentials


def git_checkout(folder: Path) -> GitCheckout | None:
    """The git checkout holding ``folder``, or None (no checkout, or no git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit, root = git("rev-parse", "HEAD", "--show-toplevel").splitlines()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        remotes = git("remote").split()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    remote = "origin" if "origin" in remotes else (remotes[0] if remotes else None)
    try:
        url = _without_credentials(git("remote", "get-url", remote)) if remote else None
    except (OSError, subprocess.CalledProcessError):
        url = None
    return GitCheckout(Path(root), commit, dirty, url or None)


def _without_credentials(url: str) -> str:
    """``https://user:token@host/x.git`` → ``https://host/x.git``: a URL recorded in a store
    that others read must not carry a secret (``git@host:x.git`` has none)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def user() -> str:
    """Who runs this, as MLflow's own runs say it (``getpass.getuser``)."""
    try:
        return getpass.getuser()
    except (ImportError, KeyError, OSError):  # no name for this uid (some containers)
        return "unknown"


def source_tags(spec_path: Path) -> dict[str, str]:
    """MLflow's own source tags for the runs of a spec, which ``mlflow ui`` shows in its Source,
    Version and User columns, and workbench's ``git_dirty``.

    The source is the spec file and the commit is that of the git checkout the spec lives in:
    the user's experiment repository, which holds what the runs were asked to be. A spec outside
    any checkout names its absolute path and has no ``mlflow.source.git.*`` tags; the commit of
    workbench's own checkout (where it runs from one) is then ``workbench.git_commit``.
    """
    spec = spec_path.resolve()
    tags = {"mlflow.source.type": "LOCAL", "mlflow.user": user()}
    checkout = git_checkout(spec.parent)
    if checkout is not None and spec.is_relative_to(checkout.root.resolve()):
        tags["mlflow.source.name"] = spec.relative_to(checkout.root.resolve()).as_posix()
        tags["mlflow.source.git.commit"] = checkout.commit
        if checkout.remote_url is not None:
            tags["mlflow.source.git.repoURL"] = checkout.remote_url
    else:
        tags["mlflow.source.name"] = str(spec)
        checkout = git_checkout(Path(__file__).resolve().parent)
        if checkout is not None:
            tags[TAG + "git_commit"] = checkout.commit
    if checkout is not None:
        tags[TAG + "git_dirty"] = str(checkout.dirty).lower()
    return tags


def base_tags() -> dict[str, str]:
    return {TAG + "version": __version__, TAG + "host": socket.gethostname()}
