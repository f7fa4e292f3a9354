"""Packed training: each member of a pack trains as its solo run would, to float rounding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from floats import assert_f32_close
from test_trainer import Recorder, StopsAtCheckpoint
from torch import nn

from workbench.corpus import Corpus
from workbench.models.attention import SDPA, TORCH_OPS, PackedAttention
from workbench.spec import RunConfig, pack_key
from workbench.train.checkpoint import CHECKPOINT_NAME
from workbench.train.factory import build_trainer
from workbench.train.loop import TrainResult
from workbench.train.optim import FlatAdamW
from workbench.train.packed import align_checkpoints, build_packed_trainer, checkpoint_step

ROUNDING = 1e-5  # float32 rounding over a few dozen steps (batched kernels sum in other orders)


def make_config(model: dict[str, Any], seed: int = 1337, **train: Any) -> RunConfig:
    base = {"max_iters": 50, "eval_interval": 10, "eval_iters": 2, "device": "cpu"}
    return RunConfig.model_validate(
        {
            "data": {"dataset": "tinyshakespeare"},
            "train": {**base, **train},
            "model": model,
            "seed": seed,
        }
    )


def curves(recorder: Recorder) -> list[tuple[int, dict[str, float]]]:
    """Everything reported but the throughput, which is the clock's."""
    return [(s, {k: v for k, v in m.items() if k != "tokens_per_sec"}) for s, m in recorder.metrics]


def assert_same_curves(packed: Recorder, solo: Recorder, tolerance: float = ROUNDING) -> None:
    ours, theirs = curves(packed), curves(solo)
    assert [(s, sorted(m)) for s, m in ours] == [(s, sorted(m)) for s, m in theirs]
    for (step, mine), (_, reference) in zip(ours, theirs, strict=True):
        for name, value in reference.items():
            assert mine[name] == pytest.approx(value, abs=tolerance), (step, name)


def assert_same_result(packed: TrainResult, solo: TrainResult) -> None:
    assert (packed.status, packed.step, packed.reason) == (solo.status, solo.step, solo.reason)
    assert (packed.num_params, packed.device) == (solo.num_params, solo.device)
    for name in ("best_val_loss", "final_val_loss", "final_train_loss"):
        assert getattr(packed, name) == pytest.approx(
            getattr(solo, name), abs=ROUNDING, nan_ok=True
        )
    assert [h["step"] for h in packed.history] == [h["step"] for h in solo.history]


def two_members(model: dict[str, Any], **train: Any) -> list[RunConfig]:
    """One plain member and one that differs in every per-member setting."""
    return [
        make_config(model, seed=1337, **train),
        make_config(
            model,
            seed=7,
            learning_rate=3e-3,
            lr_schedule="cosine",
            warmup_iters=5,
            min_lr=1e-4,
            weight_decay=0.1,
            grad_clip=0.5,
            **train,
        ),
    ]


MODELS = {
    "bigram": {"kind": "bigram"},
    "uniform_avg": {"kind": "uniform_avg"},
    "softmax_avg": {"kind": "softmax_avg"},
    "softmax_avg_frozen": {"kind": "softmax_avg", "learnable": False},
    "single_head": {"kind": "single_head", "head_size": 16},
    "multi_head": {"kind": "multi_head"},
    "transformer": {"kind": "transformer", "n_layer": 2},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_each_member_equals_its_solo_run(shakespeare: Corpus, name: str):
    configs = two_members(MODELS[name])
    recorders = [Recorder(), Recorder()]
    pack = build_packed_trainer(configs, shakespeare, list(recorders), [None, None])
    results = pack.fit()
    for k, config in enumerate(configs):
        solo = Recorder()
        trainer = build_trainer(config, shakespeare, solo)
        assert_same_result(results[k], trainer.fit())
        assert_same_curves(recorders[k], solo)
        assert recorders[k].artifacts.keys() == solo.artifacts.keys()
        assert recorders[k].artifacts["sample.txt"] == solo.artifacts["sample.txt"]
        if "attention.json" in solo.artifacts:
            mine = json.loads(recorders[k].artifacts["attention.json"])
            theirs = json.loads(solo.artifacts["attention.json"])
            assert mine["prompt"] == theirs["prompt"]
            assert_f32_close(torch.tensor(mine["weights"]), torch.tensor(theirs["weights"]))
        model = pack.member_model(k)  # its own tensors, the solo run's final weights
        flat = pack.optimizer.flat
        for (key, mine_w), theirs_w in zip(
            model.state_dict().items(), trainer.model.state_dict().values(), strict=True
        ):
            assert_f32_close(mine_w, theirs_w, ulps=1024, msg=key)
            assert mine_w.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    # the members' own schedules: the cosine member reports its rate, the constant one does not
    assert any("lr" in m for _, m in recorders[1].metrics)
    assert not any("lr" in m for _, m in recorders[0].metrics)


@pytest.mark.parametrize("attention", [TORCH_OPS.name, SDPA.name])
def test_members_equal_solo_runs_with_each_attention_backend(shakespeare: Corpus, attention: str):
    configs = two_members({"kind": "multi_head"}, attention=attention, max_iters=20)
    recorders = [Recorder(), Recorder()]
    build_packed_trainer(configs, shakespeare, list(recorders), [None, None]).fit()
    for config, recorder in zip(configs, recorders, strict=True):
        solo = Recorder()
        build_trainer(config, shakespeare, solo).fit()
        assert_same_curves(recorder, solo)


def test_a_longer_run_ends_near_its_solo_run(shakespeare: Corpus):
    configs = two_members({"kind": "multi_head"}, max_iters=300, eval_interval=100)
    results = build_packed_trainer(configs, shakespeare, [None, None], [None, None]).fit()
    for config, result in zip(configs, results, strict=True):
        solo = build_trainer(config, shakespeare).fit()
        assert result.final_val_loss == pytest.approx(solo.final_val_loss, abs=0.02)
        assert result.final_train_loss == pytest.approx(solo.final_train_loss, abs=0.02)
        assert result.final_val_loss < result.history[0]["val_loss"] - 0.3  # it trained


def test_a_diverging_member_is_masked_and_the_others_go_on_unchanged(shakespeare: Corpus):
    model = {"kind": "multi_head"}
    configs = [
        make_config(model, seed=1, grad_clip=1.0, max_iters=60),
        make_config(model, seed=2, learning_rate=1.0e6, grad_clip=1.0, max_iters=60),
        make_config(model, seed=3, learning_rate=3e-3, grad_clip=1.0, max_iters=60),
    ]
    recorders = [Recorder(), Recorder(), Recorder()]
    results = build_packed_trainer(configs, shakespeare, list(recorders), [None] * 3).fit()
    assert [r.status for r in results] == ["finished", "diverged", "finished"]
    assert 0 < results[1].step < 60
    for config, recorder, result in zip(configs, recorders, results, strict=True):
        solo = Recorder()
        assert_same_result(result, build_trainer(config, shakespeare, solo).fit())
        assert_same_curves(recorder, solo)  # the diverged one's up to its divergence
    assert max(step for step, _ in recorders[1].metrics) <= results[1].step


def test_a_huge_but_finite_loss_diverges_by_the_factor(shakespeare: Corpus):
    configs = [
        make_config({"kind": "bigram"}, seed=1),
        make_config({"kind": "bigram"}, seed=2, learning_rate=50.0, divergence_factor=1.5),
    ]
    results = build_packed_trainer(configs, shakespeare, [None, None], [None, None]).fit()
    solo = build_trainer(configs[1], shakespeare).fit()
    assert solo.status == "diverged" and solo.reason is not None and "exceeded" in solo.reason
    assert_same_result(results[1], solo)
    assert results[0].status == "finished"


def test_checkpoints_resume_packs_and_solo_runs_alike(shakespeare: Corpus, tmp_path: Path):
    """A pack killed after its checkpoint at step 20 resumes as a pack, or each member as a
    solo run; solo runs killed likewise resume as a pack; every curve as uninterrupted."""
    configs = two_members({"kind": "single_head"}, max_iters=30)
    straight = []
    for config in configs:
        recorder = Recorder()
        build_trainer(config, shakespeare, recorder, log_interval=4).fit()
        straight.append(recorder)

    def killed_pack(root: Path) -> list[Path]:
        dirs = [root / "a", root / "b"]
        recorders = [Recorder(stop_after_step=20), Recorder()]
        with pytest.raises(KeyboardInterrupt):
            build_packed_trainer(
                configs, shakespeare, list(recorders), list(dirs), log_interval=4
            ).fit()
        assert [r.checkpoints for r in recorders] == [[10, 20], [10, 20]]
        return dirs

    def resumed(recorder: Recorder, reference: Recorder) -> None:
        assert min(s for s, m in recorder.metrics if "val_loss" in m) == 30  # continued
        tail = Recorder()
        tail.metrics = [(s, m) for s, m in reference.metrics if s > 20]
        assert_same_curves(recorder, tail)

    # pack -> pack
    dirs = killed_pack(tmp_path / "pack")
    solo_size = None
    recorders = [Recorder(), Recorder()]
    build_packed_trainer(configs, shakespeare, list(recorders), list(dirs), log_interval=4).fit()
    for recorder, reference in zip(recorders, straight, strict=True):
        resumed(recorder, reference)
    # pack -> solo
    dirs = killed_pack(tmp_path / "pack_solo")
    for config, run_dir, reference in zip(configs, dirs, straight, strict=True):
        recorder = Recorder()
        build_trainer(config, shakespeare, recorder, run_dir, log_interval=4).fit()
        resumed(recorder, reference)
    # solo -> pack
    dirs = [tmp_path / "solo" / "a", tmp_path / "solo" / "b"]
    for config, run_dir in zip(configs, dirs, strict=True):
        with pytest.raises(KeyboardInterrupt):
            build_trainer(
                config, shakespeare, Recorder(stop_after_step=20), run_dir, log_interval=4
            ).fit()
        solo_size = (run_dir / CHECKPOINT_NAME).stat().st_size
    recorders = [Recorder(), Recorder()]
    build_packed_trainer(configs, shakespeare, list(recorders), list(dirs), log_interval=4).fit()
    for recorder, reference in zip(recorders, straight, strict=True):
        resumed(recorder, reference)
    # a member's checkpoint holds its own weights, not the pack's buffer
    pack_size = (tmp_path / "pack_solo" / "a" / CHECKPOINT_NAME).stat().st_size
    assert solo_size is not None and pack_size < 1.2 * solo_size


def test_a_member_a_checkpoint_ahead_goes_back_to_its_packs_step(
    shakespeare: Corpus, tmp_path: Path
) -> None:
    """A kill between two members' checkpoints leaves one a checkpoint ahead: it resumes from
    the one before (kept beside it), with the others, to the uninterrupted pack's numbers."""
    configs = two_members({"kind": "multi_head"}, max_iters=40)
    want = build_packed_trainer(configs, shakespeare, [None, None], [None, None]).fit()
    dirs = [tmp_path / "a", tmp_path / "b"]
    stopping = [Recorder(), StopsAtCheckpoint(20)]
    with pytest.raises(KeyboardInterrupt):
        build_packed_trainer(configs, shakespeare, list(stopping), list(dirs),
                             checkpoint_every_s=0.0).fit()  # fmt: skip
    assert [checkpoint_step(d) for d in dirs] == [20, 10]
    kept = (dirs[0] / "checkpoint.prev.pt").read_bytes()
    (dirs[0] / "checkpoint.prev.pt").write_bytes(b"planted")  # not one workbench wrote: unused
    align_checkpoints(dirs)
    assert [checkpoint_step(d) for d in dirs] == [20, 10]
    (dirs[0] / "checkpoint.prev.pt").write_bytes(kept)
    align_checkpoints(dirs)  # what the sweep does before it trains a pack
    assert [checkpoint_step(d) for d in dirs] == [10, 10]
    recorders = [Recorder(), Recorder()]
    got = build_packed_trainer(configs, shakespeare, list(recorders), list(dirs)).fit()
    assert [min(r.evals()) for r in recorders] == [20, 20]  # both from step 10
    for mine, theirs in zip(got, want, strict=True):
        assert mine.final_val_loss == pytest.approx(theirs.final_val_loss, abs=1e-6)
        assert [h["val_loss"] for h in mine.history] == pytest.approx(
            [h["val_loss"] for h in theirs.history], abs=1e-6
        )


def test_members_resumed_without_an_ended_one_keep_their_rows(
    shakespeare: Corpus, tmp_path: Path
) -> None:
    """A pack resumed after one of its members ended (here: diverged) keeps the others in the
    rows they started in and its width, the ended member's row masked: their numbers are the
    uninterrupted pack's, bit for bit. (Moved up a row instead, the last member's val loss
    differed by 2.4e-7 here: a row's place sets its alignment, and so a kernel's sums.)"""
    model = {"kind": "multi_head"}
    configs = [
        make_config(model, seed=1, learning_rate=1e-2, max_iters=60),
        make_config(model, seed=2, learning_rate=1e6, max_iters=60),  # diverges at once
        make_config(model, seed=3, learning_rate=1e-2, max_iters=60),
    ]
    want = build_packed_trainer(configs, shakespeare, [None] * 3, [None] * 3).fit()
    assert [r.status for r in want] == ["finished", "diverged", "finished"]
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    stopping = [StopsAtCheckpoint(20), Recorder(), Recorder()]
    with pytest.raises(KeyboardInterrupt):
        build_packed_trainer(configs, shakespeare, list(stopping), list(dirs)).fit()
    assert [checkpoint_step(d) for d in dirs] == [10, 0, 10]
    left, left_dirs = [configs[0], configs[2]], [dirs[0], dirs[2]]
    recorders = [Recorder(), Recorder()]
    got = build_packed_trainer(
        left, shakespeare, list(recorders), list(left_dirs), rows=(0, 2), width=3
    ).fit()
    assert [min(r.evals()) for r in recorders] == [20, 20]  # from their checkpoints
    for mine, theirs in zip(got, (want[0], want[2]), strict=True):
        assert mine.status == "finished"
        # Exactly: one process, one layout, the same sums in the same order.
        assert [h["val_loss"] for h in mine.history] == [h["val_loss"] for h in theirs.history]
        assert mine.final_train_loss == theirs.final_train_loss
    with pytest.raises(ValueError, match="one distinct row of 3"):
        build_packed_trainer(left, shakespeare, [None, None], [None, None], rows=(0, 0), width=3)
    with pytest.raises(ValueError, match="one distinct row of 3"):
        build_packed_trainer(left, shakespeare, [None, None], [None, None], rows=(0, 3), width=3)


def test_runs_at_different_steps_are_not_packed(shakespeare: Corpus, tmp_path: Path):
    config = make_config({"kind": "bigram"}, max_iters=30)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(config, shakespeare, Recorder(stop_after_step=10), tmp_path / "a").fit()
    other = config.model_copy(update={"seed": 2})
    with pytest.raises(ValueError, match="one step"):
        build_packed_trainer(
            [config, other], shakespeare, [None, None], [tmp_path / "a", tmp_path / "b"]
        )


def test_pack_key_separates_what_cannot_share_a_step(shakespeare: Corpus):
    base = make_config({"kind": "multi_head"})
    per_member = make_config(
        {"kind": "multi_head"},
        seed=9,
        learning_rate=0.1,
        lr_schedule="cosine",
        warmup_iters=3,
        min_lr=0.01,
        weight_decay=0.0,
        grad_clip=1.0,
        divergence_factor=2.0,
    )
    assert pack_key(base) is not None and pack_key(base) == pack_key(per_member)
    assert pack_key(make_config({"kind": "multi_head"}, block_size=16)) != pack_key(base)
    assert pack_key(make_config({"kind": "multi_head", "n_head": 2})) != pack_key(base)
    assert pack_key(make_config({"kind": "multi_head", "dropout": 0.1})) is None
    assert pack_key(make_config({"kind": "multi_head"}, compile=True)) is None
    with pytest.raises(ValueError, match="differ"):
        build_packed_trainer(
            [base, make_config({"kind": "multi_head"}, block_size=16)],
            shakespeare,
            [None, None],
            [None, None],
        )
    with pytest.raises(ValueError, match="dropout"):
        build_packed_trainer(
            [make_config({"kind": "multi_head", "dropout": 0.1})], shakespeare, [None], [None]
        )


def test_packed_attention_folds_the_pack_into_the_batch():
    torch.manual_seed(0)
    qkv = torch.randn(3, 4, 8, 3 * 16, dtype=torch.float64, requires_grad=True)  # (K, B, T, W)
    bias = torch.full((8, 8), float("-inf"), dtype=torch.float64).triu(1)
    packed = PackedAttention(TORCH_OPS)
    out = torch.func.vmap(lambda q: packed(q, 2, bias, 0.0))(qkv)
    reference = torch.stack([TORCH_OPS(q, 2, bias, 0.0) for q in qkv])
    torch.testing.assert_close(out, reference)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    (expected,) = torch.autograd.grad(reference.square().sum(), qkv)
    torch.testing.assert_close(grad, expected)
    # outside vmap it is its inner backend, gradient included
    single = qkv[0].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda q: packed(q, 2, bias, 0.0), (single,))


def test_a_weight_decay_per_group_steps_like_torch_adamw_per_group():
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(4, 3)

    ours, theirs = [net(), net()], [net(), net()]
    flat = FlatAdamW(
        [list(n.parameters()) for n in ours], lr=1e-2, weight_decay=torch.tensor([0.0, 0.5])
    )
    references = [
        torch.optim.AdamW(n.parameters(), lr=1e-2, weight_decay=decay)
        for n, decay in zip(theirs, (0.0, 0.5), strict=True)
    ]
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(10):
        flat.zero_grad()
        sum(n(x).square().mean() for n in ours).backward()  # type: ignore[union-attr]
        flat.step()
        for n, reference in zip(theirs, references, strict=True):
            reference.zero_grad()
            n(x).square().mean().backward()
            reference.step()
    for mine, reference_net in zip(ours, theirs, strict=True):
        for a, b in zip(mine.parameters(), reference_net.parameters(), strict=True):
            assert_f32_close(a, b, ulps=128)
    assert not torch.equal(ours[0].weight, ours[1].weight)  # the decays told apart
    with pytest.raises(ValueError, match="one decay per group"):
        FlatAdamW([list(ours[0].parameters())], lr=1e-2, weight_decay=torch.tensor([0.1, 0.2]))
