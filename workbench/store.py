"""The MLflow tracking store: which one, opened and checked before MLflow touches it, and the
experiment a sweep records into.

mlflow is imported inside functions so that importing this module costs nothing. Facts this
rests on (measured, see docs/mlflow-notes.md): a fresh SQLite store must be created before any
worker touches it; experiments are created by the driver, never by workers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from workbench import cache
from workbench.errors import WorkbenchError, first_line

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(explicit: str | None, from_env: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own default."""
    return explicit or from_env or DEFAULT_TRACKING_URI


_OPENED: set[str] = set()  # stores this process has checked (and created) already


def client(uri: str) -> MlflowClient:
    """An MLflow client; the first one of a process for ``uri`` checks the store first (see
    :func:`open_store`)."""
    from mlflow.tracking import MlflowClient

    if uri not in _OPENED:
        open_store(uri)
        _OPENED.add(uri)
    return MlflowClient(tracking_uri=uri)


def store_error_types() -> tuple[type[BaseException], ...]:
    """What the store raises when it is unreachable, locked, full or broken."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, RequestException, SQLAlchemyError, sqlite3.Error, OSError)


@contextlib.contextmanager
def store_errors(uri: str, os_errors: bool = True) -> Iterator[None]:
    """A store that cannot be reached or read is one line for the user, not a traceback
    (``os_errors=False`` where an OSError would be about something else, a report's file)."""
    types = store_error_types()
    if not os_errors:
        types = tuple(t for t in types if t is not OSError)
    try:
        yield
    except types as exc:
        raise WorkbenchError(f"tracking store {uri}: {first_line(exc)}") from None


def open_store(uri: str) -> None:
    """Check a store before MLflow touches it, failing in seconds with one line.

    SQLite: the folder is made if missing; the file, if there is one, must be a complete MLflow
    database; the first process to open a new file creates and migrates it while holding
    ``<file>.lock``, so commands started at once on a fresh folder never race MLflow's schema
    setup (which otherwise leaves a half-made database behind). A server: it must answer within
    seconds, not after MLflow's minutes of retries.
    """
    database = sqlite_path(uri)
    if database is not None:
        _open_sqlite(uri, database)
    elif uri.startswith(("http://", "https://")):
        _probe_server(uri)


STORE_LOCK_TIMEOUT_S = 300.0  # a first migration takes ~6 s; a held lock longer is a stuck one
SERVER_PROBE_TIMEOUT_S = 5.0


def _open_sqlite(uri: str, database: Path) -> None:
    from filelock import FileLock, Timeout

    folder = database.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)  # as MLflow itself does
    except OSError as exc:
        raise WorkbenchError(
            f"tracking store {uri}: cannot create a store in {folder} ({first_line(exc)})"
        ) from None
    lock = FileLock(f"{database}.lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise WorkbenchError(
            f"tracking store {uri}: another process has held {lock.lock_file} for "
            f"{STORE_LOCK_TIMEOUT_S:.0f} s (a stuck first setup of the store?)"
        ) from None
    except OSError as exc:
        if not database.exists():
            raise WorkbenchError(
                f"tracking store {uri}: cannot create a store in {folder} ({first_line(exc)})"
            ) from None
        _check_sqlite(uri, database)  # a read-only folder: reading a store needs no lock
        return
    try:
        _check_sqlite(uri, database)
        if not database.exists() or database.stat().st_size == 0:
            _copy_template(database)
        with store_errors(uri):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri)._tracking_client.store  # noqa: B018  (creates it)
    finally:
        lock.release()


def _copy_template(database: Path) -> None:
    """A new store as a copy of an empty one that this MLflow version made earlier (its
    migrations take seconds; a copy, milliseconds). The template has no experiment, so MLflow
    adds its Default experiment, with its artifact location, when it opens the copy. Without a
    template (no cache folder, a read-only one), MLflow creates the store itself."""
    template = _store_template()
    if template is None:
        return
    partial = database.with_name(f".{database.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(template, partial)
        if not cache.is_copy_of(partial, template):  # swapped since it was checked
            return
        # A link, not a rename: it never replaces a file that another program (``mlflow ui``,
        # a client) created meanwhile without our lock; then MLflow opens that one instead.
        os.link(partial, database)
    except OSError:
        pass  # MLflow creates the store itself, or opens the one that appeared
    finally:
        partial.unlink(missing_ok=True)


def _store_template() -> Path | None:
    """``<cache>/stores/mlflow-<version>.db``, made by MLflow's own migrations on first use."""
    import mlflow
    from filelock import FileLock

    from workbench.settings import load_settings

    folder = load_settings().store_template_dir
    if folder is None:
        return None
    version = re.sub(r"[^0-9A-Za-z.+]", "_", mlflow.__version__)
    template = folder / f"mlflow-{version}.db"
    try:
        cache.checked_folder(folder)
        with FileLock(f"{template}.lock", timeout=STORE_LOCK_TIMEOUT_S):
            if cache.verified(template) and _is_empty_store(template):
                return template
            _make_template(template)
            return template if cache.verified(template) and _is_empty_store(template) else None
    except Exception:  # any failure here: MLflow creates the store itself, and says why not
        return None


def _make_template(template: Path) -> None:
    from mlflow.tracking import MlflowClient

    # A name never used before: MLflow keeps each store it opened, by its URI, for the process.
    partial = template.with_name(f".{template.name}.{uuid.uuid4().hex}.partial")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{partial}")._tracking_client.store  # noqa: B018
        with contextlib.closing(sqlite3.connect(partial)) as connection, connection:
            connection.execute("DELETE FROM experiments")  # Default: its location is per store
        os.replace(partial, template)
        cache.record(template)  # its content: a template changed since is made again
    finally:
        partial.unlink(missing_ok=True)


def _read_only(database: Path) -> contextlib.closing[sqlite3.Connection]:
    uri = f"file:{quote(str(database))}?mode=ro"
    return contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30))


