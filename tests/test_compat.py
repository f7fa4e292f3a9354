"""workbench.compat: every private API has a public route, and ``WORKBENCH_PUBLIC_APIS=1`` takes
each one. The routes compute the same thing: checked here in the ordinary run of the suite, and
the suite's model, optimizer and CLI tests run again with the switch on in ``.ci/run``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
import yaml
from floats import assert_f32_close

from workbench import compat, mlflow_model
from workbench.corpus import CharTokenizer
from workbench.models import build_model, export
from workbench.models.attention import SDPA
from workbench.spec import ModelConfig
from workbench.train.optim import FlatAdamW

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def public(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_PUBLIC_APIS", "1")
    monkeypatch.setattr(export, "_programs", type(export._programs)())


def test_the_switch_turns_every_private_route_off(public: None) -> None:
    assert compat.public_only()
    assert compat.fused_adamw(torch.device("cpu")) is None
    assert compat.archive_io() is None
    assert compat.mlflow_model_helpers() is None


def test_no_private_api_outside_the_compat_module() -> None:
    private = re.compile(r"torch\._[A-Za-z]|atexit\._|mlflow(\.[a-z_]+)*\._[a-z]"
                         r"|from (mlflow|torch)[.a-z_]* import .*\b_[a-zA-Z]")  # fmt: skip
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "workbench").rglob("*.py"))
        if path.name != "compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line.split("#")[0]) and "``" not in line
    ]
    assert found == []


def test_the_public_optimizer_route_steps_as_the_fused_kernel(public: None) -> None:
    torch.manual_seed(0)
    nets = [torch.nn.Linear(7, 5), torch.nn.Linear(7, 5)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(16, 7)
    public_route = FlatAdamW(list(nets[0].parameters()), lr=1e-2, weight_decay=0.1)
    assert not public_route.fused
    reference = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        public_route.zero_grad()
        reference.zero_grad()
        for net in nets:
            net(x).square().mean().backward()
        public_route.step()
        reference.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert_f32_close(a, b, ulps=128)


@pytest.mark.parametrize("kind", ["bigram", "multi_head", "transformer"])
def test_the_public_archive_route_computes_the_runs_logits(
    public: None, tmp_path: Path, kind: str
) -> None:
    config = ModelConfig.model_validate({"kind": kind, "n_embd": 16, "n_head": 2, "n_layer": 1}
                                        if kind != "bigram" else {"kind": kind})  # fmt: skip
    for seed in (1, 2):  # the second run of the shape reuses the process's trace
        torch.manual_seed(seed)
        model = build_model(config, 65, 8)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        export.save_logits(model, tmp_path / f"{seed}.pt2")
        program = torch.export.load(tmp_path / f"{seed}.pt2").module()
        same = build_model(config, 65, 8, attention=SDPA).eval()
        same.load_state_dict(model.state_dict())
        for time in (1, 5, 8, 11):
            idx = torch.randint(0, 65, (3, time))
            assert_f32_close(program(idx), same.logits(idx[:, -8:]), ulps=32)
    assert len(export._programs) == 1
    assert not list(tmp_path.glob("cache/**/*.pt2"))  # nothing kept across processes


def test_the_public_model_route_writes_mlflows_own_directory(public: None, tmp_path: Path) -> None:
    model = build_model(ModelConfig(kind="multi_head", n_embd=16, n_head=2), 65, 8)
    tokenizer = CharTokenizer("".join(chr(32 + i) for i in range(65)))
    mlflow_model.save_model(tmp_path / "m", model, tokenizer)
    spec = yaml.safe_load((tmp_path / "m" / "MLmodel").read_text())
    assert spec["metadata"] == {"block_size": 8, "vocab_size": 65}
    assert spec["flavors"]["pytorch"]["extra_files"] == [{"path": "extra_files/tokenizer.json"}]
    text = (tmp_path / "m" / "extra_files" / "tokenizer.json").read_text()
    assert text == tokenizer.to_json()
    loaded = mlflow.pytorch.load_model(str(tmp_path / "m"))
    for time in (1, 8, 13):  # batch and time dynamic; past the block, cropped
        idx = torch.randint(0, 65, (2, time))
        assert_f32_close(loaded(idx), model.logits(idx[:, -8:]), ulps=32)


@pytest.mark.parametrize("public_route", [False, True])
def test_the_console_exit_runs_atexit_handlers_either_way(public_route: bool) -> None:
    script = (
        "import atexit\n"
        "from workbench import compat\n"
        "atexit.register(lambda: print('handler ran', flush=True))\n"
        "print('out', end='')\n"
        "compat.exit_without_teardown(3)\n"
    )
    env = {"WORKBENCH_PUBLIC_APIS": "1" if public_route else "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout == "outhandler ran\n"


def test_the_switch_is_read_without_a_home_or_a_data_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI's exit asks it after every command, --help included, wherever it runs."""

    def no_home() -> Path:
        raise RuntimeError("no home directory")

    monkeypatch.setattr(Path, "home", no_home)
    for name in ("WORKBENCH_DATA_DIR", "XDG_CACHE_HOME", "WORKBENCH_PUBLIC_APIS"):
        monkeypatch.delenv(name, raising=False)
    assert compat.public_only() is False
    monkeypatch.setenv("WORKBENCH_PUBLIC_APIS", "1")
    assert compat.public_only() is True
