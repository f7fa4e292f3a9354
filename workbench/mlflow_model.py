"""A run's final weights as an MLflow logged model, and the same model read back.

The model directory is the one ``mlflow.pytorch.save_model(..., serialization_format="pt2")``
writes (a test holds the two to each other), its program the model shape's traced archive with
the run's weights written in (:mod:`workbench.models.export`), not one export per run, with its
signature, input example and pip requirements stated rather than inferred (inference loads the
model: seconds). The character vocabulary travels as the flavor's extra file
``extra_files/tokenizer.json``; the block size (the longest input) as the model's metadata.
``mlflow.pytorch.load_model`` returns a module mapping token ids (B, T) int64 to logits
(B, T, vocab), with pickle refused.

The model is created, written, finalized READY and only then named among the run's outputs
(what the runs table's Models column reads), all before the run is FINISHED: a run killed on
the way is resumed, and :func:`reuse_or_discard` keeps its READY model or deletes a partial one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import compat
from workbench.errors import WorkbenchError, first_line

if TYPE_CHECKING:
    import torch
    from mlflow.tracking import MlflowClient

    from workbench.corpus import CharTokenizer
    from workbench.models.ladder import LanguageModel

MODEL_NAME = "model"
TOKENIZER_FILE = "tokenizer.json"  # under the model's extra_files/
MODEL_TYPE = "char-lm"


@dataclass(frozen=True)
class LoggedRunModel:
    """A run's model read back: the module, its vocabulary and its longest input."""

    module: torch.nn.Module
    tokenizer: CharTokenizer
    block_size: int
    model_id: str


def pip_requirements() -> list[str]:
    """What loading the model needs besides MLflow (which ``save_model`` adds itself)."""
    import torch
    from packaging.version import Version

    # no local label (+cpu): installable
    return [f"torch=={Version(torch.version.__version__).public}"]


@functools.cache
def _environment_files() -> dict[str, str]:
    """conda.yaml, requirements.txt and python_env.yaml, the same for every model of a process:
    MLflow's own processing of the stated requirements, done once."""
    import yaml

    helpers = compat.mlflow_model_helpers()
    assert helpers is not None, "only called where MLflow's helpers are at hand"
    _, process, python_env_class = helpers
    conda_env, requirements, constraints = process(None, pip_requirements())
    assert not constraints  # none stated
    with tempfile.TemporaryDirectory() as folder:
        python_env_of: Any = python_env_class.current
        python_env_of().to_yaml(Path(folder) / "python_env.yaml")
        python_env = (Path(folder) / "python_env.yaml").read_text()
    return {
        "conda.yaml": yaml.safe_dump(conda_env, default_flow_style=False),
        "requirements.txt": "\n".join(requirements),
        "python_env.yaml": python_env,
    }


def signature(vocab_size: int) -> Any:
    """Token ids (B, T) int64 in, logits (B, min(T, block_size), vocab) float32 out: a longer
    prompt is cropped to its last block_size tokens."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, vocab_size))]),
    )


def save_model(
    path: Path,
    model: LanguageModel,
    tokenizer: CharTokenizer,
    mlflow_model: Any = None,
) -> None:
    """Write the MLflow model directory of ``model``'s logits program at ``path`` (which must
    not exist): the pytorch flavor's pt2 layout, with its pyfunc flavor and environment files.
    Written here from the shape's kept archive with MLflow's private helpers
    (``workbench.compat``); without them, by ``mlflow.pytorch.save_model``, which traces."""
    import torch
    from mlflow import pyfunc
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.utils.file_utils import get_total_file_size

    from workbench.models.export import example_input, save_logits

    block_size = model.block_size
    mlflow_model = Model() if mlflow_model is None else mlflow_model
    metadata = {"block_size": block_size, "vocab_size": tokenizer.vocab_size}
    helpers = compat.mlflow_model_helpers()
    if helpers is None:
        _save_with_mlflow(path, model, tokenizer, mlflow_model, metadata)
        return
    save_example = helpers[0]
    path.mkdir(parents=True)
    save_example(mlflow_model, example_input().numpy(), str(path))
    mlflow_model.signature = signature(tokenizer.vocab_size)
    mlflow_model.metadata = metadata
    (path / "data").mkdir()
    save_logits(model, path / "data" / "model.pt2")
    (path / "extra_files").mkdir()
    (path / "extra_files" / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
    mlflow_model.add_flavor(
        "pytorch",
        model_data="data",
        pytorch_version=torch.version.__version__,
        code=None,
        extra_files=[{"path": f"extra_files/{TOKENIZER_FILE}"}],
    )
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow.pytorch",
        data="data",
        pickle_module_name="mlflow.pytorch.pickle_module",  # what save_model writes
        code=None,
        conda_env="conda.yaml",
        python_env="python_env.yaml",
        model_config={"device": None},
    )
    if size := get_total_file_size(str(path)):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
    for name, text in _environment_files().items():
        (path / name).write_text(text)


def _save_with_mlflow(
    path: Path,
    model: LanguageModel,
    tokenizer: CharTokenizer,
    mlflow_model: Any,
    metadata: dict[str, int],
) -> None:
    """The public route: ``mlflow.pytorch.save_model`` exports the logits module of a copy of
    ``model`` built with SDPA attention (its signature makes batch and time dynamic)."""
    import mlflow.pytorch

    from workbench.models import build_model
    from workbench.models.attention import SDPA
    from workbench.models.export import NextTokenLogits, example_input

    same = build_model(model.config, model.vocab_size, model.block_size, attention=SDPA)
    same.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory(prefix="workbench-model-") as folder:
        vocabulary = Path(folder) / TOKENIZER_FILE
        vocabulary.write_text(tokenizer.to_json(), encoding="utf-8")
        mlflow.pytorch.save_model(
            NextTokenLogits(same).eval(), str(path), mlflow_model=mlflow_model,
            signature=signature(tokenizer.vocab_size),
            input_example=example_input().numpy(), metadata=metadata,
            extra_files=[str(vocabulary)], pip_requirements=pip_requirements(),
            serialization_format="pt2",
        )  # fmt: skip


def log_model(
    mlflow_client: MlflowClient,
    run_id: str,
    model: LanguageModel,
    tokenizer: CharTokenizer,
    step: int,
) -> str:
    """Log ``model``'s logits program as the run's model (named ``model``, with the run's
    params), linked as the run's output at ``step``; returns its model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = mlflow_client.get_run(run_id)
    logged = mlflow_client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        params=dict(run.data.params),
        model_type=MODEL_TYPE,
    )
    mlflow_model = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        run_id=run_id,
        model_id=logged.model_id,
    )
    with tempfile.TemporaryDirectory(prefix="workbench-model-") as folder:
        local = Path(folder) / MODEL_NAME
        save_model(local, model, tokenizer, mlflow_model)
        mlflow_client.log_model_artifacts(logged.model_id, str(local))
    mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    mlflow_client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    return str(logged.model_id)


