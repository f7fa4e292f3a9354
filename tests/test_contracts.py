"""Contracts with private APIs that workbench relies on. Each is checked here, in one named place,
so that an upgrade of torch or MLflow that changes one fails here first and says which:

- ``torch._fused_adamw_``: the fused AdamW kernel that ``FlatAdamW`` calls over one flat buffer.
- MLflow's SQLite tables ``metrics`` and ``runs``: the report reads every curve of an experiment
  in one SQL query instead of one request per run and metric.
- MLflow's ``/ajax-api/2.0/mlflow/metrics/get-history-bulk``: the same through a tracking server.
- torch's pt2 archive (``torch._C.PyTorchFileReader``/``Writer``, ``torch._export.serde.schema``):
  a run's logged model is the archive of its model shape with the run's weights written in raw.
- ``atexit._run_exitfuncs``: the console script runs the exit handlers, then skips the
  interpreter's teardown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from floats import assert_f32_close
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


def test_torch_fused_adamw_kernel_takes_our_call() -> None:
    """``FlatAdamW``'s call, keyword for keyword, against ``torch.optim.AdamW``'s own step."""
    assert hasattr(torch, "_fused_adamw_"), "torch no longer has _fused_adamw_ (FlatAdamW uses it)"
    torch.manual_seed(0)
    param, grad = torch.randn(37), torch.randn(37)
    reference = param.clone().requires_grad_()
    reference.grad = grad.clone()
    optimizer = torch.optim.AdamW([reference], lr=3e-3, weight_decay=0.1, foreach=False)
    ours, exp_avg, exp_avg_sq = param.clone(), torch.zeros(37), torch.zeros(37)
    steps = torch.zeros((), dtype=torch.float32)  # the kernel's step counter, as FlatAdamW keeps it
    for _ in range(3):
        optimizer.step()
        steps.add_(1)
        torch._fused_adamw_(
            [ours], [grad], [exp_avg], [exp_avg_sq], [], [steps],
            lr=3e-3, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8,
            amsgrad=False, maximize=False,
        )  # fmt: skip
    assert_f32_close(ours, reference.detach(), ulps=16)


def _log_curves(client: MlflowClient) -> tuple[str, dict[tuple[str, str], list[Any]]]:
    """Two runs with a few points each, a NaN among them; returns the experiment and, per
    (run, key), MLflow's own ``get_metric_history``."""
    experiment_id = client.create_experiment("contract")
    runs = [client.create_run(experiment_id).info.run_id for _ in range(2)]
    for index, run_id in enumerate(runs):
        points = [Metric("train_loss", 4.0 - step / 10 + index, 1000 + step, step)
                  for step in range(0, 50, 10)]  # fmt: skip
        points.append(Metric("val_loss", math.nan, 2000, 40))
        client.log_batch(run_id, metrics=points)
    history = {
        (r, k): client.get_metric_history(r, k) for r in runs for k in ("train_loss", "val_loss")
    }
    return experiment_id, history


def _as_rows(history: dict[tuple[str, str], list[Any]]) -> list[tuple[Any, ...]]:
    rows = [(r, k, p.step, p.value, p.timestamp) for (r, k), ps in history.items() for p in ps]
    return sorted(rows, key=lambda row: row[:3])


def _frame_rows(frame: Any) -> list[tuple[Any, ...]]:
    rows = [
        tuple(row)
        for row in frame[["run_id", "metric", "step", "value", "timestamp"]].itertuples(index=False)
    ]
    return sorted(
        ((r, k, int(s), float(v), int(t)) for r, k, s, v, t in rows), key=lambda row: row[:3]
    )


def _same(got: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert a[:3] == b[:3] and a[4] == b[4]
        assert (math.isnan(a[3]) and math.isnan(b[3])) or a[3] == b[3], (a, b)


def test_mlflow_sqlite_tables_the_report_queries(tmp_path: Path) -> None:
    from workbench.report.history import sqlite_histories

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id, history = _log_curves(client)
    _same(_frame_rows(sqlite_histories(tmp_path / "mlflow.db", experiment_id)), _as_rows(history))


@pytest.mark.slow
def test_mlflow_get_history_bulk_endpoint(tmp_path: Path) -> None:
    from runs import mlflow_server

    from workbench.report.history import server_histories

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id, history = _log_curves(MlflowClient(uri))
    keys = {run_id: ["train_loss", "val_loss"] for run_id, _ in history}
    with mlflow_server(uri, tmp_path) as url:
        frame = server_histories(url, keys)
    assert experiment_id
    _same(_frame_rows(frame), _as_rows(history))


def test_torch_pt2_archive_records_and_weights_as_save_logits_rewrites_them(
    tmp_path: Path,
) -> None:
    """``torch.export.save`` stores each weight raw, named in the archive's weights config; the
    same records written again by ``PyTorchFileWriter``, one weight changed, load to a program
    computing with the new weight."""
    import json

    from torch._export.serde.schema import Layout, ScalarType

    module = torch.nn.Linear(3, 2, bias=False)
    program = torch.export.export(module, (torch.zeros(2, 3),))
    torch.export.save(program, tmp_path / "model.pt2")
    reader = torch._C.PyTorchFileReader(str(tmp_path / "model.pt2"))
    records = {name: bytes(reader.get_record(name)) for name in reader.get_all_records()}
    config = json.loads(records["data/weights/model_weights_config.json"])["config"]
    (entry,) = config.values()
    meta = entry["tensor_meta"]
    assert entry["use_pickle"] is False and meta["dtype"] == ScalarType.FLOAT
    assert meta["layout"] == Layout.Strided and [s["as_int"] for s in meta["sizes"]] == [2, 3]
    weight = f"data/weights/{entry['path_name']}"
    assert records[weight] == module.weight.detach().numpy().tobytes()

    new = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    (tmp_path / "again").mkdir()
    writer = torch._C.PyTorchFileWriter(str(tmp_path / "again" / "model.pt2"))
    writer.set_min_version(6)
    for name, data in records.items():
        if not name.startswith(".data/"):  # the writer's own
            data = new.numpy().tobytes() if name == weight else data
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    loaded = torch.export.load(tmp_path / "again" / "model.pt2").module()
    x = torch.randn(2, 3)  # the traced batch size (static)
    assert torch.equal(loaded(x), x @ new.T)


def test_atexit_run_exitfuncs_runs_the_handlers_before_os_exit() -> None:
    import subprocess
    import sys

    script = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print('handler ran', flush=True))\n"
        "atexit._run_exitfuncs()\n"
        "os._exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3 and done.stdout == "handler ran\n"
