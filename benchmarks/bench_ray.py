"""The Ray executor against the local one on the same small grid: whole ``workbench run``
commands in fresh SQLite stores, alternated and repeated, medians. Ray's figure includes
starting a local cluster (``ray.init``), as a user's first run does.

    python benchmarks/bench_ray.py --repeats 3         # writes benchmarks/ray.json
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
    "experiment": "bench-ray",
    "train": {"max_iters": 1000, "eval_interval": 250, "device": "cpu"},
    "variants": {
        "bigram": {"model": {"kind": "bigram"}},
        "multi_head": {"model": {"kind": "multi_head"}},
    },
    "seeds": [1, 2, 3],
}
RUNS = 6


def run(executor: str, spec: Path) -> float:
    return timed_run(spec, "--executor", executor)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = Path(tempfile.mkdtemp()) / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    local, ray = [], []
    for _ in range(args.repeats):
        local.append(run("local", spec))
        ray.append(run("ray", spec))
    per_run = statistics.median((r - loc) / RUNS for loc, r in zip(local, ray, strict=True))
    result = {
        "runs": RUNS,
        "cores": os.cpu_count(),
        "local_s": statistics.median(local),
        "ray_s": statistics.median(ray),
        "overhead_per_run_s": per_run,
        "repeats": args.repeats,
    }
    print(
        f"local {result['local_s']:.1f}s, ray {result['ray_s']:.1f}s for {RUNS} runs: "
        f"{per_run:+.2f}s per run"
    )
    out = Path(__file__).with_name("ray.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
