"""The whole ablation (``experiments/ablation.yaml``, 135 runs) on one GPU: packed (the default on
a GPU) against ``--no-pack``, one after the other, each in a fresh folder with a fresh SQLite
store, through the real ``workbench run`` command.

Writes ``benchmarks/gpu_ablation.json``: the GPU's name, the commit, and for each side its wall
time (``ablation_wall_s``), the mean of its runs' own wall times (``per_run_wall_s``, the
``wall_time_s`` metric) and the final val loss of every run; then how far the two sides' final
val losses are apart against the seed noise (the spread of a config's three seeds), which they
must be within. Goal (issue 16): the packed ablation in at most 60 s on one H100/H200.

    python benchmarks/bench_gpu_ablation.py                       # on a machine with a GPU
    python benchmarks/bench_gpu_ablation.py --extra=--jobs-per-gpu=3 # more packs at once too
    # the script itself, on a CPU (the numbers mean nothing there):
    python benchmarks/bench_gpu_ablation.py --allow-cpu --set train.max_iters=20 \
        --set train.eval_interval=10 --set train.eval_iters=2 --out /tmp/gpu_ablation.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "ablation.yaml"


def run_side(name: str, args: list[str], folder: Path) -> dict[str, Any]:
    """One ``workbench run`` of the ablation in ``folder``; its wall time and its runs."""
    folder.mkdir(parents=True)
    store = folder / "mlflow.db"
    argv = [sys.executable, "-m", "workbench", "run", str(SPEC), "--no-progress",
            "--tracking-uri", f"sqlite:///{store}", *args]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: a run diverged (lr 1e-2 may), which is a result
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr}")
    runs = read_runs(store)
    print(f"{name}: {wall:.1f} s for {len(runs)} runs", flush=True)
    return {
        "args": args,
        "ablation_wall_s": wall,
        "per_run_wall_s": statistics.fmean(r["wall_time_s"] for r in runs.values()),
        "statuses": dict(sorted(Counter(r["status"] for r in runs.values()).items())),
        "final_val_loss": {n: r["final_val_loss"] for n, r in sorted(runs.items())},
    }


def read_runs(store: Path) -> dict[str, dict[str, Any]]:
    """Run name -> status, final val loss and wall time, read from the store's tables (the
    parent run has no final_val_loss and is left out)."""
    query = """
        SELECT r.name, r.status, m.key, m.value FROM runs r
        JOIN latest_metrics m ON m.run_uuid = r.run_uuid
        WHERE m.key IN ('final_val_loss', 'wall_time_s')
    """
    runs: dict[str, dict[str, Any]] = defaultdict(dict)
    with sqlite3.connect(store) as connection:
        for name, status, key, value in connection.execute(query):
            runs[name].update(status=status, **{key: value})
    return {n: r for n, r in runs.items() if "final_val_loss" in r and "wall_time_s" in r}


def agreement(packed: dict[str, float], alone: dict[str, float]) -> dict[str, Any]:
    """Per config (a run name without its seed): the difference of the two sides' seed means
    against the seeds' spread. They agree when every difference is within three standard
    errors of the difference (the larger of the two sides' seed spreads)."""
    configs: dict[str, list[str]] = defaultdict(list)
    for name in packed.keys() & alone.keys():
        configs[name.rsplit(" s=", 1)[0]].append(name)
    rows = {}
    for config, names in sorted(configs.items()):
        ours = [packed[n] for n in names if not math.isnan(packed[n])]  # diverged: left out
        theirs = [alone[n] for n in names if not math.isnan(alone[n])]
        if len(ours) < 2 or len(theirs) < 2:
            continue
        spread = max(statistics.stdev(ours), statistics.stdev(theirs))
        diff = statistics.fmean(ours) - statistics.fmean(theirs)
        bound = 3 * spread * (2 / len(names)) ** 0.5
        rows[config] = {"diff": diff, "seed_std": spread, "within": abs(diff) <= max(bound, 1e-3)}
    diffs = [abs(packed[n] - alone[n]) for n in packed.keys() & alone.keys()]
    finite = [d for d in diffs if not math.isnan(d)]
    return {
        "agree_within_seed_noise": all(row["within"] for row in rows.values()),
        "max_abs_run_diff": max(finite, default=None),
        "median_abs_run_diff": statistics.median(finite) if finite else None,
        "configs": rows,
    }


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_ablation.json")
    parser.add_argument("--set", action="append", default=[], help="passed to workbench run")
    parser.add_argument("--extra", action="append", default=[], help="another packed side's "
                        "extra arguments, e.g. --extra=--jobs-per-gpu=3")  # fmt: skip
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke)")
    args = parser.parse_args()
    name = gpu_name()
    if name is None and not args.allow_cpu:
        raise SystemExit("no CUDA GPU here (--allow-cpu runs the script anyway, as a smoke)")
    sets = [f"--set={value}" for value in args.set]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    sides: dict[str, list[str]] = {"packed": ["--pack"]}
    for i, extra in enumerate(args.extra):
        sides[f"packed_{i + 1}"] = ["--pack", *extra.split("=", 1)]
    sides["alone"] = ["--no-pack"]  # last: the longest; what came before is written already
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-ablation-") as folder:
        for side, side_args in sides.items():
            results[side] = run_side(side, [*side_args, *sets], Path(folder) / side)
            report = summarize(results, name, commit, args.set)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "sides"}, indent=2))


def summarize(
    results: dict[str, dict[str, Any]], name: str | None, commit: str, sets: list[str]
) -> dict[str, Any]:
    """The JSON file's content from the sides measured so far."""
    wall = {side: result["ablation_wall_s"] for side, result in results.items()}
    report: dict[str, Any] = {
        "gpu_name": name,
        "commit": commit,
        "spec": str(SPEC.relative_to(ROOT)),
        "set": sets,
        "cpu_count": os.cpu_count(),
        "ablation_wall_s": wall,
        "per_run_wall_s": {side: result["per_run_wall_s"] for side, result in results.items()},
        # The goal is the ablation as written, on a GPU: a smoke (--allow-cpu, --set) says nothing.
        "goal_60s_met": wall["packed"] <= 60 if name and not sets else None,
    }
    if "alone" in results:
        report["speedup_packed"] = wall["alone"] / wall["packed"]
        report["agreement"] = agreement(
            results["packed"]["final_val_loss"], results["alone"]["final_val_loss"]
        )
    report["sides"] = results
    return report


if __name__ == "__main__":
    main()
