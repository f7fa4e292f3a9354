"""How far a run's numbers move with the settings that change its float sums, over a grid.

Every run of ``experiments/ablation.yaml`` at block size 8 (5 variants x 3 learning rates x 3
seeds, 5000 steps, the spec's own values), trained in one process under each setting below; per
setting and learning rate, the median and the largest |difference| of the final val loss
(and of the largest difference anywhere on the val curve) from the reference:

- ``reference``: alone, 1 torch thread, ``train.attention: auto`` (what ``workbench run`` does
  on a 2-core CPU: 2 jobs of 1 thread; auto takes the native kernel at block 8 where a C
  compiler is present);
- ``threads=2``: alone, 2 torch threads;
- ``attention=torch``: alone, the torch-ops attention path (the attention rungs only);
- ``packed 9``: each variant's 9 runs as one pack (``--pack``);
- ``packed 3``: the same runs in packs of 3 (one per seed), so a member's pack changes; also
  compared with ``packed 9`` (``packed 3 vs 9``: the same run, packed with other members).

A run's numbers are deterministic under each setting (the tests check resume to 1e-6); these
are the differences between settings, which is why workbench records them on a run when it
first starts and keeps them on every resume.

    python benchmarks/bench_spread.py                    # writes benchmarks/spread.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.corpus import Corpus
from workbench.datasets import fetch_known
from workbench.grid import expand
from workbench.settings import load_settings
from workbench.spec import RunConfig
from workbench.train.factory import build_trainer
from workbench.train.loop import TrainResult
from workbench.train.packed import build_packed_trainer

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "ablation.yaml"


def grid(block_size: int) -> dict[str, list[RunConfig]]:
    """Variant → its runs at ``block_size``, in the plan's order (rates, then seeds)."""
    runs: dict[str, list[RunConfig]] = {}
    for run in expand(SPEC).runs:
        if run.config.train.block_size == block_size:
            runs.setdefault(run.variant, []).append(with_train(run.config, device="cpu"))
    return runs


def with_train(config: RunConfig, **update: object) -> RunConfig:
    return config.model_copy(update={"train": config.train.model_copy(update=update)})


def curve(result: TrainResult) -> list[float]:
    return [point["val_loss"] for point in result.history]


def alone(corpus: Corpus, configs: list[RunConfig], **update: object) -> list[list[float]]:
    out = []
    for config in configs:
        config = with_train(config, **update)
        torch.set_num_threads(config.train.threads or 1)
        out.append(curve(build_trainer(config, corpus).fit()))
    return out


def packed(corpus: Corpus, configs: list[RunConfig], by_seed: bool) -> list[list[float]]:
    """All of ``configs`` as one pack, or one pack per seed."""
    torch.set_num_threads(1)
    configs = [with_train(c, threads=1) for c in configs]
    packs: dict[int, list[int]] = {}
    for i, config in enumerate(configs):
        packs.setdefault(config.seed if by_seed else 0, []).append(i)
    out: list[list[float]] = [[] for _ in configs]
    for members in packs.values():
        chunk = [configs[i] for i in members]
        trainer = build_packed_trainer(chunk, corpus, [None] * len(chunk), [None] * len(chunk))
        for i, result in zip(members, trainer.fit(), strict=True):
            out[i] = curve(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("spread.json"))
    args = parser.parse_args()

    corpus = Corpus.from_file(fetch_known("tinyshakespeare", load_settings().data_dir))
    runs = grid(args.block_size)
    settings = ("threads=2", "attention=torch", "packed 9", "packed 3", "packed 3 vs 9")
    rows = []  # (setting, variant, learning rate, seed, final diff, curve max diff)
    for variant, configs in runs.items():
        reference = alone(corpus, configs, threads=1)
        curves: dict[str, list[list[float]]] = {}
        for setting in settings:
            if setting == "threads=2":
                got = alone(corpus, configs, threads=2)
            elif setting == "attention=torch":
                if configs[0].model.kind not in ("single_head", "multi_head", "transformer"):
                    continue
                got = alone(corpus, configs, threads=1, attention="torch")
            elif setting == "packed 3 vs 9":
                got, reference_here = curves["packed 3"], curves["packed 9"]
            else:
                got = packed(corpus, configs, by_seed=setting == "packed 3")
            curves[setting] = got
            against = reference_here if setting == "packed 3 vs 9" else reference
            for config, mine, theirs in zip(configs, got, against, strict=True):
                worst = max(abs(a - b) for a, b in zip(mine, theirs, strict=True))
                rows.append((setting, variant, config.train.learning_rate, config.seed,
                             abs(mine[-1] - theirs[-1]), worst))  # fmt: skip
            print(variant, setting, "done", flush=True)

    summary = []
    print(f"\n{'setting':<16} {'lr':>7} {'runs':>5} {'median |d final|':>17} "
          f"{'max |d final|':>14} {'max |d curve|':>14}")  # fmt: skip
    for setting in settings:
        for lr in sorted({r[2] for r in rows}):
            picked = [r for r in rows if r[0] == setting and r[2] == lr]
            if not picked:
                continue
            entry = {
                "setting": setting,
                "learning_rate": lr,
                "runs": len(picked),
                "median_final_diff": statistics.median(r[4] for r in picked),
                "max_final_diff": max(r[4] for r in picked),
                "max_curve_diff": max(r[5] for r in picked),
            }
            summary.append(entry)
            print(f"{setting:<16} {lr:>7g} {len(picked):>5} {entry['median_final_diff']:>17.2e} "
                  f"{entry['max_final_diff']:>14.2e} {entry['max_curve_diff']:>14.2e}")  # fmt: skip
    fields = ("setting", "variant", "learning_rate", "seed", "final_diff", "curve_diff")
    figures = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "block_size": args.block_size,
        "summary": summary,
        "runs": [dict(zip(fields, row, strict=True)) for row in rows],
    }
    args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
