"""A/B of model code: the working tree's ``workbench/models.py`` against another commit's, on
the lecture's rungs, interleaved in one process (one torch thread).

This machine's speed drifts by 10% or more between runs minutes apart, more than most single
changes to the model code gain; two trainers alternating in one process see the same drift.
Both sides share the rest of the trainer (data, optimizer, loop); only the models differ. Their
losses must agree (the same math), and the script checks that they do before timing.

    python benchmarks/ab_models.py                 # uncommitted changes against HEAD
    python benchmarks/ab_models.py --against HEAD~1  # the last commit against the one before
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import per_call_us
from bench_trainer import workbench_config

import workbench.train.trainer as trainer_module
from workbench.corpus import Corpus
from workbench.datasets import fetch_known
from workbench.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def models_at(revision: str, folder: Path) -> ModuleType:
    """``workbench/models.py`` as it was at ``revision``, imported as a module of its own."""
    source = git("show", f"{revision}:workbench/models.py")
    if source == (ROOT / "workbench" / "models.py").read_text():
        print(f"note: workbench/models.py is the same at {revision}: expect 1.00x")
    path = folder / "models_other.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("models_other", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_with(build_model: Any, rung: int, corpus: Corpus) -> trainer_module.Trainer:
    own = trainer_module.build_model
    trainer_module.build_model = build_model
    try:
        return trainer_module.Trainer(workbench_config(rung, None, 1337), corpus)
    finally:
        trainer_module.build_model = own


def eval_ms(trainer: trainer_module.Trainer) -> float:
    start = time.perf_counter()
    trainer.evaluate()
    return (time.perf_counter() - start) * 1e3


def compare(
    other: ModuleType, rung: int, corpus: Corpus, repeats: int, steps: int
) -> dict[str, Any]:
    trainers = {
        "other": trainer_with(other.build_model, rung, corpus),
        "tree": trainer_with(trainer_module.build_model, rung, corpus),
    }
    losses = {name: [t.step().item() for _ in range(20)] for name, t in trainers.items()}
    if not all(abs(a - b) < 1e-4 for a, b in zip(*losses.values(), strict=True)):
        raise SystemExit(f"rung {rung}: the two models' losses differ: {losses}")
    steps_taken: dict[str, list[float]] = {name: [] for name in trainers}
    evals: dict[str, list[float]] = {name: [] for name in trainers}
    for t in trainers.values():
        per_call_us(t.step, steps // 3)  # warm-up
    for repeat in range(repeats):
        order = list(trainers.items())
        for name, t in order if repeat % 2 else reversed(order):  # each side goes first in turn
            steps_taken[name].append(per_call_us(t.step, steps))
            evals[name].append(eval_ms(t))
    return {
        "rung": rung,
        "other_step_us": statistics.median(steps_taken["other"]),
        "tree_step_us": statistics.median(steps_taken["tree"]),
        "step_speedup": statistics.median(
            a / b for a, b in zip(steps_taken["other"], steps_taken["tree"], strict=True)
        ),
        "other_eval_ms": statistics.median(evals["other"]),
        "tree_eval_ms": statistics.median(evals["tree"]),
        "eval_speedup": statistics.median(
            a / b for a, b in zip(evals["other"], evals["tree"], strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--rungs", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300, help="steps per timing")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ab_models.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    corpus = Corpus.from_file(fetch_known("tinyshakespeare", load_settings().data_dir))
    commit = git("rev-parse", "--short", args.against).strip()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        other = models_at(args.against, Path(folder))
        for rung in args.rungs:
            row = compare(other, rung, corpus, args.repeats, args.steps)
            rows.append(row)
            print(
                f"rung {rung}: step {row['other_step_us']:.0f} us at {commit}, "
                f"{row['tree_step_us']:.0f} us now ({row['step_speedup']:.3f}x); eval "
                f"{row['other_eval_ms']:.1f} ms, {row['tree_eval_ms']:.1f} ms "
                f"({row['eval_speedup']:.3f}x)",
                flush=True,
            )
    report = {"against": commit, "threads": 1, "repeats": args.repeats, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
