"""A/B of model code: the working tree's ``workbench`` package against another commit's, on the
lecture's rungs, one torch thread each, timed alternately.

This machine's speed drifts by 10% or more between runs minutes apart, more than most single
changes to the model code gain; two trainers timed in turn see the same drift. Each side is a
worker process that imports its own whole ``workbench`` (the other commit's is unpacked with
``git archive`` into a temporary folder) and builds the trainer of ``workbench_config(rung)``; the
parent tells one worker at a time to run, so the two never compete for a core. Their losses must
agree (the same math), and the script checks that they do before timing.

    python benchmarks/ab_models.py                 # uncommitted changes against HEAD
    python benchmarks/ab_models.py --against 5974aa9 --repeats 9
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
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def package_at(revision: str, folder: Path) -> Path:
    """The folder holding ``workbench/`` as it was at ``revision``."""
    archive = subprocess.run(
        ["git", "archive", revision, "workbench"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    if not git("diff", "--stat", revision, "--", "workbench"):
        print(f"note: workbench/ is the same at {revision}: expect 1.00x")
    return folder


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    """As ``bench_step.per_call_us`` (not imported: it imports the tree's models)."""
    for _ in range(calls // 10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


class Worker:
    """One side: a process with ``root``'s ``workbench`` first on its path, answering requests."""

    def __init__(self, root: Path, rung: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(BENCHMARKS)])}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(root), "--rungs", str(rung)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **request: Any) -> Any:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise SystemExit(f"a worker died (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def serve(root: Path, rung: int, requests: IO[str], answers: IO[str]) -> None:
    """The worker's side: build the trainer from ``root``'s package, then step and time it."""
    sys.path[:0] = [str(root), str(BENCHMARKS)]
    # workbench first: the benchmark helpers put the working tree on sys.path, but a package
    # already imported finds its submodules in its own folder.
    import workbench  # isort: skip
    import torch
    from bench_trainer import workbench_config

    from workbench.corpus import Corpus
    from workbench.datasets import fetch_known
    from workbench.settings import load_settings

    assert Path(workbench.__file__).resolve().is_relative_to(root.resolve()), workbench.__file__
    torch.set_num_threads(1)
    corpus = Corpus.from_file(fetch_known("tinyshakespeare", load_settings().data_dir))
    config = workbench_config(rung, None, 1337)
    try:  # a trainer handed its parts, built by the factory
        from workbench.train.factory import build_trainer

        trainer = build_trainer(config, corpus)
    except ImportError:  # revisions before it: the trainer built its own parts
        from workbench.train.trainer import Trainer

        trainer = Trainer(config, corpus)  # type: ignore[call-arg,arg-type]
    for line in requests:
        request = json.loads(line)
        if request["do"] == "losses":
            answer: Any = [trainer.step().item() for _ in range(request["steps"])]
        elif request["do"] == "warm_up":
            answer = per_call_us(trainer.step, request["steps"])
        else:
            step_us = per_call_us(trainer.step, request["steps"])
            start = time.perf_counter()
            trainer.evaluate()
            answer = {"step_us": step_us, "eval_ms": (time.perf_counter() - start) * 1e3}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def compare(other_root: Path, rung: int, repeats: int, steps: int) -> dict[str, Any]:
    workers = {"other": Worker(other_root, rung), "tree": Worker(ROOT, rung)}
    try:
        losses = {name: w.ask(do="losses", steps=20) for name, w in workers.items()}
        if not all(abs(a - b) < 1e-4 for a, b in zip(*losses.values(), strict=True)):
            raise SystemExit(f"rung {rung}: the two models' losses differ: {losses}")
        for w in workers.values():
            w.ask(do="warm_up", steps=steps // 3)
        step_us: dict[str, list[float]] = {name: [] for name in workers}
        eval_ms: dict[str, list[float]] = {name: [] for name in workers}
        for repeat in range(repeats):
            order = list(workers.items())
            for name, w in order if repeat % 2 else reversed(order):  # each goes first in turn
                timing = w.ask(do="time", steps=steps)
                step_us[name].append(timing["step_us"])
                eval_ms[name].append(timing["eval_ms"])
    finally:
        for w in workers.values():
            w.close()
    return {
        "rung": rung,
        "other_step_us": statistics.median(step_us["other"]),
        "tree_step_us": statistics.median(step_us["tree"]),
        "step_speedup": statistics.median(
            a / b for a, b in zip(step_us["other"], step_us["tree"], strict=True)
        ),
        "other_eval_ms": statistics.median(eval_ms["other"]),
        "tree_eval_ms": statistics.median(eval_ms["tree"]),
        "eval_speedup": statistics.median(
            a / b for a, b in zip(eval_ms["other"], eval_ms["tree"], strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--rungs", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300, help="steps per timing")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ab_models.json"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one side
    args = parser.parse_args()
    if args.worker is not None:
        serve(args.worker, args.rungs[0], sys.stdin, sys.stdout)
        return

    commit = git("rev-parse", "--short", args.against).strip()
    tree = git("rev-parse", "--short", "HEAD").strip() + ("+" if git("status", "--short") else "")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        other_root = package_at(args.against, Path(folder))
        for rung in args.rungs:
            row = compare(other_root, rung, args.repeats, args.steps)
            rows.append(row)
            print(
                f"rung {rung}: step {row['other_step_us']:.0f} us at {commit}, "
                f"{row['tree_step_us']:.0f} us now ({row['step_speedup']:.3f}x); eval "
                f"{row['other_eval_ms']:.1f} ms, {row['tree_eval_ms']:.1f} ms "
                f"({row['eval_speedup']:.3f}x)",
                flush=True,
            )
    report = {
        "against": commit,
        "tree": tree,
        "threads": 1,
        "repeats": args.repeats,
        "steps": args.steps,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
