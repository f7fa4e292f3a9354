"""The CUDA path: SDPA against the CPU kernels, bf16 autocast, TF32, fused AdamW on the GPU,
checkpoints that move between devices, ``compile: true`` and per-worker GPUs.

Skipped where there is no CUDA device (CI, the 2-core development machine); run on a GPU host
with ``pytest -m gpu``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from floats import assert_f32_close
from runs import Store
from specs import write_spec
from test_optim import loss_of, small_net
from test_packed import make_config as member_config
from test_trainer import TRANSFORMER, Recorder, make_config
from typer.testing import CliRunner

from workbench.cli import app
from workbench.corpus import Corpus
from workbench.models import build_model
from workbench.models import native as kernels
from workbench.spec import ModelConfig
from workbench.tracking import TAG
from workbench.train.checkpoint import CHECKPOINT_NAME
from workbench.train.factory import build_trainer
from workbench.train.optim import FlatAdamW
from workbench.train.process import prepare_process, resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LADDER = [
    {"kind": "single_head"},
    {"kind": "multi_head", "n_head": 4},
    {"kind": "transformer", "n_layer": 3},  # rung 6
]


@pytest.fixture(autouse=True)
def restore_tf32() -> Iterator[None]:
    """prepare_process turns TF32 on for the whole process; no test leaks that into the next."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def exact_float32() -> None:
    """TF32 off for comparisons to float32 CPU math."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under the working folder
    return Store(tmp_path)


def test_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("model", LADDER, ids=lambda m: m["kind"])
@pytest.mark.parametrize("block_size", [8, 64])
@pytest.mark.parametrize("native", [True, False], ids=["c_kernel", "torch_ops"])
def test_cuda_sdpa_equals_the_cpu_path(
    model: dict[str, Any],
    block_size: int,
    native: bool,
    exact_float32: None,
    monkeypatch: pytest.MonkeyPatch,
):
    # On a CPU, blocks up to 32 go through the C kernel (where one builds) or, without it,
    # TinyCausalAttention; longer blocks and CUDA go through SDPA.
    if not native:
        monkeypatch.setattr(kernels, "tiny_attention", lambda head_size: None)
    torch.manual_seed(0)
    config = ModelConfig.model_validate({"n_embd": 32, **model})
    cpu = build_model(config, 65, block_size)
    gpu = copy.deepcopy(cpu).cuda()
    idx = torch.randint(0, 65, (4, block_size), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)
    logits_cpu, loss_cpu = cpu(idx, targets)
    logits_gpu, loss_gpu = gpu(idx.cuda(), targets.cuda())
    assert loss_cpu is not None and loss_gpu is not None
    assert_f32_close(logits_gpu.cpu(), logits_cpu, ulps=1024)
    loss_cpu.backward()
    loss_gpu.backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert_f32_close(b.grad.cpu(), a.grad, ulps=8192, msg=name)


def test_cuda_run_trains_in_bf16_with_float32_weights(shakespeare: Corpus):
    config = make_config(
        TRANSFORMER,
        device="cuda",
        max_iters=200,
        eval_interval=100,
        learning_rate=3e-3,
    )
    recorder = Recorder()
    assert prepare_process(config.train).type == "cuda"
    assert torch.backends.cuda.matmul.allow_tf32
    trainer = build_trainer(config, shakespeare, recorder)
    x, _ = trainer.eval_sets["val"]
    with trainer.autocast():
        assert trainer.model.logits(x[:4].cuda()).dtype == torch.bfloat16
    result = trainer.fit()
    assert result.status == "finished" and result.device.startswith("cuda")
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.model.parameters())
    evals = recorder.evals()
    assert evals[200]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert "attention.json" in recorder.artifacts
    assert len(recorder.artifacts["sample.txt"]) == 501


def test_cuda_training_and_sample_are_reproducible(shakespeare: Corpus):
    config = make_config({"kind": "multi_head"}, device="cuda", max_iters=40)
    prepare_process(config.train)  # TF32 on, as in a job
    a, b = build_trainer(config, shakespeare), build_trainer(config, shakespeare)
    assert a.fit().final_val_loss == pytest.approx(b.fit().final_val_loss, abs=1e-4)
    assert a.sample(200) == b.sample(200)


@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.private_api), False])
def test_flat_adamw_on_cuda_matches_torch_adamw(fused: bool):
    ours, theirs = small_net().cuda(), small_net().cuda()
    flat = FlatAdamW(list(ours.parameters()), lr=3e-2, weight_decay=0.1, fused=fused)
    reference = torch.optim.AdamW(theirs.parameters(), lr=3e-2, weight_decay=0.1, fused=True)
    for step in range(25):
        flat.zero_grad()
        loss_of(ours, step).backward()
        reference.zero_grad()
        loss_of(theirs, step).backward()
        flat.step()
        reference.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_f32_close(a, b, ulps=128, msg=name)
    assert not torch.equal(ours[1].weight.cpu(), small_net()[1].weight)  # it did train


def test_cuda_resume_continues_and_moves_to_cpu(shakespeare: Corpus, tmp_path: Path):
    config = make_config(TRANSFORMER, device="cuda")
    prepare_process(config.train)  # TF32 on, as in a job
    straight = Recorder()
    build_trainer(config, shakespeare, straight, tmp_path / "a").fit()

    interrupted = Recorder(stop_after_step=20)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(config, shakespeare, interrupted, tmp_path / "b").fit()
    saved = (tmp_path / "b" / CHECKPOINT_NAME).read_bytes()
    resumed = Recorder()
    build_trainer(config, shakespeare, resumed, tmp_path / "b").fit()
    assert min(resumed.evals()) == 40
    # Not held to 1e-6 as on a CPU: CUDA does not promise bitwise-equal runs (deterministic
    # algorithms are off), and bf16 autocast magnifies any difference.
    for step in (40, 60):
        assert resumed.evals()[step]["val_loss"] == pytest.approx(
            straight.evals()[step]["val_loss"], abs=1e-2
        )

    # The same checkpoint finishes on a CPU.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CHECKPOINT_NAME).write_bytes(saved)
    on_cpu = Recorder()
    cpu_config = make_config(TRANSFORMER, device="cpu")
    result = build_trainer(cpu_config, shakespeare, on_cpu, tmp_path / "c").fit()
    assert result.status == "finished" and result.device == "cpu"
    assert on_cpu.evals()[60]["val_loss"] == pytest.approx(
        straight.evals()[60]["val_loss"], abs=5e-2
    )


@pytest.mark.slow
def test_compile_on_cuda_matches_eager(shakespeare: Corpus):
    def run(compile: bool) -> dict[int, dict[str, float]]:
        recorder = Recorder()
        config = make_config(
            {"kind": "transformer", "n_layer": 2}, device="cuda", compile=compile, max_iters=40
        )
        prepare_process(config.train)
        trainer = build_trainer(config, shakespeare, recorder)
        assert (trainer.forward_model is not trainer.model) == compile
        trainer.fit()
        return recorder.evals()

    eager, compiled = run(False), run(True)
    assert compiled[40]["val_loss"] == pytest.approx(eager[40]["val_loss"], abs=2e-2)
    assert compiled[40]["val_loss"] < compiled[0]["val_loss"]


@pytest.mark.slow
def test_workbench_run_gives_each_worker_its_own_gpu(tmp_path: Path, store: Store):
    spec = write_spec(tmp_path, train={"max_iters": 40, "eval_interval": 20, "eval_iters": 4})
    result = CliRunner().invoke(app, ["run", str(spec), *store.args(), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    runs = store.runs()
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG + "device"].startswith("cuda")
        assert run.data.tags[TAG + "gpu_name"] == torch.cuda.get_device_name(0)
    visible = {run.data.tags[TAG + "cuda_visible_devices"] for run in runs}
    # Two runs in two workers: one GPU each where there are two, both on the one otherwise.
    assert len(visible) == min(2, torch.cuda.device_count())


@pytest.mark.parametrize("model", LADDER, ids=lambda m: m["kind"])
def test_packed_members_on_cuda_match_their_runs_alone(shakespeare: Corpus, model: dict[str, Any]):
    """A pack on the GPU (bf16 autocast, TF32, SDPA folded over the pack) ends where each member
    ends alone on the GPU, within bf16's rounding over 300 steps."""
    from workbench.train.packed import build_packed_trainer

    configs = [
        member_config(
            model, device="cuda", max_iters=300, eval_interval=100, seed=seed, learning_rate=rate
        )
        for seed, rate in ((1, 1e-3), (2, 3e-3), (3, 1e-2))
    ]
    prepare_process(configs[0].train)
    packed = build_packed_trainer(configs, shakespeare, [None] * 3, [None] * 3).fit()
    alone = [build_trainer(config, shakespeare).fit() for config in configs]
    for ours, theirs in zip(packed, alone, strict=True):
        assert ours.status == theirs.status == "finished" and ours.device.startswith("cuda")
        assert ours.final_val_loss == pytest.approx(theirs.final_val_loss, abs=0.03)


def test_workbench_run_packs_by_default_on_a_gpu(tmp_path: Path, store: Store):
    spec = write_spec(
        tmp_path,
        train={"max_iters": 40, "eval_interval": 20, "eval_iters": 2, "device": "auto"},
        variants={"multi_head": {"model": {"kind": "multi_head"}}},
        seeds=[1, 2, 3],
    )
    result = CliRunner().invoke(app, ["run", str(spec), "--jobs", "1", *store.args()])
    assert result.exit_code == 0, result.output
    runs = store.runs()
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags[TAG + "pack"] for r in runs}) == 1
    assert all(r.data.tags[TAG + "device"].startswith("cuda") for r in runs)
