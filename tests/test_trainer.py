"""The trainer: exact resume, divergence, schedules, evaluation, artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from workbench.corpus import BatchSampler, Corpus, eval_set
from workbench.models import build_model
from workbench.spec import RunConfig, TrainConfig
from workbench.train.checkpoint import CHECKPOINT_NAME, CheckpointError
from workbench.train.factory import build_trainer
from workbench.train.optim import FlatAdamW
from workbench.train.process import prepare_process, resolve_device, torch_threads
from workbench.train.trainer import Trainer, learning_rate_at


def make_config(model: dict[str, Any], **train: Any) -> RunConfig:
    base = {"max_iters": 60, "eval_interval": 20, "eval_iters": 4, "device": "cpu"}
    return RunConfig.model_validate(
        {
            "data": {"dataset": "tinyshakespeare"},
            "train": {**base, **train},
            "model": model,
            "seed": 1337,
        }
    )


class Recorder:
    def __init__(self, stop_after_step: int | None = None) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: dict[str, str | bytes] = {}
        self.checkpoints: list[int] = []
        self.stop_after_step = stop_after_step

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.stop_after_step is not None and step > self.stop_after_step:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run
        self.metrics.append((step, dict(metrics)))

    def on_artifact(self, name: str, content: str | bytes) -> None:
        self.artifacts[name] = content

    def on_checkpoint(self, step: int) -> None:
        self.checkpoints.append(step)

    def evals(self) -> dict[int, dict[str, float]]:
        return {s: m for s, m in self.metrics if "val_loss" in m}


class StopsAtCheckpoint(Recorder):
    """Ctrl-C just before this callback's checkpoint at ``step``: in a pack, the members before
    it have written theirs, as a kill at that moment leaves them."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_checkpoint(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt
        super().on_checkpoint(step)


TRANSFORMER = {"kind": "transformer", "n_layer": 2, "dropout": 0.1}


def test_resume_from_checkpoint_equals_uninterrupted_run(shakespeare: Corpus, tmp_path: Path):
    config = make_config(TRANSFORMER)
    straight = Recorder()
    build_trainer(config, shakespeare, straight, tmp_path / "a").fit()

    interrupted = Recorder(stop_after_step=20)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(config, shakespeare, interrupted, tmp_path / "b").fit()
    assert (tmp_path / "b" / CHECKPOINT_NAME).exists()
    assert max(interrupted.evals()) == 20
    assert interrupted.checkpoints == [20]  # told before the checkpoint was written

    resumed = Recorder()
    result = build_trainer(config, shakespeare, resumed, tmp_path / "b").fit()
    assert min(resumed.evals()) == 40  # continued, did not start over
    for step in (40, 60):
        for key in ("train_loss", "val_loss"):
            assert resumed.evals()[step][key] == pytest.approx(
                straight.evals()[step][key], abs=1e-6
            )
    assert result.status == "finished"
    assert result.step == 60


def test_same_seed_same_losses_other_seed_differs(shakespeare: Corpus):
    a, b = Recorder(), Recorder()
    build_trainer(make_config({"kind": "multi_head"}), shakespeare, a).fit()
    build_trainer(make_config({"kind": "multi_head"}), shakespeare, b).fit()
    assert a.evals() == b.evals()
    other = make_config({"kind": "multi_head"}).model_copy(update={"seed": 7})
    c = Recorder()
    build_trainer(other, shakespeare, c).fit()
    assert c.evals()[60]["val_loss"] != a.evals()[60]["val_loss"]


def test_huge_learning_rate_diverges_with_its_step(shakespeare: Corpus):
    config = make_config({"kind": "multi_head"}, learning_rate=1.0e6, max_iters=200)
    result = build_trainer(config, shakespeare).fit()
    assert result.status == "diverged"
    assert result.reason is not None and "step" in result.reason
    assert 0 < result.step < 200


def test_training_lowers_loss_and_reports_metrics(shakespeare: Corpus):
    recorder = Recorder()
    result = build_trainer(
        make_config({"kind": "bigram"}, learning_rate=1e-2), shakespeare, recorder
    ).fit()
    evals = recorder.evals()
    assert sorted(evals) == [0, 20, 40, 60]
    assert evals[60]["val_loss"] < evals[0]["val_loss"] - 0.1
    assert evals[0]["val_loss"] == pytest.approx(math.log(65), abs=0.6)
    assert result.best_val_loss == min(m["val_loss"] for m in evals.values())
    assert result.final_val_loss == evals[60]["val_loss"]
    progress = [m for _, m in recorder.metrics if "train_loss_smooth" in m]
    assert len(progress) == 6  # every 10 steps
    assert all(m["tokens_per_sec"] > 0 for m in progress)
    assert not any("lr" in m for m in progress)  # a constant rate is a param, not a curve
    # the loop (steps and evals) is timed apart from the final sample it is followed by
    assert 0 < result.loop_time_s < result.wall_time_s


