"""The whole ablation, this tree against another commit's package, interleaved.

Each pair runs ``workbench run experiments/ablation.yaml`` (plus ``--set`` values) in a fresh
folder and store with the other commit's package, then with this tree's, alternating which goes
first; both import the same installed torch and MLflow. A short schedule (``--short``: 300
steps a run) measures what a run costs besides its training, where that cost is most of the
time and a pair takes about a minute; the full schedule the whole command.

    python benchmarks/bench_ablation.py --against 20defc6 --pairs 3 --short   # → ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timed_run import unpack

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--set", "train.max_iters=300", "--set", "train.eval_iters=20",
         "--set", "train.eval_interval=100"]  # fmt: skip


def timed(package_root: Path, flags: list[str]) -> float:
    """Wall seconds of the ablation in a new folder and store, with ``package_root``'s code."""
    folder = Path(tempfile.mkdtemp(prefix="bench-ablation-"))
    env = {**os.environ, "PYTHONPATH": str(package_root), "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "workbench", "run", str(ROOT / "experiments" / "ablation.yaml"),
         *flags, "--no-progress", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--checkpoint-dir", str(folder / "checkpoints")],
        cwd=folder, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the commit to compare with")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--short", action="store_true", help="300 steps a run")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ablation.json"))
    args = parser.parse_args()
    flags = SHORT if args.short else []
    with tempfile.TemporaryDirectory() as scratch:
        trees = {args.against: unpack(args.against, Path(scratch)), "tree": ROOT}
        times: dict[str, list[float]] = {name: [] for name in trees}
        for pair in range(args.pairs):
            order = list(trees) if pair % 2 == 0 else list(reversed(trees))
            for name in order:
                times[name].append(timed(trees[name], flags))
            print(f"pair {pair + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in trees))
    before, after = times[args.against], times["tree"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    results = {
        "commit": commit,
        "against": args.against,
        "schedule": "300 steps a run" if args.short else "as the spec says",
        "seconds": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "median_change_s": statistics.median(a - b for a, b in zip(after, before, strict=True)),
        "median_ratio": statistics.median(a / b for a, b in zip(after, before, strict=True)),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
