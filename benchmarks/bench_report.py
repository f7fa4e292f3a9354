"""How long ``workbench report`` takes on 200 runs with full loss curves.

Fabricates, in a fresh SQLite store, what a 5000-step sweep leaves behind: 5 variants × 4 block
sizes × 5 learning rates × 2 seeds = 200 runs, each with the driver's tags and params, val/train
loss every 500 steps, train_loss_smooth/lr/tokens_per_sec every 10 steps (about 1,525 points a
run, 305,000 in all), a sample and attention weights; a few runs failed or diverged. Then times
``workbench report`` end to end in a fresh process (imports included), repeated, and once
in process for the breakdown (runs, histories, CSV, page).

    python benchmarks/bench_report.py --repeats 3        # writes benchmarks/report.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.tracking import TAG  # noqa: E402

VARIANTS = {
    "bigram": ("bigram", 2.48),
    "uniform": ("uniform_avg", 2.82),
    "softmax": ("softmax_avg", 2.40),
    "single_head": ("single_head", 2.35),
    "multi_head": ("multi_head", 2.16),
}
BLOCK_SIZES = [8, 16, 32, 64]
LEARNING_RATES = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
SEEDS = [1337, 1338]
MAX_ITERS, EVAL_INTERVAL, LOG_EVERY = 5000, 500, 10


def fabricate(uri: str, experiment: str) -> int:
    """Write the 200 runs; returns the number of metric points."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(experiment)
    rng = random.Random(0)
    points = 0
    index = 0
    for variant, (kind, floor) in VARIANTS.items():
        for block_size in BLOCK_SIZES:
            for lr in LEARNING_RATES:
                for seed in SEEDS:
                    index += 1
                    name = f"{variant}-block_size={block_size}-learning_rate={lr:g}-seed={seed}"
                    tags = {
                        TAG + "run_key": f"{index:016x}",
                        TAG + "variant": variant,
                        TAG + "seed": str(seed),
                        TAG + "kind": kind,
                        TAG + "device": "cpu",
                        TAG + "sweep": "bench",
                        TAG + "attempt": "1",
                        TAG + "grid.train.block_size": str(block_size),
                        TAG + "grid.train.learning_rate": str(lr),
                    }
                    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
                    params = _params(kind, block_size, lr, seed)
                    diverged = lr == 1e-1 and kind != "bigram" and seed == SEEDS[0]
                    metrics = _curves(rng, floor, block_size, lr, diverged)
                    points += len(metrics)
                    client.log_batch(
                        run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()]
                    )
                    if diverged:
                        for key, value in (("diverged", "true"), ("stopped_step", "1500"),
                                           ("reason", "loss exceeded 3x the initial")):  # fmt: skip
                            client.log_batch(run_id, tags=[RunTag(TAG + key, value)])
                        client.set_terminated(run_id, "FAILED")
                        continue
                    client.log_text(run_id, _sample(rng), "sample.txt")
                    if kind in ("single_head", "multi_head"):
                        client.log_text(run_id, _attention(rng, kind, block_size), "attention.json")
                    client.set_terminated(run_id, "FINISHED")
    return points


def _params(kind: str, block_size: int, lr: float, seed: int) -> dict[str, str]:
    return {
        "data.dataset": "tinyshakespeare", "data.path": "None", "data.val_fraction": "0.1",
        "train.batch_size": "32", "train.block_size": str(block_size),
        "train.max_iters": str(MAX_ITERS), "train.eval_interval": str(EVAL_INTERVAL),
        "train.eval_iters": "200", "train.learning_rate": str(lr), "train.weight_decay": "0.01",
        "train.lr_schedule": "constant", "train.warmup_iters": "0", "train.min_lr": "0.0",
        "train.grad_clip": "0.0", "train.divergence_factor": "3.0", "train.device": "auto",
        "train.threads": "None", "train.compile": "False", "model.kind": kind,
        "model.n_embd": "32", "model.n_head": "4", "model.head_size": "None",
        "model.n_layer": "3", "model.ffwd": "mlp", "model.residual": "True",
        "model.layernorm": "True", "model.proj": "None", "model.dropout": "0.0",
        "model.init": "default", "model.learnable": "True", "seed": str(seed),
        "num_params": str(4000 + 1000 * len(kind)), "data_sha256": "0" * 64,
    }  # fmt: skip