def test_eval_is_batched_and_equals_per_batch_mean(shakespeare: Corpus):
    trainer = build_trainer(make_config({"kind": "single_head"}), shakespeare)
    losses = trainer.evaluate()
    x_all, y_all = trainer.eval_sets["val"]
    with torch.no_grad():
        per_batch = [
            trainer.model(x_all[i : i + 32], y_all[i : i + 32])[1].item()  # type: ignore[union-attr]
            for i in range(0, len(x_all), 32)
        ]
    assert losses["val_loss"] == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-5)


def test_artifacts_sample_and_attention(shakespeare: Corpus):
    recorder = Recorder()
    build_trainer(make_config({"kind": "multi_head", "n_head": 4}), shakespeare, recorder).fit()
    sample = recorder.artifacts["sample.txt"]
    assert isinstance(sample, str) and len(sample) == 501 and sample.startswith("\n")
    attention = json.loads(recorder.artifacts["attention.json"])
    weights = torch.tensor(attention["weights"])
    assert weights.shape == (1, 4, 8, 8)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 4, 8))
    assert len(attention["prompt"]) == 8

    bigram = Recorder()
    build_trainer(make_config({"kind": "bigram"}), shakespeare, bigram).fit()
    assert "attention.json" not in bigram.artifacts


def test_warmup_and_cosine_schedule():
    train = TrainConfig(
        learning_rate=1.0,
        min_lr=0.1,
        warmup_iters=10,
        max_iters=110,
        lr_schedule="cosine",
        eval_interval=10,
    )
    assert learning_rate_at(0, train) == pytest.approx(0.1)
    assert learning_rate_at(9, train) == pytest.approx(1.0)
    assert learning_rate_at(60, train) == pytest.approx(0.55)
    assert learning_rate_at(110, train) == pytest.approx(0.1)
    constant = TrainConfig(learning_rate=0.5)
    assert learning_rate_at(1234, constant) == 0.5


def test_gradient_clipping_bounds_the_update(shakespeare: Corpus):
    config = make_config({"kind": "bigram"}, grad_clip=1e-3, max_iters=20, eval_interval=20)
    trainer = build_trainer(config, shakespeare)
    trainer.step()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm.item() <= 1e-3 + 1e-6


def test_auto_device_is_cpu_without_accelerators():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("an accelerator is present")
    assert resolve_device("auto").type == "cpu"


def test_a_checkpoint_that_is_not_plain_data_is_refused(shakespeare: Corpus, tmp_path: Path):
    """Only tensors and plain values are loaded; anything else is one line, never executed."""
    config = make_config({"kind": "bigram"})
    path = tmp_path / CHECKPOINT_NAME
    cases: list[tuple[bytes | object, str]] = [
        (b"not a zip file at all", "refused"),
        ({"model": {}, "note": Path("x")}, "other than tensors"),  # a class, not plain data
        ({"model": {}}, "not a workbench checkpoint"),
        (b"\0" * (64 << 20), "bytes, over"),
    ]
    for content, words in cases:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(CheckpointError, match=words):
            build_trainer(config, shakespeare, run_dir=tmp_path).load_checkpoint()


