"""Load a finished run's weights and tokenizer back from MLflow and generate text."""

from __future__ import annotations

import tempfile
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.tracking import TAG, client


def find_run_id(tracking_uri: str, run: str, experiment: str | None = None) -> str:
    """``run`` is an MLflow run id or a run name (the newest FINISHED run of that name)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        return str(mlflow_client.get_run(run).info.run_id)
    except MlflowException:
        pass
    ids = [
        e.experiment_id
        for e in mlflow_client.search_experiments()
        if experiment is None or e.name == experiment
    ]
    escaped = run.replace("'", "\\'")
    found = (
        mlflow_client.search_runs(
            ids,
            filter_string=f"attributes.run_name = '{escaped}' and attributes.status = 'FINISHED' "
            f"and tags.`{TAG}run_key` != ''",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if ids
        else []
    )
    if not found:
        raise WorkbenchError(f"no finished run named or with id {run!r} in {tracking_uri}")
    return str(found[0].info.run_id)


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

    from workbench.data import CharTokenizer
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
        saved = torch.load(weights, map_location="cpu", weights_only=True)
        tokenizer = CharTokenizer.load(tokenizer_file)
    config = RunConfig.model_validate(saved["config"])
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
