"""``workbench run --jobs 2`` against ``--jobs 1`` on the same grid, each in a fresh store,
alternated and repeated; whole-command wall time, medians.

    python benchmarks/bench_jobs.py --repeats 3        # writes benchmarks/jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timed_run import timed_run

SPEC = {
    "experiment": "bench-jobs",
    "train": {"max_iters": 3000, "eval_interval": 500, "device": "cpu"},
    "model": {"n_embd": 32},
    "variants": {
        "single_head": {"model": {"kind": "single_head"}},
        "multi_head": {"model": {"kind": "multi_head"}},
    },
    "grid": {"train.block_size": [8, 16]},
    "seeds": [1, 2],
}


def run(jobs: int, spec: Path) -> float:
    return timed_run(spec, "--jobs", str(jobs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = Path(tempfile.mkdtemp()) / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    one, two = [], []
    for _ in range(args.repeats):
        one.append(run(1, spec))
        two.append(run(2, spec))
    speedup = statistics.median(a / b for a, b in zip(one, two, strict=True))
    result = {
        "runs": 8,
        "cores": os.cpu_count(),
        "jobs1_s": statistics.median(one),
        "jobs2_s": statistics.median(two),
        "speedup": speedup,
        "repeats": args.repeats,
    }
    print(
        f"--jobs 1: {result['jobs1_s']:.1f}s, --jobs 2: {result['jobs2_s']:.1f}s, "
        f"speedup {speedup:.2f}x"
    )
    out = Path(__file__).with_name("jobs.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