@pytest.mark.parametrize("mmap", [False, True])
def test_a_truncated_checkpoint_is_refused_naming_its_file(
    tmp_path: Path, mmap: bool, monkeypatch: pytest.MonkeyPatch
):
    """A checkpoint cut short: one line that names the file and what was wrong, whatever torch
    raises (the second hostile round met a bare "OSError: [Errno 22] Invalid argument")."""
    import errno

    from workbench.train.checkpoint import CHECKPOINT_KEYS, load_checkpoint_file

    path = tmp_path / CHECKPOINT_NAME
    torch.save({key: torch.zeros(1 << 16) for key in CHECKPOINT_KEYS}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as cut:
        load_checkpoint_file(path, mmap=mmap)

    def mapping_fails(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(torch, "load", mapping_fails)
    with pytest.raises(CheckpointError) as mapped:
        load_checkpoint_file(path, mmap=mmap)
    for info in (cut, mapped):
        (line,) = str(info.value).splitlines()
        assert line.startswith(f"checkpoint {path} refused: unreadable ("), line
    assert "OSError: [Errno 22] Invalid argument" in str(mapped.value)


@pytest.mark.parametrize(
    ("schedule", "warmup"), [("constant", 30), ("cosine", 0)], ids=["warmup", "cosine"]
)
def test_a_changing_learning_rate_is_reported(
    shakespeare: Corpus, schedule: str, warmup: int
) -> None:
    recorder = Recorder()
    config = make_config(
        {"kind": "bigram"}, max_iters=40, lr_schedule=schedule, warmup_iters=warmup
    )
    build_trainer(config, shakespeare, recorder).fit()
    rates = [(step, m["lr"]) for step, m in recorder.metrics if "train_loss_smooth" in m]
    assert len(rates) == 4
    assert all(lr == learning_rate_at(step - 1, config.train) for step, lr in rates)
    assert len({lr for _, lr in rates}) > 1


def test_a_resume_between_progress_points_keeps_the_progress_mean(
    shakespeare: Corpus, tmp_path: Path
):
    """A checkpoint at step 25 falls between progress points (every 10 steps): the resumed
    run's step-30 mean must still cover steps 21-30, so its smoothed curve is the same."""
    config = make_config({"kind": "bigram"}, max_iters=60, eval_interval=25)
    straight = Recorder()
    build_trainer(config, shakespeare, straight, tmp_path / "a").fit()
    with pytest.raises(KeyboardInterrupt):
        build_trainer(config, shakespeare, Recorder(stop_after_step=25), tmp_path / "b").fit()
    resumed = Recorder()
    build_trainer(config, shakespeare, resumed, tmp_path / "b").fit()

    def smooth(recorder: Recorder) -> dict[int, float]:
        return {s: m["train_loss_smooth"] for s, m in recorder.metrics if "train_loss_smooth" in m}

    after = {s: v for s, v in smooth(resumed).items() if s > 25}
    assert sorted(after) == [30, 40, 50, 60]
    assert after == pytest.approx({s: smooth(straight)[s] for s in after}, abs=1e-6)


def test_building_a_trainer_leaves_process_settings_alone(shakespeare: Corpus):
    """Threads (and TF32) are set where a job starts, by prepare_process, not by the trainer."""
    config = make_config({"kind": "bigram"}, threads=1)
    with torch_threads(2):
        build_trainer(config, shakespeare)
        assert torch.get_num_threads() == 2
        assert prepare_process(config.train) == torch.device("cpu")
        assert torch.get_num_threads() == 1


def test_a_trainer_trains_the_parts_it_is_handed(shakespeare: Corpus):
    """No config of a run: a model, its optimizer, batches and eval sets, and a train config."""
    train = TrainConfig(max_iters=20, eval_interval=10, eval_iters=2, device="cpu")
    config = make_config({"kind": "bigram"}).model
    torch.manual_seed(0)
    model = build_model(config, shakespeare.tokenizer.vocab_size, train.block_size)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = FlatAdamW(list(model.parameters()), lr=1e-2)
    sampler = BatchSampler(shakespeare.train, train.block_size, train.batch_size, seed=3)
    eval_sets = {
        "val": eval_set(shakespeare.val, train.block_size, train.batch_size, 2, 3, "val"),
        "train": eval_set(shakespeare.train, train.block_size, train.batch_size, 2, 3, "train"),
    }
    recorder = Recorder()
    trainer = Trainer(
        model,
        optimizer,
        sampler,
        eval_sets,
        train,
        device=torch.device("cpu"),
        eval_rows=16,
        tokenizer=shakespeare.tokenizer,
        attention_prompt=shakespeare.val[:8],
        seed=3,
        callback=recorder,
    )
    result = trainer.fit()
    assert result.status == "finished" and result.step == 20
    assert trainer.model is model and optimizer.step_number == 20
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert sorted(recorder.evals()) == [0, 10, 20]
    assert recorder.evals()[20]["val_loss"] < recorder.evals()[0]["val_loss"]


@pytest.mark.parametrize("setting", ["sdpa", "torch"])
def test_the_factory_hands_the_model_the_attention_the_config_asks_for(
    setting: str, shakespeare: Corpus
) -> None:
    config = make_config({"kind": "multi_head", "n_embd": 16, "n_head": 2}, attention=setting)
    trainer = build_trainer(config, shakespeare)
    assert trainer.model.attention_backend is not None
    assert trainer.model.attention_backend.name == setting
    assert (
        build_trainer(make_config({"kind": "bigram"}), shakespeare).model.attention_backend is None
    )