def _tables(connection: sqlite3.Connection) -> set[str]:
    return {
        row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }


def _is_empty_store(path: Path) -> bool:
    """A complete MLflow database holding nothing but its schema version and the default
    workspace (a template is never trusted further than that: a store copied from it holds
    nothing of its own)."""
    if not path.is_file():
        return False
    try:
        with _read_only(path) as connection:
            tables = _tables(connection)
            if not {"alembic_version", "experiments", "runs"} <= tables or any(
                t.startswith(("_alembic_tmp_", "sqlite_")) and t != "sqlite_sequence"
                for t in tables
            ):
                return False
            for table in tables - {"alembic_version", "sqlite_sequence"}:
                quoted = '"' + table.replace('"', '""') + '"'
                if table == "workspaces":
                    names = connection.execute(f"SELECT name FROM {quoted}").fetchall()
                    if names not in ([], [("default",)]):
                        return False
                elif connection.execute(f"SELECT 1 FROM {quoted} LIMIT 1").fetchone():
                    return False
            return True
    except sqlite3.Error:
        return False


def _check_sqlite(uri: str, database: Path) -> None:
    """Refuse a file that is not an MLflow database, or one whose setup was cut short.

    A file still being set up by another program (``mlflow ui``, a client, which take no lock
    of ours) looks half-made for the seconds its migrations take: while it keeps changing, wait
    for it rather than refuse it.
    """
    deadline = time.monotonic() + SETUP_WAIT_S
    while (problem := _sqlite_problem(uri, database)) is not None:
        recent = time.time() - database.stat().st_mtime < SETUP_WAIT_S
        if not recent or time.monotonic() > deadline:
            raise WorkbenchError(problem)
        time.sleep(0.25)


SETUP_WAIT_S = 30.0  # an MLflow store's first migrations take seconds, not half a minute


def _sqlite_problem(uri: str, database: Path) -> str | None:
    if not database.exists() or database.stat().st_size == 0:
        return None  # MLflow creates it
    try:
        with _read_only(database) as connection:
            tables = _tables(connection)
    except sqlite3.Error as exc:
        return (
            f"tracking store {uri}: {database} is not a readable SQLite database "
            f"({first_line(exc)})"
        )
    half_made = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if half_made or (tables and "alembic_version" not in tables):
        what = f"leftover table {half_made[0]}" if half_made else "no alembic_version table"
        return (
            f"tracking store {uri}: {database} is a half-made or foreign MLflow database "
            f"({what}; its setup was probably interrupted): move it away and run again"
        )
    return None


def _tls_verify() -> bool | str:
    """MLflow's own TLS settings, so the probe reaches whatever MLflow reaches."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def _probe_server(uri: str) -> None:
    """Any HTTP answer will do; no answer within seconds is one line, not minutes of retries."""
    import requests

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name"
    try:
        requests.get(
            url,
            params={"experiment_name": "Default"},
            timeout=SERVER_PROBE_TIMEOUT_S,
            verify=_tls_verify(),
        )
    except requests.RequestException as exc:
        raise WorkbenchError(f"tracking store {uri}: unreachable ({first_line(exc)})") from None


def ensure_experiment(uri: str, name: str) -> str:
    """Create (and migrate) the store and the experiment, once, before any worker starts."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    database = sqlite_path(uri)
    if database is not None and not (
        os.access(database, os.W_OK) and os.access(database.parent, os.W_OK)
    ):  # SQLite writes a journal beside the file
        raise WorkbenchError(f"tracking store {uri}: read-only: runs cannot be recorded there")
    with store_errors(uri):
        for _ in range(2):  # a second try: another process created it in between
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    mlflow_client.restore_experiment(experiment.experiment_id)
                return str(experiment.experiment_id)
            try:
                return str(mlflow_client.create_experiment(name))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise WorkbenchError(f"tracking store {uri}: experiment {name!r} could not be created")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI (None for other stores, or in memory)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except ArgumentError:
        raise WorkbenchError(f"tracking store {uri}: not a valid sqlite URI") from None
    if not database or database == ":memory:":
        return None
    return Path(database)
