"""A new SQLite store is a copy of an empty one that this MLflow version made once (its
migrations take seconds; a copy, milliseconds), and the copy is indistinguishable from a store
MLflow made itself in that folder."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from workbench import store


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "workbench" / "stores" / f"mlflow-{mlflow.__version__}.db"


def rows(database: Path, query: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return connection.execute(query).fetchall()


def test_new_stores_are_copies_of_one_template_and_find_their_own_artifacts(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)  # MLflow's default artifact root is ./mlruns
        store.open_store(f"sqlite:///{folder / 'mlflow.db'}")
        (default,) = rows(folder / "mlflow.db", "SELECT name, artifact_location FROM experiments")
        assert default == ("Default", str(folder / "mlruns" / "0"))  # its own, not the template's
        client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        client.create_run(client.create_experiment(name))  # a store MLflow is happy with
    assert rows(cache, "SELECT count(*) FROM experiments") == [(0,)]  # left empty
    assert rows(cache, "SELECT count(*) FROM runs") == [(0,)]
    version = rows(tmp_path / "a" / "mlflow.db", "SELECT version_num FROM alembic_version")
    assert version == rows(cache, "SELECT version_num FROM alembic_version")


@pytest.mark.slow
def test_a_template_that_is_not_empty_is_never_copied(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store.open_store(f"sqlite:///{tmp_path / 'first.db'}")  # makes the template
    poisoned = MlflowClient(f"sqlite:///{cache}")  # someone's runs in the template
    poisoned.create_run(poisoned.create_experiment("planted"))
    store.open_store(f"sqlite:///{tmp_path / 'second.db'}")
    names = {row[0] for row in rows(tmp_path / "second.db", "SELECT name FROM experiments")}
    assert names == {"Default"}  # nothing planted came along
    assert rows(cache, "SELECT count(*) FROM runs") == [(0,)]  # the template was made again

    MlflowClient(f"sqlite:///{cache}").create_registered_model("planted")  # any other table
    store.open_store(f"sqlite:///{tmp_path / 'fourth.db'}")
    assert rows(tmp_path / "fourth.db", "SELECT count(*) FROM registered_models") == [(0,)]

    cache.write_bytes(b"not a database" * 100)
    store.open_store(f"sqlite:///{tmp_path / 'third.db'}")
    assert rows(tmp_path / "third.db", "SELECT name FROM experiments") == [("Default",)]


def test_a_store_that_appeared_meanwhile_is_never_replaced(tmp_path: Path, cache: Path) -> None:
    """``mlflow ui`` may create the file without our lock: a copy must not clobber it."""
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"someone else's")
    store._copy_template(database)
    assert database.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


@pytest.mark.slow
def test_without_a_cache_folder_mlflow_makes_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # no folder can be made there
    monkeypatch.chdir(tmp_path)
    store.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert rows(tmp_path / "mlflow.db", "SELECT name FROM experiments") == [("Default",)]


@pytest.mark.slow
def test_a_template_with_triggers_added_is_never_copied(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second hostile round: triggers planted in the template renamed every run and replaced
    every stored loss in each new store, while the template held no row. A template is used only
    while its content is what workbench recorded when it made it (workbench.cache)."""
    monkeypatch.chdir(tmp_path)
    store.open_store(f"sqlite:///{tmp_path / 'first.db'}")  # makes the template
    own = rows(tmp_path / "first.db", "SELECT name, sql FROM sqlite_master WHERE type='trigger'")
    with contextlib.closing(sqlite3.connect(cache)) as connection, connection:
        connection.execute(
            "CREATE TRIGGER planted AFTER INSERT ON runs BEGIN "
            "UPDATE runs SET name = 'renamed' WHERE run_uuid = NEW.run_uuid; END"
        )
        connection.execute(
            "CREATE TRIGGER loss AFTER INSERT ON metrics BEGIN "
            "UPDATE metrics SET value = 0 WHERE run_uuid = NEW.run_uuid; END"
        )
    store.open_store(f"sqlite:///{tmp_path / 'second.db'}")
    second = tmp_path / "second.db"
    assert rows(second, "SELECT name, sql FROM sqlite_master WHERE type='trigger'") == own
    client = MlflowClient(f"sqlite:///{second}")
    run = client.create_run(client.create_experiment("x"), run_name="mine")
    client.log_metric(run.info.run_id, "val_loss", 2.5)
    assert client.get_run(run.info.run_id).info.run_name == "mine"
    assert client.get_run(run.info.run_id).data.metrics["val_loss"] == 2.5
    triggers = rows(cache, "SELECT name FROM sqlite_master WHERE type='trigger'")
    assert ("planted",) not in triggers and ("loss",) not in triggers  # made again
