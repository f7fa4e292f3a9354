"""Metric histories of an experiment's runs, in bulk: one SQL query on a SQLite store, the
server's ``get-history-bulk`` endpoint (up to 100 runs a request) on an ``http(s)`` store, else
one ``get_metric_history`` per run and key on a thread pool."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from workbench.tracking import client, sqlite_path

if TYPE_CHECKING:
    import pandas as pd

HISTORY_COLUMNS = ["run_id", "metric", "step", "value", "timestamp"]
BULK_RUNS_PER_REQUEST = 100  # the server's limit
BULK_MAX_POINTS = 25_000  # the server truncates a bulk answer to this many points


def histories(tracking_uri: str, experiment_id: str, runs: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    keys = {
        run_id: [c[8:] for c in runs.columns if c.startswith("metrics.") and row[c] == row[c]]
        for run_id, row in runs.iterrows()
    }
    path = sqlite_path(tracking_uri)
    if path is not None:
        history = sqlite_histories(path, experiment_id)
    elif tracking_uri.startswith(("http://", "https://")):
        history = server_histories(tracking_uri, keys)
    else:
        history = client_histories(tracking_uri, keys)
    history = history[history["run_id"].isin(runs.index)]
    history = history.drop_duplicates(["run_id", "metric", "step"], keep="last")
    history = history.astype({"step": "int64", "value": "float64", "timestamp": "int64"})
    return pd.DataFrame(history[HISTORY_COLUMNS]).reset_index(drop=True)


def sqlite_histories(path: Path, experiment_id: str) -> pd.DataFrame:
    """Every metric point of the experiment in one query, read-only."""
    import numpy as np
    import pandas as pd

    query = (
        "SELECT m.run_uuid AS run_id, m.key AS metric, m.step, m.value, m.timestamp, m.is_nan "
        "FROM metrics AS m JOIN runs AS r ON r.run_uuid = m.run_uuid "
        "WHERE r.experiment_id = ? ORDER BY m.run_uuid, m.key, m.step, m.timestamp"
    )
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=20)) as connection:
        frame = pd.read_sql_query(query, connection, params=(int(experiment_id),))
    frame["value"] = np.where(frame["is_nan"].astype(bool), np.nan, frame["value"])
    return frame.drop(columns="is_nan")


def server_histories(tracking_uri: str, keys: dict[str, list[str]]) -> pd.DataFrame:
    """``get-history-bulk``: one request per metric key and 100 runs (fewer if truncated)."""
    import pandas as pd
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(tracking_uri)  # type: ignore[no-untyped-call]
    frames: list[pd.DataFrame] = []

    def fetch(metric: str, run_ids: list[str]) -> None:
        response = http_request(  # type: ignore[no-untyped-call]
            creds,
            "/ajax-api/2.0/mlflow/metrics/get-history-bulk",
            "GET",
            params={"run_id": run_ids, "metric_key": metric, "max_results": BULK_MAX_POINTS},
        )
        response.raise_for_status()
        points = response.json().get("metrics", [])
        if len(points) >= BULK_MAX_POINTS:  # truncated: ask for fewer runs at a time
            if len(run_ids) == 1:
                frames.append(client_histories(tracking_uri, {run_ids[0]: [metric]}))
                return
            half = len(run_ids) // 2
            fetch(metric, run_ids[:half])
            fetch(metric, run_ids[half:])
            return
        if points:
            frame = pd.DataFrame(points).rename(columns={"key": "metric"})
            frames.append(frame.reindex(columns=HISTORY_COLUMNS))

    for metric in sorted({k for run_keys in keys.values() for k in run_keys}):
        run_ids = sorted(r for r, run_keys in keys.items() if metric in run_keys)
        for chunk in _chunks(run_ids, BULK_RUNS_PER_REQUEST):
            fetch(metric, chunk)
    return _concat(frames)


def client_histories(tracking_uri: str, keys: dict[str, list[str]]) -> pd.DataFrame:
    """The slow path, for other stores: one call per run and key, eight at a time."""
    import pandas as pd

    mlflow_client = client(tracking_uri)  # the experiment was found: the store exists

    def one(pair: tuple[str, str]) -> pd.DataFrame:
        run_id, metric = pair
        points = mlflow_client.get_metric_history(run_id, metric)
        return pd.DataFrame(
            [(run_id, metric, p.step, p.value, p.timestamp) for p in points],
            columns=HISTORY_COLUMNS,
        )

    pairs = [(run_id, metric) for run_id, run_keys in keys.items() for metric in run_keys]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return _concat(list(pool.map(one, pairs)))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    import pandas as pd

    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in HISTORY_COLUMNS}).astype(
            {"run_id": str, "metric": str, "value": "float64"}
        )
    return pd.concat(frames, ignore_index=True)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
