"""Each finished run's weights as an MLflow logged model: what `mlflow.pytorch.load_model` gives
back (with pickle refused), the link the runs table's Models column reads, one model per run
across a resume, and `workbench sample` through it. A real SQLite store throughout."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from floats import assert_f32_close
from mlflow.entities import LoggedModelStatus
from runs import Store, invoke
from specs import write_spec

from workbench import cache, mlflow_model
from workbench.corpus import CharTokenizer
from workbench.models import MODELS, build_model, export
from workbench.models.attention import SDPA
from workbench.models.export import NextTokenLogits, example_input, save_logits
from workbench.settings import load_settings
from workbench.spec import ModelConfig, RunConfig
from workbench.sweep import record
from workbench.sweep.jobs import Job, JobResult, execute_job
from workbench.tracking import ensure_experiment

MULTI_HEAD = {"kind": "multi_head", "n_embd": 16, "n_head": 2}


@pytest.fixture
def pickle_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model may not unpickle anything (MLflow 3.17's default allows it)."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


def run_job(store: Store, run_id: str | None = None, max_iters: int = 20) -> JobResult:
    """One multi_head run (block 8) through the job function every executor runs."""
    config = RunConfig.model_validate(
        {
            "data": {"dataset": "tinyshakespeare"},
            "train": {"max_iters": max_iters, "eval_interval": 10, "eval_iters": 2},
            "model": MULTI_HEAD,
            "seed": 1,
        }
    )
    resumed = run_id is not None
    if run_id is None:
        experiment_id = ensure_experiment(store.uri, "t")
        run_id = store.client.create_run(experiment_id, run_name="m").info.run_id
    job = Job(
        name="m",
        key="k",
        config=config.model_dump(mode="json"),
        run_id=run_id,
        tracking_uri=store.uri,
        checkpoint_dir=str(store.checkpoints / "m"),
        data_dir=str(load_settings().data_dir),
        checkpoint_every_s=0.0,
        resumed=resumed,
    )
    return execute_job(job)


def models_of(store: Store, run_id: str) -> list[Any]:
    """The run's logged models, found as the MLflow UI finds them (deleted ones excluded)."""
    run = store.client.get_run(run_id)
    return store.client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )


def load(store: Store, model_id: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    mlflow.set_tracking_uri(store.uri)
    try:
        return mlflow.pytorch.load_model(f"models:/{model_id}")
    finally:
        mlflow.set_tracking_uri(None)


def test_a_finished_run_logs_a_model_that_loads_to_its_logits(
    store: Store, monkeypatch: pytest.MonkeyPatch, pickle_refused: None
) -> None:
    trained: list[Any] = []

    save_model = mlflow_model.save_model

    def capture(path: Path, model: Any, *args: Any) -> None:
        trained.append(model)
        save_model(path, model, *args)

    monkeypatch.setattr(mlflow_model, "save_model", capture)
    result = run_job(store)
    assert result.status == "finished", result
    (model,) = trained
    (logged,) = models_of(store, result.run_id)
    assert logged.status == LoggedModelStatus.READY and logged.name == "model"
    # The runs table's Models column: the run's model outputs.
    outputs = store.client.get_run(result.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [logged.model_id]
    artifacts = {a.path for a in store.client.list_artifacts(result.run_id)}
    assert "model.pt" not in artifacts  # the logged model replaces the bare weights

    module = load(store, logged.model_id, monkeypatch)
    same = build_model(model.config, model.vocab_size, model.block_size, attention=SDPA).eval()
    same.load_state_dict(model.state_dict())
    for batch, time in ((1, 1), (3, 5), (2, model.block_size)):
        idx = torch.randint(0, model.vocab_size, (batch, time))
        logits = module(idx)
        assert logits.shape == (batch, time, model.vocab_size)
        if time == model.block_size:  # the same computation (shorter ones run padded)
            assert torch.equal(logits, same.logits(idx))
        assert_f32_close(logits, same.logits(idx), ulps=32)
        assert_f32_close(logits, model.logits(idx), ulps=32)
    for time in (model.block_size + 1, 3 * model.block_size + 2):  # cropped, as generate does
        idx = torch.randint(0, model.vocab_size, (2, time))
        assert torch.equal(module(idx), same.logits(idx[:, -model.block_size :]))

    loaded = mlflow_model.load_model(store.uri, store.client, logged.model_id)
    assert loaded.block_size == 8 and loaded.tokenizer.vocab_size == model.vocab_size == 65
    info = mlflow.models.get_model_info(f"{logged.artifact_location}")
    assert info.signature == mlflow_model.signature(65) and info.metadata["block_size"] == 8


def test_the_model_directory_is_what_mlflow_pytorch_save_model_writes(
    tmp_path: Path, pickle_refused: None
) -> None:
    model = build_model(ModelConfig(**MULTI_HEAD), 65, 8, attention=SDPA).eval()  # type: ignore[arg-type]
    tokenizer = CharTokenizer("".join(chr(32 + i) for i in range(65)))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    mlflow_model.save_model(ours, model, tokenizer)
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(tokenizer_file)
    mlflow.pytorch.save_model(
        NextTokenLogits(model).eval(),
        str(theirs),
        serialization_format="pt2",
        signature=mlflow_model.signature(65),
        input_example=example_input().numpy(),
        pip_requirements=mlflow_model.pip_requirements(),
        metadata={"block_size": 8, "vocab_size": 65},
        extra_files=[str(tokenizer_file)],
    )

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    assert files(ours) == files(theirs)
    for name in ("conda.yaml", "requirements.txt", "python_env.yaml", "input_example.json"):
        assert (ours / name).read_text() == (theirs / name).read_text(), name
    assert "torch==" in (ours / "requirements.txt").read_text()
    assert (ours / "extra_files" / "tokenizer.json").read_text() == tokenizer.to_json()

    def mlmodel(root: Path) -> dict[str, Any]:
        spec = yaml.safe_load((root / "MLmodel").read_text())
        for varying in ("utc_time_created", "model_uuid", "model_size_bytes"):
            assert spec.pop(varying, None) is not None or varying == "model_size_bytes"
        return spec

    assert mlmodel(ours) == mlmodel(theirs)
    idx = torch.randint(0, 65, (2, 8))
    for root in (ours, theirs):
        assert torch.equal(mlflow.pytorch.load_model(str(root))(idx), model.logits(idx))


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["after_logging", "while_logging"])
def test_a_run_stopped_around_its_model_ends_with_exactly_one(
    store: Store, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """Stopped after its model is logged (before FINISHED), or halfway through logging it: the
    resume keeps the READY model, or deletes the partial one and logs another."""
    real_log, real_save = record.log_final_model, mlflow_model.save_model

    def log_then_stop(*args: Any) -> None:
        real_log(*args)
        raise KeyboardInterrupt("stopped")

    def stop_while_saving(*args: Any) -> None:
        raise KeyboardInterrupt("stopped")

    if stop == "after_logging":
        monkeypatch.setattr(record, "log_final_model", log_then_stop)
    else:
        monkeypatch.setattr(mlflow_model, "save_model", stop_while_saving)
    first = run_job(store)
    assert first.status == "killed", first
    before = models_of(store, first.run_id)
    assert len(before) == 1
    monkeypatch.setattr(record, "log_final_model", real_log)
    monkeypatch.setattr(mlflow_model, "save_model", real_save)

    again = run_job(store, run_id=first.run_id)
    assert again.status == "finished", again
    assert store.client.get_run(first.run_id).info.status == "FINISHED"
    (model,) = models_of(store, first.run_id)
    assert model.status == LoggedModelStatus.READY
    outputs = store.client.get_run(first.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model.model_id]
    assert (model.model_id == before[0].model_id) == (stop == "after_logging")


@pytest.mark.slow
def test_sample_reads_the_logged_model_and_keeps_its_errors(store: Store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, variants={"multi_head": {"model": {"kind": "multi_head"}}})
    assert invoke("run", str(spec), *store.args()).exit_code == 0
    (run,) = store.runs()
    assert "model.pt" not in {a.path for a in store.client.list_artifacts(run.info.run_id)}
    sample = invoke("sample", run.info.run_id, "--prompt", "ROMEO:", "--tokens", "30",
                    "--seed", "3", "--tracking-uri", store.uri)  # fmt: skip
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("ROMEO:") and len(sample.output.rstrip("\n")) == 36
    again = invoke("sample", run.info.run_id, "--prompt", "ROMEO:", "--tokens", "30",
                   "--seed", "3", "--tracking-uri", store.uri)  # fmt: skip
    assert again.output == sample.output  # the seed decides
    bad = invoke("sample", run.info.run_id, "--prompt", "€", "--tracking-uri", store.uri)
    assert bad.exit_code == 2 and "not in the run's vocabulary" in bad.stderr


def test_a_run_from_before_logged_models_samples_from_its_weights_file(store: Store) -> None:
    """The fallback: ``model.pt`` (weights only) and ``tokenizer.json`` run artifacts; a run
    with neither is one line."""
    config = RunConfig.model_validate(
        {
            "data": {"dataset": "tinyshakespeare"},
            "train": {},
            "model": {"kind": "bigram"},
            "seed": 1,
        }
    )
    tokenizer = CharTokenizer("abc \n")
    model = build_model(config.model, tokenizer.vocab_size, config.train.block_size)
    experiment_id = ensure_experiment(store.uri, "t")
    old = store.client.create_run(experiment_id, run_name="old").info.run_id
    empty = store.client.create_run(experiment_id, run_name="empty").info.run_id
    with tempfile.TemporaryDirectory() as folder:
        state = {"config": config.model_dump(mode="json"), "state_dict": model.state_dict()}
        torch.save(state, Path(folder) / "model.pt")
        tokenizer.save(Path(folder) / "tokenizer.json")
        store.client.log_artifacts(old, folder)
    sample = invoke("sample", old, "--prompt", "ab", "--tokens", "8", "--tracking-uri", store.uri)
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("ab") and set(sample.output.rstrip("\n")) <= set("abc \n")
    missing = invoke("sample", empty, "--tracking-uri", store.uri)
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    (line,) = missing.stderr.splitlines()
    assert line.startswith(f"run {empty}: no logged model, and no model.pt/tokenizer.json")


def refused_line(store: Store, folder: Path) -> str:
    """Log ``folder`` as the model of a forged run, ask ``workbench sample`` for that run: it
    must refuse in one line, exit 2, which is returned."""
    from mlflow.entities import LoggedModelOutput

    experiment_id = ensure_experiment(store.uri, "t")
    run_id = store.client.create_run(experiment_id, run_name="forged").info.run_id
    logged = store.client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    store.client.log_model_artifacts(logged.model_id, str(folder))
    store.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    store.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    refused = invoke("sample", run_id, "--tracking-uri", store.uri)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"logged model {logged.model_id} refused:")
    return line


def test_a_logged_model_that_holds_a_pickle_is_refused_in_one_line(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model someone logged into the store with pickled contents: refused, never unpickled,
    whatever MLFLOW_ALLOW_PICKLE_DESERIALIZATION says."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    model = build_model(ModelConfig(kind="bigram"), 5, 8).eval()  # type: ignore[arg-type]
    folder = tmp_path / "forged"
    mlflow.pytorch.save_model(
        NextTokenLogits(model), str(folder), serialization_format="pickle",
        signature=mlflow_model.signature(5), pip_requirements=mlflow_model.pip_requirements(),
    )  # fmt: skip
    (folder / "extra_files").mkdir()
    (folder / "extra_files" / "tokenizer.json").write_text(
        json.dumps({"type": "char", "chars": "abcde"})
    )
    line = refused_line(store, folder)
    assert "pickle" in line


def test_a_logged_model_that_names_code_is_refused_before_mlflow_loads_it(
    store: Store, tmp_path: Path
) -> None:
    """A pt2 model whose MLmodel names a ``code`` folder: MLflow would put that folder first on
    ``sys.path`` while loading it. Refused in one line; the folder never reaches ``sys.path``."""
    import sys

    model = build_model(ModelConfig(kind="bigram"), 5, 8, attention=SDPA).eval()  # type: ignore[arg-type]
    folder = tmp_path / "forged"
    tokenizer = CharTokenizer.from_text("abcde")
    mlflow_model.save_model(folder, model, tokenizer)
    (folder / "code").mkdir()
    (folder / "code" / "json.py").write_text("raise SystemExit('code from the store ran')\n")
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    spec["flavors"]["pytorch"]["code"] = "code"
    (folder / "MLmodel").write_text(yaml.safe_dump(spec))
    line = refused_line(store, folder)
    assert "code" in line
    assert not any(entry.endswith("code") for entry in sys.path)


def test_a_logged_model_whose_mlmodel_holds_a_yaml_tag_is_refused_in_one_line(
    store: Store, tmp_path: Path
) -> None:
    """An MLmodel with a Python tag (``!!python/object/apply``): YAML that a safe loader refuses
    (nothing constructed, nothing run), so `sample` refuses the model in one line, exit 2 (the
    second hostile round met a 73-line traceback and exit 1)."""
    model = build_model(ModelConfig(kind="bigram"), 5, 8, attention=SDPA).eval()  # type: ignore[arg-type]
    folder = tmp_path / "forged"
    mlflow_model.save_model(folder, model, CharTokenizer.from_text("abcde"))
    marker = tmp_path / "ran"
    tagged = f"run: !!python/object/apply:os.system ['touch {marker}']\n"
    (folder / "MLmodel").write_text(tagged + (folder / "MLmodel").read_text())
    line = refused_line(store, folder)
    assert "python/object" in line
    assert not marker.exists()


# --- the traced archive kept per model shape ---------------------------------------------------


@pytest.fixture
def export_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder, and no archive kept in this process: as a fresh worker."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(export, "_templates", type(export._templates)())
    return tmp_path / "cache" / "workbench" / "exports"


def trained_like(config: ModelConfig, seed: int) -> Any:
    """A model of ``config``'s shape whose weights are nothing like a fresh one's."""
    torch.manual_seed(seed)
    model = build_model(config, 65, 8)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    return model


def logits_of_archive(path: Path, model: Any) -> None:
    """The archive at ``path`` computes exactly ``model``'s logits."""
    program = torch.export.load(path)
    same = build_model(model.config, model.vocab_size, model.block_size, attention=SDPA).eval()
    same.load_state_dict(model.state_dict())
    idx = torch.randint(0, model.vocab_size, (3, model.block_size))
    assert torch.equal(program.module()(idx), same.logits(idx))
    short = idx[:, :5]
    assert_f32_close(program.module()(short), same.logits(short), ulps=32)


@pytest.mark.private_api
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_kept_archive_written_with_a_runs_weights_computes_that_runs_logits(
    export_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    config = ModelConfig.model_validate({"kind": kind, "n_embd": 16, "n_head": 2, "n_layer": 1}
                                        if kind != "bigram" else {"kind": kind})  # fmt: skip
    first, second = trained_like(config, 1), trained_like(config, 2)
    save_logits(first, tmp_path / "first.pt2")  # traced: the archive is kept
    (kept,) = export_cache.glob("*.pt2")
    assert kept.name == export.template_key(first) + ".pt2"
    # A fresh process: the kept archive, never a trace.
    monkeypatch.setattr(export, "_templates", type(export._templates)())
    monkeypatch.setattr(export, "trace_logits", lambda *a: pytest.fail("traced again"))
    save_logits(second, tmp_path / "second.pt2")
    logits_of_archive(tmp_path / "first.pt2", first)
    logits_of_archive(tmp_path / "second.pt2", second)
    assert export.template_key(first) == export.template_key(second)
    other_shape = build_model(config, 65, 16)
    assert export.template_key(other_shape) != export.template_key(first)


def rewritten(archive: Path, change: Any) -> bytes:
    """``archive`` written again, whole and valid, with ``change(records)`` applied first."""
    reader = torch._C.PyTorchFileReader(str(archive))
    records = {n: bytes(reader.get_record(n)) for n in reader.get_all_records()}
    change(records)
    out = archive.with_name("rewritten.pt2")
    writer = torch._C.PyTorchFileWriter(str(out))
    for name, data in records.items():
        if not name.startswith(".data/"):
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return out.read_bytes()


def weights_config(change: Any) -> Any:
    def edit(records: dict[str, bytes]) -> None:
        name = "data/weights/model_weights_config.json"
        config = json.loads(records[name])
        change(next(iter(config["config"].values())))
        records[name] = json.dumps(config).encode()

    return edit


def dropped_weight(records: dict[str, bytes]) -> None:
    """The weights config without its first weight: the model's others, each valid."""
    name = "data/weights/model_weights_config.json"
    config = json.loads(records[name])
    del config["config"][next(iter(config["config"]))]
    records[name] = json.dumps(config).encode()


@pytest.mark.slow
@pytest.mark.private_api
def test_a_kept_archive_that_is_broken_or_not_the_models_is_traced_again(
    export_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = trained_like(ModelConfig.model_validate(MULTI_HEAD), 3)
    save_logits(model, tmp_path / "a.pt2")
    (kept,) = export_cache.glob("*.pt2")
    good = kept.read_bytes()
    forged = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not an archive",
        # Valid archives, whose first weight is not stored as workbench writes one.
        "pickled": rewritten(kept, weights_config(lambda w: w.update(use_pickle=True))),
        "resized": rewritten(
            kept, weights_config(lambda w: w["tensor_meta"]["sizes"][0].update(as_int=64))
        ),
        "half": rewritten(kept, weights_config(lambda w: w["tensor_meta"].update(dtype=5))),
        "missing": rewritten(kept, lambda records: records.pop("data/weights/weight_0")),
        "dropped": rewritten(kept, dropped_weight),
        "unknown": rewritten(kept, weights_config(lambda w: w.update(path_name="../x"))),
    }
    traced: list[Any] = []
    real_trace = export.trace_logits
    monkeypatch.setattr(export, "trace_logits", lambda *a: traced.append(a) or real_trace(*a))
    for name, content in forged.items():
        kept.write_bytes(content)
        cache.record(kept)  # a forger who wrote the record too: the archive's checks refuse it
        monkeypatch.setattr(export, "_templates", type(export._templates)())
        save_logits(model, tmp_path / f"{name}.pt2")
        logits_of_archive(tmp_path / f"{name}.pt2", model)
        assert kept.read_bytes() != content, f"{name}: the broken archive was not replaced"
    assert len(traced) == len(forged)
    # The archive written back is the good one again: used as it is.
    monkeypatch.setattr(export, "_templates", type(export._templates)())
    save_logits(model, tmp_path / "again.pt2")
    assert len(traced) == len(forged)
    # A valid archive that is not the one kept, its record not rewritten: never read, traced.
    planted = rewritten(kept, lambda records: None)
    assert planted != kept.read_bytes()
    kept.write_bytes(planted)
    monkeypatch.setattr(export, "_templates", type(export._templates)())
    save_logits(model, tmp_path / "changed.pt2")
    assert len(traced) == len(forged) + 1 and kept.read_bytes() != planted


def test_no_cache_folder_traces_in_each_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the cache folder would be")
    monkeypatch.setattr(export, "_templates", type(export._templates)())
    model = trained_like(ModelConfig(kind="bigram"), 4)  # type: ignore[call-arg]
    save_logits(model, tmp_path / "m.pt2")
    logits_of_archive(tmp_path / "m.pt2", model)


def test_the_archive_key_is_the_code_the_process_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once, as workbench.models was imported: a checkout during a sweep does not file the
    old code's trace under the new code's key."""
    from workbench.models import source

    model = build_model(ModelConfig(kind="bigram"), 65, 8)  # type: ignore[call-arg]
    key = export.template_key(model)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self} again"))
    assert export.template_key(model) == key
    monkeypatch.undo()
    assert source.source_digest() == source.SOURCE_DIGEST  # the files, as they are now
