"""A trained model as a ``torch.export`` program: token ids (B, T) in, logits (B, T, vocab) out.

What a run logs as its MLflow model. The program is traced from a model of the same shape built
with the SDPA backend (a C kernel cannot be traced), with a dynamic batch and a dynamic time
dimension up to the block size. Tracing costs a few hundred milliseconds (seconds the first time
in a process), so each process keeps one program per model shape and, for each run, copies the
run's weights into it: the program then computes exactly the run's logits.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram

from workbench.models.attention import SDPA
from workbench.models.ladder import LanguageModel, build_model

CACHED_SHAPES = 16  # programs kept per process (the ablation has 15 model shapes)

_programs: OrderedDict[tuple[str, int, int], ExportedProgram] = OrderedDict()


class NextTokenLogits(nn.Module):
    """``model.logits`` with the time dimension padded to the block size inside: every model of
    the ladder is causal, so the first T positions of a padded block are the logits of the T
    tokens alone, and the ladder's code sees only its one static block length."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model = model
        self.block_size = model.block_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids, T ≤ block_size, in; (B, T, vocab) logits out."""
        T = idx.size(1)
        block = F.pad(idx, (0, self.block_size - T))  # (B, block_size)
        logits = self.model.logits(block)  # (B, block_size, vocab)
        # index_select, not a slice: a slice of a static length by a dynamic one makes
        # torch.export guard T against the block size.
        return logits.index_select(1, torch.arange(T, device=idx.device))


def example_input(block_size: int) -> torch.Tensor:
    """A (2, T) batch to trace with: sizes 0 and 1 would be traced as constants, and T equal to
    the block size as one too (no padding)."""
    return torch.zeros(2, min(2, block_size), dtype=torch.int64)


def export_logits(model: LanguageModel) -> ExportedProgram:
    """A program computing ``model``'s logits, holding a copy of its current weights (on the
    CPU). The program is this process's one for the model's shape: valid until the next call
    for a model of the same shape."""
    key = (model.config.model_dump_json(), model.vocab_size, model.block_size)
    program = _programs.get(key)
    if program is None:
        program = _trace(model)
        _programs[key] = program
        if len(_programs) > CACHED_SHAPES:
            _programs.popitem(last=False)
    else:
        _programs.move_to_end(key)
    weights = model.state_dict()
    with torch.no_grad():
        for name, tensor in program.state_dict.items():
            tensor.copy_(weights[name.removeprefix("model.")])
    return program


def _trace(model: LanguageModel) -> ExportedProgram:
    """Trace a fresh CPU model of ``model``'s shape built with SDPA attention."""
    fresh = build_model(model.config, model.vocab_size, model.block_size, attention=SDPA)
    module = NextTokenLogits(fresh).eval()
    example = example_input(model.block_size)
    time = {1: Dim("time", min=1, max=model.block_size)} if model.block_size > 1 else {}
    return torch.export.export(
        module, (example,), dynamic_shapes=({0: Dim("batch", min=1), **time},)
    )
