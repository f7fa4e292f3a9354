"""workbench's trainer against a lecture-style baseline, side by side in one process.

Same config, same steps, same eval sample size (``eval_iters`` batches per split: random batches
in the baseline, a fixed set in workbench) for docs/lecture.md rungs 0, 2, 3, 4 and 6, one torch
thread each by default (one run per core is how workbench runs grids on a CPU). The two are
interleaved and repeated; medians are reported.

Both sides are timed over the same span, the training steps and the evals (the baseline's loop;
workbench's ``TrainResult.loop_time_s``). Workbench's whole ``build_trainer(...).fit()``, which also
builds the model and eval sets and ends by generating a 500-character sample and the attention
maps, is reported beside it (``workbench_whole_time_s``, ``speedup_whole``).

    python benchmarks/bench_trainer.py --repeats 3            # writes benchmarks/trainer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lecture_baseline import RUNGS, train_lecture_rung

from workbench.corpus import Corpus
from workbench.datasets import fetch_known
from workbench.settings import load_settings
from workbench.spec import RunConfig

# The lecture rungs as workbench configs (the same as experiments/lecture.yaml).
MODELS: dict[int, dict[str, Any]] = {
    0: {"kind": "bigram"},
    2: {"kind": "single_head"},
    3: {"kind": "multi_head", "n_head": 4},
    4: {
        "kind": "transformer",
        "n_layer": 1,
        "ffwd": "linear",
        "residual": False,
        "layernorm": False,
        "proj": False,
    },
    6: {
        "kind": "transformer",
        "n_layer": 3,
        "ffwd": "mlp",
        "residual": True,
        "layernorm": True,
        "proj": True,
    },
}


def workbench_config(rung: int, max_iters: int | None, seed: int) -> RunConfig:
    lecture = RUNGS[rung]
    iters = max_iters or lecture["max_iters"]
    return RunConfig.model_validate(
        {
            "data": {"dataset": "tinyshakespeare"},
            "train": {
                "batch_size": lecture["batch_size"],
                "block_size": lecture["block_size"],
                "max_iters": iters,
                "eval_interval": min(lecture["eval_interval"], iters),
                "eval_iters": lecture["eval_iters"],
                "learning_rate": lecture["learning_rate"],
                "device": "cpu",
            },
            "model": {"n_embd": lecture.get("n_embd") or 32, **MODELS[rung]},
            "seed": seed,
        }
    )


def run_workbench(rung: int, corpus: Corpus, max_iters: int | None, seed: int) -> dict[str, Any]:
    # Imported here: ab_models.py imports workbench_config from this file beside an older
    # revision of the package, which has no factory.
    from workbench.train.factory import build_trainer
    from workbench.train.process import prepare_process

    config = workbench_config(rung, max_iters, seed)
    prepare_process(config.train)
    start = time.perf_counter()
    result = build_trainer(config, corpus).fit()
    whole = time.perf_counter() - start  # setup, train, evals, the final sample and attention map
    tokens = config.train.max_iters * config.train.batch_size * config.train.block_size
    return {
        "wall_time_s": result.loop_time_s,  # train plus evals: the span the baseline times
        "whole_time_s": whole,
        "tokens_per_sec": tokens / result.loop_time_s,
        "final_val_loss": result.final_val_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rungs", type=int, nargs="+", default=[0, 2, 3, 4, 6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-iters", type=int, default=None, help="default: the lecture's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("trainer.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = fetch_known("tinyshakespeare", load_settings().data_dir)
    text = path.read_text(encoding="utf-8")
    corpus = Corpus.from_text(text)
    rows = []
    for rung in args.rungs:
        samples: dict[str, list[dict[str, Any]]] = {"baseline": [], "workbench": []}
        for repeat in range(args.repeats):
            seed = 1337 + repeat
            base = train_lecture_rung(rung, text, max_iters=args.max_iters, seed=seed)
            samples["baseline"].append(base)
            samples["workbench"].append(run_workbench(rung, corpus, args.max_iters, seed))
        row: dict[str, Any] = {"rung": rung}
        for name, runs in samples.items():
            for key in ("wall_time_s", "tokens_per_sec", "final_val_loss"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in runs)
        ratios = [
            b["wall_time_s"] / w["wall_time_s"]
            for b, w in zip(samples["baseline"], samples["workbench"], strict=True)
        ]
        row["speedup"] = statistics.median(ratios)
        row["speedup_per_repeat"] = ratios  # each pair run back to back: the spread is noise
        row["workbench_whole_time_s"] = statistics.median(
            r["whole_time_s"] for r in samples["workbench"]
        )
        row["speedup_whole"] = statistics.median(
            b["wall_time_s"] / w["whole_time_s"]
            for b, w in zip(samples["baseline"], samples["workbench"], strict=True)
        )
        row["val_loss_diff"] = row["workbench_final_val_loss"] - row["baseline_final_val_loss"]
        rows.append(row)
        print(
            f"rung {rung}: baseline {row['baseline_wall_time_s']:.1f}s "
            f"{row['baseline_tokens_per_sec']:,.0f} tok/s val {row['baseline_final_val_loss']:.4f}"
            f" | workbench {row['workbench_wall_time_s']:.1f}s "
            f"{row['workbench_tokens_per_sec']:,.0f} tok/s val "
            f"{row['workbench_final_val_loss']:.4f} | speedup {row['speedup']:.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) "
            f"(with setup and final sample {row['speedup_whole']:.2f}x)",
            flush=True,
        )
    report = {
        "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} cores)",
        "threads_per_run": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "max_iters": args.max_iters or "lecture",
        "wall_time_s": "train steps plus evals, both sides; workbench_whole_time_s: whole fit()",
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