def reuse_or_discard(mlflow_client: MlflowClient, run_id: str, step: int) -> str | None:
    """For a resumed run: the id of the READY model an earlier attempt logged (linked to the
    run if the attempt stopped before that), else None, with any partial model deleted."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    run = mlflow_client.get_run(run_id)
    models = mlflow_client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    for model in models:
        if model not in ready[:1]:
            mlflow_client.delete_logged_model(model.model_id)
    if not ready:
        return None
    outputs = run.outputs.model_outputs if run.outputs is not None else None
    linked = {output.model_id for output in outputs or []}
    if ready[0].model_id not in linked:
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(ready[0].model_id, step=step)])
    return str(ready[0].model_id)


def run_model_id(mlflow_client: MlflowClient, run_id: str) -> str | None:
    """The READY model among the run's outputs (the newest), or None (a run from before
    workbench logged models)."""
    from mlflow.entities import LoggedModelStatus

    run_outputs = mlflow_client.get_run(run_id).outputs
    outputs = (run_outputs.model_outputs if run_outputs is not None else None) or []
    for output in reversed(outputs):
        model = mlflow_client.get_logged_model(output.model_id)
        if model.status == LoggedModelStatus.READY:
            return str(model.model_id)
    return None


def load_model(tracking_uri: str, mlflow_client: MlflowClient, model_id: str) -> LoggedRunModel:
    """The model through ``mlflow.pytorch.load_model`` and its tokenizer. Only a pt2 model is
    read, with MLflow's pickle refusal on whatever this process's setting (MLflow 3.17 allows
    pickle by default): its check that the archive holds no pickle then runs."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    from workbench.corpus import CharTokenizer

    location = mlflow_client.get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory(prefix="workbench-model-") as folder:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=folder, tracking_uri=tracking_uri
            )
        )
        try:
            model = Model.load(str(local))
            flavor = model.flavors.get("pytorch") or {}
            if flavor.get("code") or flavor.get("model_data") != "data":  # code: on sys.path
                raise ValueError("its pytorch flavor names code, or data other than data/")
            metadata = model.metadata or {}
            block_size = int(metadata["block_size"])
            tokenizer = CharTokenizer.load(local / "extra_files" / TOKENIZER_FILE)
            data = sorted(p.name for p in (local / "data").iterdir())
            if data != ["model.pt2"]:
                raise ValueError(f"data/ holds {data}, not the one pt2 program")
            with _pickle_refused():
                module = mlflow.pytorch.load_model(str(local))
        except Exception as exc:  # whatever the stored files make MLflow or torch raise
            raise WorkbenchError(
                f"logged model {model_id} refused: not a pickle-free workbench model "
                f"({type(exc).__name__}: {first_line(exc, 300)})"
            ) from None
    return LoggedRunModel(module, tokenizer, block_size, model_id)


@contextlib.contextmanager
def _pickle_refused() -> Iterator[None]:
    """``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` for the duration (MLflow reads it on use)."""
    name = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    saved = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved
