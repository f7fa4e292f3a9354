"""A :class:`Trainer` and its parts, built from a run's config and its corpus.

The one place that knows both a run's config and the trainer: the model (from the ladder), its
optimizer, the batch sampler and the fixed eval sets. Call
:func:`workbench.train.process.prepare_process` first, where the job starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from workbench.corpus import BatchSampler, Corpus, eval_set
from workbench.models import attention_head_size, build_model
from workbench.models.attention import resolve_attention
from workbench.spec import ATTENTION_KINDS, RunConfig
from workbench.train.optim import FlatAdamW
from workbench.train.process import resolve_device
from workbench.train.trainer import Callback, Trainer

ATTENTION_PROMPT_CHARS = 32  # the prompt of the attention maps a run ends with


def build_trainer(
    config: RunConfig,
    corpus: Corpus,
    callback: Callback | None = None,
    run_dir: Path | None = None,
    *,
    log_interval: int = 10,
    checkpoint_every_s: float = 0.0,
    fused: bool | None = None,
) -> Trainer:
    """The trainer of one run; ``fit()`` resumes from ``run_dir``'s checkpoint if it has one.

    Seeds torch's global generator with ``config.seed`` right before building the model: the
    initial weights draw from it, then dropout during training, so the same seed gives the same
    run. This is the one process-wide change made here (threads and TF32 are
    ``prepare_process``'s). The batch sampler and the eval sets draw from generators of their
    own, seeded from the same seed.
    """
    train = config.train
    device = resolve_device(train.device)
    attention = None
    if config.model.kind in ATTENTION_KINDS:  # chosen here, once; the model is handed it
        head_size = attention_head_size(config.model)
        attention = resolve_attention(
            train.attention, device, train.block_size, head_size, config.model.dropout
        )
    torch.manual_seed(config.seed)
    model = build_model(config.model, corpus.tokenizer.vocab_size, train.block_size, attention)
    model = model.to(device)
    forward_model: Any = model
    if train.compile and device.type == "cuda":
        forward_model = torch.compile(model)
    optimizer = FlatAdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train.learning_rate,
        weight_decay=train.weight_decay,
        fused=fused,  # None: torch's fused kernel where it has one (a resume: as it started)
    )
    sampler = BatchSampler(corpus.train, train.block_size, train.batch_size, config.seed)
    eval_sets = {
        split: eval_set(
            corpus.split(split),
            train.block_size,
            train.batch_size,
            train.eval_iters,
            config.seed,
            split,
        )
        for split in ("train", "val")
    }
    width = max(corpus.tokenizer.vocab_size, 4 * config.model.n_embd)  # the widest activation
    return Trainer(
        model,
        optimizer,
        sampler,
        eval_sets,
        train,
        device=device,
        forward_model=forward_model,
        eval_rows=rows_per_pass(device, train.block_size, width),
        tokenizer=corpus.tokenizer,
        attention_prompt=corpus.val[: min(train.block_size, ATTENTION_PROMPT_CHARS)],
        seed=config.seed,
        callback=callback,
        run_dir=run_dir,
        log_interval=log_interval,
        checkpoint_every_s=checkpoint_every_s,
    )


def rows_per_pass(device: torch.device, block_size: int, width: int) -> int:
    """How many eval windows one forward pass takes: a budget of activation floats."""
    # On a CPU, passes of ~512 windows of a small model stay in cache: 30% faster than one
    # pass over the whole eval set (measured on rung 6; see benchmarks/RESULTS.md).
    budget = (1 << 27) if device.type == "cuda" else (1 << 19)
    return max(1, budget // (block_size * width))
