"""Every workbench command the README shows runs as written on the shipped specs: a `run` with
`--dry-run` added, a `plan` as it is, each against a store in the test's folder. Commands that
need a cluster or trained runs (`--address`, a server on HEAD_HOST, `sample`, `report`) are
listed, not run, and the test says which."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from runs import invoke

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
NEEDS_MORE = ("HEAD_HOST", "HOST:", "sample", "report", "--address")


def shown_commands() -> list[str]:
    """The `workbench ...` lines of the README's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("workbench "):
                    commands.append(part.strip())
    return commands


def shown_overrides() -> list[str]:
    """The `--set KEY=VALUE` examples of the README's prose."""
    return sorted(set(re.findall(r"`--set ([a-z_]+\.[\w.]+=[^`\s]+)`", README)))


def runnable(command: str) -> bool:
    return not any(word in command for word in NEEDS_MORE)


def test_the_readme_shows_commands_to_check() -> None:
    commands = shown_commands()
    assert len([c for c in commands if runnable(c)]) >= 4, commands
    assert shown_overrides(), "the README's --set example is gone"


@pytest.mark.parametrize("command", [c for c in shown_commands() if runnable(c)])
def test_each_command_the_readme_shows_runs(command: str, tmp_path: Path) -> None:
    args = shlex.split(command)[1:]
    args = [str(REPO / a) if a.startswith("experiments/") else a for a in args]
    if args[0] in ("run", "plan"):
        args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if args[0] == "run" and "--dry-run" not in args:
        args.append("--dry-run")
    result = invoke(*args)
    assert result.exit_code == 0, f"{command}\n{result.output}"


@pytest.mark.parametrize("override", shown_overrides())
def test_each_override_the_readme_shows_is_accepted(override: str, tmp_path: Path) -> None:
    spec = str(REPO / "experiments" / "ablation.yaml")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = invoke("run", spec, "--set", override, "--dry-run", "--tracking-uri", store)
    assert result.exit_code == 0, f"--set {override}\n{result.output}"


@pytest.mark.slow
def test_the_readmes_model_code_generates_text(tmp_path: Path) -> None:
    """The README's plain MLflow and torch code, run as written on a run trained here, with
    its run id filled in; 200 tokens from a prompt, past the block size of 8."""
    import os
    import subprocess
    import sys

    from specs import SMOKE, write_spec

    from workbench.tracking import TAG

    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "runs:/" in b]
    spec = write_spec(tmp_path, **{**SMOKE, "variants": {"mh": {"model": {"kind": "multi_head"}}}})
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = invoke("run", str(spec), "--tracking-uri", store, "--no-progress",
                  "--checkpoint-dir", str(tmp_path / "checkpoints"))  # fmt: skip
    assert done.exit_code == 0, done.output
    from mlflow.tracking import MlflowClient

    (run,) = [r for r in MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("t").experiment_id]
    ) if TAG + "plan" not in r.data.tags]  # fmt: skip
    script = code.replace('run_id = "..."', f"run_id = {run.info.run_id!r}")
    assert script != code
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 200, text
