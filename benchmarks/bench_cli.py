"""How fast the CLI answers: ``workbench --help`` (no torch or mlflow on its path) and
``workbench plan experiments/ablation.yaml`` (135 runs, parameter counts included).

    python benchmarks/bench_cli.py            # writes benchmarks/cli.json
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "workbench --help": ["--help"],
    "workbench plan experiments/ablation.yaml --no-store": [
        "plan",
        "experiments/ablation.yaml",
        "--no-store",
    ],
    "python -c 'import torch' (for scale)": None,
}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    results = {}
    for label, args in COMMANDS.items():
        argv = (
            [sys.executable, "-m", "workbench", *args]
            if args is not None
            else [sys.executable, "-c", "import torch"]
        )
        times = [timed(argv) for _ in range(repeats)]
        results[label] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "repeats": repeats,
        }
        print(f"{label}: median {statistics.median(times):.3f} s (min {min(times):.3f})")
    out = Path(__file__).with_name("cli.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
