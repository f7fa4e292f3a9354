"""How long what is left takes: seconds per training step of each model shape, measured.

A run's shape is what its step time depends on: the model's config, the block and batch sizes,
the eval cadence and the device. Its seconds per step come from the finished runs of the same
shape anywhere in the experiment (a ``--set`` that changes only ``max_iters`` or the seed still
has them), else from the seconds per token of runs of the same model, of the same kind, or of any
kind, scaled by its tokens per step. During a sweep the runs' own progress refines them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from workbench.grid import Run
from workbench.spec import applicable_config
from workbench.tracking import RunRecord, RunState, flatten

SHAPE_KEYS = ("train.block_size", "train.batch_size", "train.eval_interval", "train.eval_iters",
              "train.device")  # fmt: skip


def params_of(run: Run) -> dict[str, str]:
    """The params a run logs (its applicable config, as strings)."""
    return {k: str(v) for k, v in flatten(applicable_config(run.config)).items()}


def _model(params: Mapping[str, str]) -> str:
    return json.dumps(sorted((k, v) for k, v in params.items() if k.startswith("model.")))


def shape_of(params: Mapping[str, str]) -> str:
    """What a step's time depends on, from a run's params."""
    shape = {k: v for k, v in params.items() if k.startswith("model.") or k in SHAPE_KEYS}
    return json.dumps(sorted(shape.items()))


@dataclass
class StepTimes:
    """Seconds per step by shape, and seconds per token by model and by kind, as measured."""

    per_step: dict[str, list[float]]
    per_token: dict[str, list[float]]  # keyed by a model's config, by its kind, and "*"
    measured: int = 0

    @classmethod
    def of(cls, records: Iterable[RunRecord]) -> StepTimes:
        """From every finished run of the store that logged its wall time and its config."""
        times = cls({}, {})
        for record in records:
            wall = record.metrics.get("wall_time_s")
            if record.state is not RunState.FINISHED or not wall or wall <= 0:
                continue
            try:
                steps = int(record.params["train.max_iters"])
                tokens = steps * int(record.params["train.batch_size"])
                tokens *= int(record.params["train.block_size"])
            except (KeyError, ValueError):  # a run of another tool, or of an older workbench
                continue
            times.add(record.params, wall, steps, tokens)
        return times

    def add(self, params: Mapping[str, str], seconds: float, steps: int, tokens: int) -> None:
        if steps <= 0 or tokens <= 0:
            return
        self.measured += 1
        self.per_step.setdefault(shape_of(params), []).append(seconds / steps)
        for key in (_model(params), params.get("model.kind", "?"), "*"):
            self.per_token.setdefault(key, []).append(seconds / tokens)

    def seconds(self, run: Run, steps: int) -> float | None:
        """The time of ``steps`` steps of ``run``; None with nothing to go by."""
        params = params_of(run)
        rates = self.per_step.get(shape_of(params))
        if rates:
            return statistics.median(rates) * steps
        train = run.config.train
        for key in (_model(params), params.get("model.kind", "?"), "*"):
            if self.per_token.get(key):
                per_token = statistics.median(self.per_token[key])
                return per_token * steps * train.batch_size * train.block_size
        return None
