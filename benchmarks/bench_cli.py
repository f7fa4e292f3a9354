"""What a command costs besides its work, against the imports it cannot avoid.

Measured side by side, in turns, in fresh processes:

- ``python -c "import torch, mlflow"``: the yardstick.
- ``workbench run`` of one bigram run (3000 steps) in a fresh folder (a new SQLite store): its
  wall time minus the run's own training time (the ``wall_time_s`` metric), as a multiple of
  the imports. Goal: at most 1.5x.
- The same command again, with nothing left to do: its wall time as a multiple of the imports.
  Goal: at most 1.2x.
- ``workbench --help`` and ``workbench plan experiments/ablation.yaml --no-store``.

``--against REV`` runs the same commands with another commit's package too (unpacked with
``git archive``), in the same turns, so the two are compared under the same load.

    python benchmarks/bench_cli.py --repeats 7 --against c36466c   # writes benchmarks/cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from timed_run import unpack

ROOT = Path(__file__).resolve().parents[1]
SPEC = """\
experiment: startup
data: {dataset: tinyshakespeare}
model: {kind: bigram}
train: {max_iters: 3000, eval_interval: 500, device: cpu}
seeds: [1]
"""


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def training_time(store: Path) -> float:
    with sqlite3.connect(store) as connection:
        row = connection.execute(
            "SELECT value FROM latest_metrics WHERE key = 'wall_time_s'"
        ).fetchone()
    return float(row[0])


def one_turn(package_root: Path, env: dict[str, str]) -> dict[str, float]:
    """One fresh-store run, one rerun, --help and plan, with ``package_root``'s workbench."""
    env = {**env, "PYTHONPATH": str(package_root)}
    workbench = [sys.executable, "-m", "workbench"]
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        (cwd / "one.yaml").write_text(SPEC)
        run = [*workbench, "run", "one.yaml", "--no-progress"]
        fresh = timed(run, cwd, env)
        trained = training_time(cwd / "mlflow.db")
        rerun = timed(run, cwd, env)
    return {
        "fresh_run_s": fresh,
        "fresh_run_beyond_training_s": fresh - trained,
        "rerun_s": rerun,
        "help_s": timed([*workbench, "--help"], ROOT, env),
        "plan_s": timed([*workbench, "plan", "experiments/ablation.yaml", "--no-store"], ROOT, env),
    }


def summary(turns: list[dict[str, float]], imports: list[float]) -> dict[str, Any]:
    medians = {key: statistics.median(t[key] for t in turns) for key in turns[0]}
    ratios = {
        "fresh_run_beyond_training_x_imports": statistics.median(
            t["fresh_run_beyond_training_s"] / i for t, i in zip(turns, imports, strict=True)
        ),
        "rerun_x_imports": statistics.median(
            t["rerun_s"] / i for t, i in zip(turns, imports, strict=True)
        ),
    }
    return {"median_s": medians, "median_ratio": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", help="another commit to measure in the same turns")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("cli.json"))
    args = parser.parse_args()
    env = dict(os.environ)
    imports_argv = [sys.executable, "-c", "import torch, mlflow"]
    trees = {"tree": ROOT}
    with tempfile.TemporaryDirectory() as scratch:
        if args.against:
            trees[args.against] = unpack(args.against, Path(scratch))
        imports: list[float] = []
        turns: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for turn in range(args.repeats):
            imports.append(timed(imports_argv, ROOT, env))
            for name, root in trees.items():
                turns[name].append(one_turn(root, env))
            print(f"turn {turn + 1}: imports {imports[-1]:.2f} s; " + "; ".join(
                f"{name}: fresh {t[-1]['fresh_run_s']:.2f} s, rerun {t[-1]['rerun_s']:.2f} s"
                for name, t in turns.items()
            ))  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    results = {
        "commit": commit,
        "repeats": args.repeats,
        "imports_torch_mlflow_median_s": statistics.median(imports),
        **{name: summary(t, imports) for name, t in turns.items()},
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
