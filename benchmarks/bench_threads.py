"""Torch CPU threads for one tiny run: 1 thread against all cores, side by side in one process.
(Whether one run per core beats one run with every core is ``bench_jobs.py``.)

    python benchmarks/bench_threads.py --repeats 3      # writes benchmarks/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.corpus import Corpus
from workbench.datasets import fetch_known
from workbench.settings import load_settings
from workbench.spec import RunConfig
from workbench.train.factory import build_trainer
from workbench.train.process import torch_threads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["multi_head", "transformer"])
    args = parser.parse_args()
    corpus = Corpus.from_file(fetch_known("tinyshakespeare", load_settings().data_dir))
    cores = os.cpu_count() or 1
    rows = []
    for kind in args.kinds:
        config = RunConfig.model_validate(
            {
                "data": {"dataset": "tinyshakespeare"},
                "train": {"max_iters": 2000, "eval_interval": 500, "device": "cpu"},
                "model": {"kind": kind},
                "seed": 1337,
            }
        )
        times: dict[int, list[float]] = {1: [], cores: []}
        for _ in range(args.repeats):
            for threads in times:
                with torch_threads(threads):
                    start = time.perf_counter()
                    build_trainer(config, corpus).fit()
                    times[threads].append(time.perf_counter() - start)
        row = {
            "kind": kind,
            "max_iters": 2000,
            **{f"threads_{t}_s": statistics.median(v) for t, v in times.items()},
        }
        rows.append(row)
        print(json.dumps(row))
    out = Path(__file__).with_name("threads.json")
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
