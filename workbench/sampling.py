"""Load a finished run's logged model and tokenizer back from MLflow and generate text."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError, first_line
from workbench.spec import clip
from workbench.store import client
from workbench.tracking import PLAN_TAG, TAG, WORKBENCH_RUNS

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

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


def _finished_runs(mlflow_client: MlflowClient, experiment_ids: list[str], run: str) -> list[Any]:
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
    every = sorted({k for r in found for k in r.data.params})
    differ = [k for k in every if len({r.data.params.get(k) for r in found}) > 1]
    lines = [
        f"{clip(repr(run))} names {len(found)} finished runs of {len(keys)} different configs"
        + (f" (they differ in {clip(', '.join(differ))})" if differ else "")
        + "; pass a run id or a run key (--experiment narrows a name):"
    ]
    for hit in found[:MAX_CANDIDATES]:
        started = datetime.fromtimestamp((hit.info.start_time or 0) / 1000, tz=timezone.utc)
        values = " ".join(f"{k}={hit.data.params.get(k, 'unset')}" for k in differ)
        lines.append(
            f"  run id {hit.info.run_id}  key {hit.data.tags.get(TAG + 'run_key')}  "
            f"experiment {clip(experiments.get(hit.info.experiment_id, '?'))}  "
            f"started {started:%Y-%m-%d %H:%M:%S} UTC  name {clip(hit.info.run_name or '')}"
            + (f"  {clip(values)}" if values else "")
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
    """Text from the run's logged model (``mlflow.pytorch.load_model``); a run from before
    workbench logged models is read from its weights-only ``model.pt`` artifact instead."""
    import torch

    from workbench import mlflow_model

    run_id = find_run_id(tracking_uri, run, experiment)
    mlflow_client = client(tracking_uri)
    model_id = mlflow_model.run_model_id(mlflow_client, run_id)
    if model_id is not None:
        logged = mlflow_model.load_model(tracking_uri, mlflow_client, model_id)
        logits, tokenizer, block_size = logged.module, logged.tokenizer, logged.block_size
        run_seed = _run_seed(mlflow_client, run_id)
    else:
        model, tokenizer, run_seed = _load_artifacts(mlflow_client, run_id, run)
        logits, block_size = model.logits, model.block_size
    unknown = sorted({c for c in prompt if c not in tokenizer.chars})
    if unknown:
        raise WorkbenchError(f"--prompt: characters not in the run's vocabulary: {unknown!r}")
    start = torch.tensor([tokenizer.encode(prompt or "\n")])
    generator = torch.Generator().manual_seed(run_seed if seed is None else seed)
    out = sample(logits, start, tokens, block_size, temperature, generator)
    return tokenizer.decode(out[0].tolist())


def sample(
    logits: Callable[[Any], Any],
    idx: Any,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    generator: Any = None,
) -> Any:
    """Extend ``idx`` (B, T) by ``max_new_tokens`` drawn from ``logits`` (token ids (B, T) to
    (B, T, vocab)), feeding back at most ``block_size`` positions."""
    import torch

    with torch.no_grad():
        for _ in range(max_new_tokens):
            last = logits(idx[:, -block_size:])[:, -1, :].float()  # (B, vocab)
            probs = torch.softmax(last / max(temperature, 1e-8), dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
    return idx


def _run_seed(mlflow_client: MlflowClient, run_id: str) -> int:
    data = mlflow_client.get_run(run_id).data
    seed = data.params.get("seed", data.tags.get(TAG + "seed", "0"))
    try:
        return int(seed)
    except ValueError:
        return 0


def _load_artifacts(mlflow_client: MlflowClient, run_id: str, run: str) -> tuple[Any, Any, int]:
    """The model, tokenizer and seed of a run logged before its weights were a logged model."""
    from pydantic import ValidationError

    from workbench.corpus import CharTokenizer
    from workbench.models import build_model
    from workbench.spec import RunConfig

    with tempfile.TemporaryDirectory() as folder:
        try:
            weights = Path(mlflow_client.download_artifacts(run_id, "model.pt", folder))
            tokenizer_file = Path(
                mlflow_client.download_artifacts(run_id, "tokenizer.json", folder)
            )
        except Exception as exc:
            raise WorkbenchError(
                f"run {run}: no logged model, and no model.pt/tokenizer.json artifacts ({exc})"
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
    return model, tokenizer, config.seed


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