def _curves(rng: random.Random, floor: float, block: int, lr: float, diverged: bool) -> list[Any]:
    from mlflow.entities import Metric

    start = int(time.time() * 1000)
    ms_per_step = 0.4 * block / 8
    last = 1500 if diverged else MAX_ITERS
    floor += 0.05 * abs(math.log10(lr) + 2.3) + rng.gauss(0, 0.01)
    metrics: list[Any] = []

    def loss(step: int) -> float:
        return floor + (4.2 - floor) * math.exp(-step * lr * 2.0) + rng.gauss(0, 0.005)

    for step in range(0, last + 1, LOG_EVERY):
        ts = start + int(step * ms_per_step)
        speed = 32 * block / (ms_per_step / 1000) * rng.uniform(0.9, 1.1)
        metrics += [
            Metric("train_loss_smooth", loss(step), ts, step),
            Metric("lr", lr, ts, step),
            Metric("tokens_per_sec", speed, ts, step),
        ]
        if step % EVAL_INTERVAL == 0:
            val = loss(step)
            metrics += [
                Metric("val_loss", val, ts, step),
                Metric("train_loss", val - 0.03, ts, step),
            ]
    best = min(m.value for m in metrics if m.key == "val_loss")
    end = start + int(last * ms_per_step)
    metrics += [
        Metric("best_val_loss", best, end, last),
        Metric("final_val_loss", best + 0.002, end, last),
        Metric("wall_time_s", last * ms_per_step / 1000, end, last),
    ]
    return metrics


def _sample(rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz   \n,.ROMEO:"
    return "".join(rng.choice(letters) for _ in range(500))


def _attention(rng: random.Random, kind: str, block: int) -> str:
    heads, size = (4 if kind == "multi_head" else 1), min(block, 32)
    weights = [[[[1.0 / (q + 1) if k <= q else 0.0 for k in range(size)] for q in range(size)]
                 for _ in range(heads)]]  # fmt: skip
    prompt = "".join(rng.choice("abc \n") for _ in range(size))
    return json.dumps(
        {"prompt": prompt, "shape": ["layer", "head", "query", "key"], "weights": weights}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "report.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        os.chdir(folder)
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        started = time.perf_counter()
        points = fabricate(uri, "bench")
        fabricate_s = time.perf_counter() - started
        print(f"fabricated 200 runs, {points} metric points in {fabricate_s:.1f} s")

        cli = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "workbench", "report", "--tracking-uri", uri,
                 "--out", str(Path(folder) / "cli")],
                check=True, capture_output=True,
            )  # fmt: skip
            cli.append(time.perf_counter() - started)
            print(f"workbench report (fresh process): {cli[-1]:.2f} s")

        from workbench.report.build import render_page
        from workbench.report.load import load_experiment, tidy

        started = time.perf_counter()
        data = load_experiment(uri, "bench")
        loaded = time.perf_counter()
        frame = tidy(data)
        frame.to_csv(Path(folder) / "bench.csv", index=False)
        written = time.perf_counter()
        html = render_page(data, "bench.csv")
        rendered = time.perf_counter()
        html_bytes = len(html.encode())
        csv_bytes = (Path(folder) / "bench.csv").stat().st_size

    result = {
        "what": "workbench report on 200 fabricated runs with full curves (SQLite store)",
        "runs": len(data.runs),
        "metric_points": points,
        "csv_rows": len(frame),
        "csv_mb": round(csv_bytes / 1e6, 1),
        "html_mb": round(html_bytes / 1e6, 2),
        "cli_seconds": [round(s, 2) for s in cli],
        "cli_median_s": round(statistics.median(cli), 2),
        "in_process_s": {
            "load (runs + histories)": round(loaded - started, 2),
            "runs search": round(data.load_seconds["runs"], 2),
            "histories (one SQL query)": round(data.load_seconds["histories"], 2),
            "tidy + CSV": round(written - loaded, 2),
            "analysis + figures + HTML": round(rendered - written, 2),
            "total": round(rendered - started, 2),
        },
        "fabricate_s": round(fabricate_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
