"""Rung 7 of the lecture on a GPU: training tokens/s and model FLOPs utilisation, eager against
``compile: true`` interleaved in one process, and optionally the whole 5000-step run.

The config is ``experiments/lecture.yaml``'s ``r7_scaled_up`` (10.8M parameters, batch 64 x
block 256, 6 layers of 384), trained by workbench's own ``Trainer`` (bf16 autocast, TF32, fused
AdamW, SDPA's flash kernel). Steps are timed between ``torch.cuda.synchronize()`` calls after a
warm-up (which also absorbs compilation).

FLOPs per trained token follow the PaLM paper's appendix B (nanoGPT's ``estimate_mfu`` too):
``6 * N + 12 * n_layer * n_embd * block_size``, with ``N`` the weights of the matmuls (the
embedding tables are lookups, not matmuls) and the attention counted in full, not halved for the
causal mask. MFU divides the achieved FLOP/s by the GPU's dense bf16 peak.

    python benchmarks/bench_gpu.py                 # writes benchmarks/gpu.json
    python benchmarks/bench_gpu.py --full          # and the whole run: wall time, val loss
    # the script itself, on any machine (a minute on a CPU):
    python benchmarks/bench_gpu.py --device cpu --steps 2 --warmup 1 --repeats 1 --full \
        --set train.max_iters=2 --set train.eval_interval=2 --set train.eval_iters=1 \
        --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.corpus import Corpus
from workbench.datasets import fetch_known
from workbench.grid import expand
from workbench.settings import load_settings
from workbench.spec import RunConfig
from workbench.train.factory import build_trainer
from workbench.train.process import prepare_process
from workbench.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity), matched in this order
# against the device name, so that "H100 NVL" is not read as an H100 SXM nor "L40S" as an L4.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H200", 989.4),  # SXM
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def rung7_config(device: str, compile: bool, sets: list[str]) -> RunConfig:
    sets = [f"train.device={device}", f"train.compile={str(compile).lower()}", *sets]
    plan = expand(REPO / "experiments" / "lecture.yaml", sets=sets, only=["r7*"])
    (run,) = plan.runs
    return run.config


def flops_per_token(model: nn.Module, config: RunConfig) -> float:
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 12 * config.model.n_layer * config.model.n_embd * config.train.block_size
    return 6 * matmul_weights + attention


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None  # unknown: no MFU unless --peak-tflops gives the peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps, the GPU's queue drained on both sides."""
    synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    synchronize(trainer.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["eager", "compile"],
        default=None,
        help="default: eager and compile on CUDA, eager elsewhere",
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps (and compilation)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by GPU name")
    parser.add_argument("--full", action="store_true", help="also the whole 5000-step run")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="as workbench run --set, on every config (e.g. train.max_iters=20)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("gpu.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    modes = args.modes or (["eager", "compile"] if device.type == "cuda" else ["eager"])
    corpus = Corpus.from_file(fetch_known("tinyshakespeare", load_settings().data_dir))
    configs = {mode: rung7_config(args.device, mode == "compile", args.sets) for mode in modes}
    for config in configs.values():
        prepare_process(config.train)  # TF32 on CUDA
    trainers = {mode: build_trainer(config, corpus) for mode, config in configs.items()}
    for trainer in trainers.values():
        time_steps(trainer, args.warmup)
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode, trainer in trainers.items():  # interleaved: drift hits both alike
            samples[mode].append(time_steps(trainer, args.steps))

    peak = peak_flops(device, args.peak_tflops)
    any_mode = next(iter(trainers))
    any_trainer, train = trainers[any_mode], configs[any_mode].train
    per_token = flops_per_token(any_trainer.model, configs[any_mode])
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "config": "experiments/lecture.yaml r7_scaled_up",
        "params": any_trainer.model.num_params(),
        "flops_per_token": per_token,
        "peak_flops": peak,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "modes": {},
    }
    for mode, seconds in samples.items():
        step_s = statistics.median(seconds) / args.steps
        tokens_per_sec = train.batch_size * train.block_size / step_s
        achieved = tokens_per_sec * per_token
        report["modes"][mode] = {
            "step_ms": step_s * 1e3,
            "step_ms_per_repeat": [s / args.steps * 1e3 for s in seconds],
            "tokens_per_sec": tokens_per_sec,
            "achieved_tflops": achieved / 1e12,
            "mfu": achieved / peak if peak else None,
        }
        mfu = f"MFU {achieved / peak:.1%}" if peak else "MFU: unknown peak (--peak-tflops)"
        print(
            f"{mode}: {step_s * 1e3:.1f} ms/step, {tokens_per_sec:,.0f} tok/s, "
            f"{achieved / 1e12:.3g} TFLOP/s, {mfu}",
            flush=True,
        )
    if "eager" in samples and "compile" in samples:
        ratios = [e / c for e, c in zip(samples["eager"], samples["compile"], strict=True)]
        report["compile_speedup"] = statistics.median(ratios)
        print(f"compile: {report['compile_speedup']:.2f}x eager", flush=True)
    del trainers

    if args.full:
        mode = "compile" if "compile" in modes else "eager"
        start = time.perf_counter()
        result = build_trainer(configs[mode], corpus).fit()
        report["full_run"] = {
            "mode": mode,
            "status": result.status,
            "steps": result.step,
            "whole_time_s": time.perf_counter() - start,
            "loop_time_s": result.loop_time_s,
            "final_val_loss": result.final_val_loss,
            "best_val_loss": result.best_val_loss,
            "max_iters": train.max_iters,
            "lecture_val_loss": 1.48,  # 5000 steps on one A100, about 15 minutes
            "tokens_per_sec": result.tokens_per_sec,
        }
        print(f"full run ({mode}): {report['full_run']}", flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
