"""Load a finished run's weights and tokenizer back from MLflow and generate text."""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError, first_line
from workbench.spec import clip
from workbench.store import client
from workbench.tracking import PLAN_TAG, TAG, WORKBENCH_RUNS

MAX_CANDIDATES = 20  # runs listed when a name or key is ambiguous


class AmbiguousRunError(WorkbenchError):
    """A name or key that matches runs of different configs: one line per candidate."""

    def __init__(self, lines: list[str]) -> None:
        self.problems = lines
        super().__init__("\n".join(lines))

    def lines(self) -> list[str]:
        return self.problems


def find_run_id(tracking_uri: str, run: str, experiment: str | None = None) -> str:
    """``run`` is an MLflow run id, a run name or a run key (``workbench.run_key``): the newest
    FINISHED run it names, refused when it names runs of different configs (keys)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        by_id = mlflow_client.get_run(run)
    except MlflowException:
        pass
    else:
        if PLAN_TAG in by_id.data.tags:  # a sweep's parent holds no model
            raise WorkbenchError(
                f"run {clip(run)} is a sweep's parent run, not a trained run: pass the id, "
                "name or key of one of its runs"
            )
        return str(by_id.info.run_id)
    names = {
        e.experiment_id: e.name
        for e in mlflow_client.search_experiments()
        if experiment is None or e.name == experiment
    }
    found = _finished_runs(mlflow_client, list(names), run)
    if not found:
        raise WorkbenchError(
            f"no finished run named, with id or with key {clip(repr(run))} in {tracking_uri}"
        )
    if len({r.data.tags.get(TAG + "run_key") for r in found}) > 1:
        raise AmbiguousRunError(_candidates(run, found, names))
    return str(found[0].info.run_id)


def _finished_runs(mlflow_client: Any, experiment_ids: list[str], run: str) -> list[Any]:
    """Finished workbench runs whose name or run key is ``run``, newest first."""
    if not experiment_ids:
        return []
    escaped = run.replace("'", "\\'")
    found: dict[str, Any] = {}
    for match in (f"attributes.run_name = '{escaped}'", f"tags.`{TAG}run_key` = '{escaped}'"):
        for hit in mlflow_client.search_runs(
            experiment_ids,
            filter_string=f"{match} and attributes.status = 'FINISHED' and {WORKBENCH_RUNS}",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        ):
            found[hit.info.run_id] = hit
    return sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True)


def _candidates(run: str, found: list[Any], experiments: dict[str, str]) -> list[str]:
    keys = {r.data.tags.get(TAG + "run_key") for r in found}
    lines = [
        f"{clip(repr(run))} names {len(found)} finished runs of {len(keys)} different configs; "
        "pass a run id or a run key (--experiment narrows a name):"
    ]
    for hit in found[:MAX_CANDIDATES]:
        started = datetime.fromtimestamp((hit.info.start_time or 0) / 1000, tz=timezone.utc)
        lines.append(
            f"  run id {hit.info.run_id}  key {hit.data.tags.get(TAG + 'run_key')}  "
            f"experiment {clip(experiments.get(hit.info.experiment_id, '?'))}  "
            f"started {started:%Y-%m-%d %H:%M:%S} UTC  name {clip(hit.info.run_name or '')}"
        )
    if len(found) > MAX_CANDIDATES:
        lines.append(f"  ... and {len(found) - MAX_CANDIDATES} more")
    return lines


def generate_text(
    tracking_uri: str,
    run: str,
    prompt: str = "\n",
    tokens: int = 500,
    temperature: float = 1.0,
    seed: int | None = None,
    experiment: str | None = None,
) -> str:
    import torch
    from pydantic import ValidationError

    from workbench.corpus import CharTokenizer
    from workbench.models import build_model
    from workbench.spec import RunConfig

    run_id = find_run_id(tracking_uri, run, experiment)
    mlflow_client = client(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        try:
            weights = Path(mlflow_client.download_artifacts(run_id, "model.pt", folder))
            tokenizer_file = Path(
                mlflow_client.download_artifacts(run_id, "tokenizer.json", folder)
            )
        except Exception as exc:
            raise WorkbenchError(
                f"run {run}: no model.pt/tokenizer.json artifacts ({exc})"
            ) from None
        saved = _load_weights(weights, run)
        tokenizer = CharTokenizer.load(tokenizer_file)
    try:
        config = RunConfig.model_validate(saved["config"])
    except (KeyError, TypeError, ValidationError):
        raise WorkbenchError(f"run {clip(run)}: model.pt holds no valid run config") from None
    model = build_model(config.model, tokenizer.vocab_size, config.train.block_size)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    unknown = sorted({c for c in prompt if c not in tokenizer.chars})
    if unknown:
        raise WorkbenchError(f"--prompt: characters not in the run's vocabulary: {unknown!r}")
    start = torch.tensor([tokenizer.encode(prompt or "\n")])
    generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    out = model.generate(start, tokens, temperature=temperature, generator=generator)
    return tokenizer.decode(out[0].tolist())


def _load_weights(path: Path, run: str) -> Any:
    """``model.pt`` through torch's weights-only unpickler; anything else is refused, unrun."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unsafe pickle, a truncated or foreign file
        raise WorkbenchError(
            f"run {clip(run)}: model.pt refused: not a weights-only file torch can load safely "
            f"({clip(first_line(exc))})"
        ) from None
