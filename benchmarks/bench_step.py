"""The two pieces of a training step that workbench writes itself, against PyTorch's own.

1. Attention forward plus backward: ``TinyCausalAttention`` (PyTorch ops) and the compiled kernel
   of ``workbench.models.native`` (the ``torch`` and ``native`` attention backends) against
   SDPA's CPU kernel, on the lecture's rungs and the ablation's block sizes (batch 32); then the
   eval's forward alone (512 windows, no grad).
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

from workbench.corpus import Corpus
from workbench.datasets import fetch_known
from workbench.models.attention import TinyCausalAttention, causal_bias
from workbench.models.native import MAX_BLOCK, tiny_attention
from workbench.settings import load_settings
from workbench.train.factory import build_trainer

ATTENTION_SHAPES = [(1, 8, 32), (4, 8, 8), (4, 16, 8), (4, 32, 8), (4, 64, 8), (6, 64, 64)]


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def attention_calls(batch: int, n_head: int, T: int, hs: int) -> dict[str, Callable[[], None]]:
    """Forward plus backward through SDPA, TinyCausalAttention and the compiled kernel (where
    this machine can build it), same inputs."""
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

    calls = {"sdpa": sdpa, "tiny": tiny}
    kernel = tiny_attention(hs)
    if kernel is not None and T <= MAX_BLOCK:

        def native() -> None:
            kernel(qkv, n_head, T).backward(grad)
            qkv.grad = None

        calls["native"] = native
    return calls


def median_pair(
    theirs: Callable[[], Any], ours: Callable[[], Any], calls: int, repeats: int
) -> tuple[float, float]:
    """Median µs per call of two functions, measured interleaved."""
    first, second = medians([theirs, ours], calls, repeats)
    return first, second


def medians(functions: list[Callable[[], Any]], calls: int, repeats: int) -> list[float]:
    """Median µs per call of each function, measured interleaved."""
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for fn, samples in zip(functions, times, strict=True):
            samples.append(per_call_us(fn, calls))
    return [statistics.median(samples) for samples in times]


def attention_rows(repeats: int, batch: int = 32) -> list[dict[str, Any]]:
    rows = []
    for n_head, T, hs in ATTENTION_SHAPES:
        calls = attention_calls(batch, n_head, T, hs)
        times = medians(list(calls.values()), 200 if T * hs >= 4096 else 1000, repeats)
        us = dict(zip(calls, times, strict=True))
        shape = [batch, n_head, T, hs]
        row: dict[str, Any] = {"shape (B, nh, T, hs)": shape}
        row.update({f"{name}_us": value for name, value in us.items()})
        row["speedup"] = us["sdpa"] / us["tiny"]  # TinyCausalAttention against SDPA
        line = f"attention {shape}: SDPA {us['sdpa']:.0f} us, tiny {us['tiny']:.0f} us"
        if "native" in us:
            row["native_speedup"] = us["sdpa"] / us["native"]
            row["native_over_tiny"] = us["tiny"] / us["native"]
            line += f", native {us['native']:.0f} us ({us['tiny'] / us['native']:.2f}x tiny)"
        rows.append(row)
        print(line, flush=True)
    return rows


def eval_attention_rows(repeats: int, windows: int = 512) -> list[dict[str, Any]]:
    """The eval's forward pass: no autograd, 512 windows at a time."""
    rows = []
    for n_head, T, hs in [(1, 8, 32), (4, 8, 8)]:
        kernel = tiny_attention(hs)
        if kernel is None:
            break
        qkv = torch.randn(windows * T, 3 * n_head * hs)
        bias = causal_bias(T)
        with torch.no_grad():
            tiny_us, native_us = median_pair(
                lambda: TinyCausalAttention.apply(qkv, n_head, bias),  # noqa: B023
                lambda: kernel(qkv, n_head, T),  # noqa: B023
                200,
                repeats,
            )
        shape = [windows, n_head, T, hs]
        rows.append({"shape (B, nh, T, hs)": shape, "tiny_us": tiny_us, "native_us": native_us,
                     "native_over_tiny": tiny_us / native_us})  # fmt: skip
        print(f"eval attention {shape}: tiny {tiny_us:.0f} us, native {native_us:.0f} us, "
              f"{tiny_us / native_us:.2f}x", flush=True)  # fmt: skip
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
        theirs = build_trainer(workbench_config(rung, None, 1337), corpus)
        params = [p for p in theirs.model.parameters() if p.requires_grad]
        config = theirs.train_config
        theirs.optimizer = TorchAdamW(params, config.learning_rate, config.weight_decay)  # type: ignore[assignment]
        ours = build_trainer(workbench_config(rung, None, 1337), corpus)
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
        "eval_attention": eval_attention_rows(args.repeats),
        "optimizer": optimizer_rows(corpus, args.repeats, args.steps),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
