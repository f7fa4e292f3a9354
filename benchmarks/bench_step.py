"""The two pieces of a training step that workbench writes itself, against PyTorch's own.

1. Attention forward plus backward: ``TinyCausalAttention`` against SDPA's CPU kernel, on the
   shapes of the lecture's rungs and the ablation's block sizes (batch 32).
2. The optimizer, inside whole trainer steps: ``FlatAdamW`` (one fused kernel call on one flat
   buffer) against ``torch.optim.AdamW(fused=True)`` on the same model.

Both sides interleaved in one process, one torch thread; medians over the repeats.

    python benchmarks/bench_step.py --repeats 5          # writes benchmarks/step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_trainer import workbench_config

from workbench.data import Corpus
from workbench.datasets import fetch_known
from workbench.models import TinyCausalAttention, causal_bias
from workbench.settings import load_settings
from workbench.trainer import Trainer

ATTENTION_SHAPES = [(1, 8, 32), (4, 8, 8), (4, 16, 8), (4, 32, 8), (4, 64, 8), (6, 64, 64)]


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def attention_calls(
    batch: int, n_head: int, T: int, hs: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward plus backward through SDPA and through TinyCausalAttention, same inputs."""
    qkv = torch.randn(batch * T, 3 * n_head * hs, requires_grad=True)  # rows, as models hold them
    grad = torch.randn(batch * T, n_head * hs)
    bias = causal_bias(T)

    def sdpa() -> None:
        heads = qkv.view(batch, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        y = F.scaled_dot_product_attention(*heads.unbind(0), is_causal=True)
        y.transpose(1, 2).reshape(batch * T, n_head * hs).backward(grad)
        qkv.grad = None

    def tiny() -> None:
        TinyCausalAttention.apply(qkv, n_head, bias).backward(grad)
        qkv.grad = None

    return sdpa, tiny


def median_pair(
    theirs: Callable[[], Any], ours: Callable[[], Any], calls: int, repeats: int
) -> tuple[float, float]:
    """Median µs per call of two functions, measured interleaved."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(per_call_us(theirs, calls))
        times[1].append(per_call_us(ours, calls))
    return statistics.median(times[0]), statistics.median(times[1])


def attention_rows(repeats: int, batch: int = 32) -> list[dict[str, Any]]:
    rows = []
    for n_head, T, hs in ATTENTION_SHAPES:
        sdpa, tiny = attention_calls(batch, n_head, T, hs)
        sdpa_us, tiny_us = median_pair(sdpa, tiny, 200 if T * hs >= 4096 else 1000, repeats)
        shape = [batch, n_head, T, hs]
        rows.append(
            {
                "shape (B, nh, T, hs)": shape,
                "sdpa_us": sdpa_us,
                "tiny_us": tiny_us,
                "speedup": sdpa_us / tiny_us,
            }
        )
        print(
            f"attention {shape}: SDPA {sdpa_us:.0f} us, tiny {tiny_us:.0f} us, "
            f"{sdpa_us / tiny_us:.2f}x",
            flush=True,
        )
    return rows


class TorchAdamW:
    """``torch.optim.AdamW(fused=True)`` behind the trainer's optimizer interface."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> None:
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()


def optimizer_rows(corpus: Corpus, repeats: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    for rung in (2, 3, 6):
        theirs = Trainer(workbench_config(rung, None, 1337), corpus)
        params = [p for p in theirs.model.parameters() if p.requires_grad]
        config = theirs.train_config
        theirs.optimizer = TorchAdamW(params, config.learning_rate, config.weight_decay)  # type: ignore[assignment]
        ours = Trainer(workbench_config(rung, None, 1337), corpus)
        torch_us, flat_us = median_pair(theirs.step, ours.step, steps, repeats)
        rows.append(
            {
                "rung": rung,
                "torch_step_us": torch_us,
                "flat_step_us": flat_us,
                "speedup": torch_us / flat_us,
            }
        )
        print(
            f"optimizer, rung {rung} step: torch.optim.AdamW {torch_us:.0f} us, "
            f"FlatAdamW {flat_us:.0f} us, {torch_us / flat_us:.2f}x",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500, help="trainer steps per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("step.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    corpus = Corpus.from_file(fetch_known("tinyshakespeare", load_settings().data_dir))
    report = {
        "machine": f"{platform.machine()} {platform.processor()}",
        "torch": torch.__version__,
        "threads": 1,
        "repeats": args.repeats,
        "attention": attention_rows(args.repeats),
        "optimizer": optimizer_rows(corpus, args.repeats, args.steps),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
