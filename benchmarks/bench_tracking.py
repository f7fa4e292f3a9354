"""What tracking costs: the same run trained with tracking off (the bare trainer) and through
the job function that logs to MLflow (SQLite store), interleaved in one process, medians.

The tracked side includes everything the job does: tags, metric batches at eval points,
the end-of-run metrics and artifacts (config, tokenizer, sample, attention maps) and the
logged model. A third side is tracked without the logged model, to say what the model adds;
the one-off cost of tracing a model shape (once per shape, torch version and model code: the
archive is kept) is timed apart, in a process that has traced another shape already.

    python benchmarks/bench_tracking.py --repeats 5      # writes benchmarks/tracking.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.corpus import Corpus
from workbench.datasets import resolve_text_path
from workbench.models import build_model
from workbench.models.attention import SDPA
from workbench.models.export import trace_logits
from workbench.settings import load_settings
from workbench.spec import RunConfig
from workbench.sweep import record
from workbench.sweep.jobs import Job, execute_job
from workbench.tracking import client, ensure_experiment
from workbench.train.factory import build_trainer
from workbench.train.process import prepare_process


def config(kind: str, max_iters: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "data": {"dataset": "tinyshakespeare"},
            "train": {"max_iters": max_iters, "eval_interval": 500, "device": "cpu"},
            "model": {"kind": kind},
            "seed": 1337,
        }
    )


def untracked(run_config: RunConfig, data_dir: Path) -> float:
    start = time.perf_counter()
    path = resolve_text_path(run_config.data.dataset, run_config.data.path, data_dir)
    corpus = Corpus.from_file(path, run_config.data.val_fraction)
    prepare_process(run_config.train)
    build_trainer(run_config, corpus).fit()
    return time.perf_counter() - start


def tracked(run_config: RunConfig, data_dir: Path, uri: str, experiment_id: str, i: int) -> float:
    run_id = client(uri).create_run(experiment_id, run_name=f"bench-{i}").info.run_id
    job = Job(
        name=f"bench-{i}",
        key=f"bench{i}",
        config=run_config.model_dump(mode="json"),
        run_id=run_id,
        tracking_uri=uri,
        checkpoint_dir=tempfile.mkdtemp(),
        data_dir=str(data_dir),
    )
    start = time.perf_counter()
    result = execute_job(job)
    elapsed = time.perf_counter() - start
    assert result.status == "finished", result
    return elapsed


def tracked_without_model(*args: object) -> float:
    log_final_model = record.log_final_model
    record.log_final_model = lambda *_: None  # type: ignore[assignment]
    try:
        return tracked(*args)  # type: ignore[arg-type]
    finally:
        record.log_final_model = log_final_model


def export_time(run_config: RunConfig, block_size: int) -> float:
    """Seconds to export a model shape this process has not exported yet."""
    model = build_model(run_config.model, 65, block_size, attention=SDPA)
    start = time.perf_counter()
    trace_logits(model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["bigram", "multi_head"])
    parser.add_argument("--max-iters", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_dir = load_settings().data_dir
    folder = Path(tempfile.mkdtemp())
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "bench-tracking")
    rows = []
    for kind in args.kinds:
        run_config = config(kind, args.max_iters)
        off, on, no_model = [], [], []
        tracked(run_config, data_dir, uri, experiment_id, -1)  # warm-up (imports, caches)
        for i in range(args.repeats):
            off.append(untracked(run_config, data_dir))
            on.append(tracked(run_config, data_dir, uri, experiment_id, i))
            no_model.append(tracked_without_model(run_config, data_dir, uri, experiment_id, i))
        overhead = statistics.median(b / a - 1 for a, b in zip(off, on, strict=True))
        model_s = statistics.median(b - a for a, b in zip(no_model, on, strict=True))
        exports = [export_time(run_config, 100 + i) for i in range(args.repeats)]
        row = {
            "kind": kind,
            "max_iters": args.max_iters,
            "untracked_s": statistics.median(off),
            "tracked_s": statistics.median(on),
            "overhead": overhead,
            "tracked_without_model_s": statistics.median(no_model),
            "logged_model_s": model_s,
            "export_new_shape_s": statistics.median(exports),
            "repeats": args.repeats,
        }
        rows.append(row)
        print(
            f"{kind}: tracking off {row['untracked_s']:.2f}s, on {row['tracked_s']:.2f}s, "
            f"overhead {100 * overhead:+.1f}%; the logged model {1000 * model_s:.0f} ms a run, "
            f"a new shape's export {1000 * row['export_new_shape_s']:.0f} ms",
            flush=True,
        )
    out = Path(__file__).with_name("tracking.json")
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
