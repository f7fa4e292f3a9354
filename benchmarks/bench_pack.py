"""Packed training steps (``workbench.train.packed``) against the same members' solo steps.

For single_head and multi_head (n_embd 32, batch 32) at blocks 8 and 32 and packs of K = 1, 9
and 27 members: a member-step per second of ``PackedTrainer.step`` (K members per call) against
``Trainer.step`` of one solo run (K calls for the same work). Both in one process, one torch
thread, the attention backend ``auto`` picks; medians over the repeats, the two interleaved.

    python benchmarks/bench_pack.py --repeats 3          # writes benchmarks/pack.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import per_call_us

from workbench.corpus import Corpus
from workbench.datasets import fetch_known
from workbench.settings import load_settings
from workbench.spec import RunConfig
from workbench.train.factory import build_trainer
from workbench.train.packed import build_packed_trainer

KINDS = ("single_head", "multi_head")
BLOCKS = (8, 32)
PACKS = (1, 9, 27)


def config(kind: str, block_size: int, seed: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "data": {"dataset": "tinyshakespeare"},
            "train": {"block_size": block_size, "batch_size": 32, "device": "cpu", "threads": 1},
            "model": {"kind": kind, "n_embd": 32, "n_head": 4},
            "seed": seed,
        }
    )


def measure(corpus: Corpus, kind: str, block: int, members: int, steps: int) -> tuple[float, float]:
    """Member-steps per second: packed, solo."""
    configs = [config(kind, block, seed) for seed in range(members)]
    pack = build_packed_trainer(configs, corpus, [None] * members, [None] * members)
    solo = build_trainer(configs[0], corpus)
    for _ in range(3):  # warm-up: per_call_us warms up only a tenth of the calls
        pack.step()
        solo.step()
    packed = members / per_call_us(pack.step, max(5, steps // members)) * 1e6
    return packed, 1 / per_call_us(solo.step, steps) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="solo steps per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pack.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    corpus = Corpus.from_file(fetch_known("tinyshakespeare", load_settings().data_dir))
    rows = []
    for kind in KINDS:
        for block in BLOCKS:
            for members in PACKS:
                runs = [
                    measure(corpus, kind, block, members, args.steps) for _ in range(args.repeats)
                ]
                packed = statistics.median(r[0] for r in runs)
                solo = statistics.median(r[1] for r in runs)
                rows.append(
                    {"kind": kind, "block_size": block, "members": members,
                     "packed_member_steps_per_s": round(packed, 1),
                     "solo_steps_per_s": round(solo, 1), "speedup": round(packed / solo, 2)}
                )  # fmt: skip
                print(
                    f"{kind:11s} block {block:2d} K={members:2d}: packed {packed:7.1f} "
                    f"member-steps/s, solo {solo:7.1f} steps/s, {packed / solo:.2f}x",
                    flush=True,
                )
    report = {
        "machine": f"{platform.machine()} {platform.processor()}",
        "torch": torch.__version__,
        "threads": 1,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
