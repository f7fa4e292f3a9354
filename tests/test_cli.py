"""The ``workbench`` command, in process with CliRunner, and its import cost in a subprocess."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from runs import Store
from specs import write_spec
from typer.testing import CliRunner

from workbench import __version__
from workbench.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_real_tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``plan`` may read the tracking store: point it at an empty folder, never at the user's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


GOOD = """\
experiment: demo
train: {max_iters: 100, eval_interval: 10}
variants:
  bigram: {model: {kind: bigram}}
  multi_head: {model: {kind: multi_head}}
grid:
  train.block_size: [8, 16]
seeds: [1, 2]
"""

BAD = """\
experiment: demo
model: {kind: transformr}
train: {batch_size: "32", max_iters: 0}
grid:
  train.blok_size: [8, 16]
"""


def flat(text: str) -> str:
    """Help text without rich's boxes and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def command_names() -> list[str]:
    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


# --- help ---------------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert {"plan", "run", "schema"} <= set(command_names())
    out = flat(result.stdout)
    for name in command_names():
        assert re.search(rf"\b{name}\b", out), name


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.output
    assert "plan" in result.output


@pytest.mark.parametrize("name", command_names())
def test_every_command_has_help_text(name: str) -> None:
    (command,) = [
        c
        for c in app.registered_commands
        if (c.name or c.callback.__name__.replace("_", "-")) == name
    ]
    text = command.help or inspect.getdoc(command.callback)
    assert text and len(text.split()) >= 3
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    first_line = text.strip().splitlines()[0]
    assert flat(first_line) in flat(result.stdout)


def test_help_text_is_rewrapped_whole() -> None:
    """A docstring's line breaks are not the terminal's: each command's description in
    ``--help`` fills its lines but the last (20defc6 broke `plan` and `report` mid-sentence),
    and brackets are text, not markup (``'workbench[system-metrics]'`` was cut to
    ``'workbench'``)."""
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "100", "TERMINAL_WIDTH": "100"})
    assert result.exit_code == 0, result.output
    entries: list[list[str]] = []
    for line in result.stdout.splitlines():
        cells = line.strip("│ \n")
        if re.match(rf"│ ({'|'.join(command_names())}) ", line):
            entries.append([cells])
        elif entries and line.startswith("│ ") and cells:
            entries[-1].append(cells)
    assert len(entries) == len(command_names()), result.stdout
    for entry in entries:
        widths = [len(line) for line in entry]
        assert all(w >= 0.75 * max(widths) for w in widths[:-1]), entry
    run_help = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "100"})
    assert "'workbench[system-metrics]'" in flat(run_help.stdout).replace(" ", "")


def test_every_option_and_argument_has_help_text() -> None:
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert set(commands) == set(command_names())
    for name, command in commands.items():
        for param in command.params:
            if param.name == "help":
                continue
            assert getattr(param, "help", None), f"{name} {param.name}"


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"workbench {__version__}"


# --- plan ---------------------------------------------------------------------------------------


def test_plan_prints_the_table_and_totals(tmp_path: Path) -> None:
    path = write_spec(tmp_path, GOOD)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert "demo: 8 runs" in out
    for header in ("run", "kind", "block_size", "seed", "params", "tokens"):
        assert header in out
    for variant in ("bigram", "multi_head"):
        for block in (8, 16):
            for seed in (1, 2):
                assert f"{variant} bs={block} s={seed}" in out
    assert "4,225" in out  # the bigram: a 65 x 65 table
    assert "25.6k" in out and "51.2k" in out  # 100 iters x 32 batch x 8 or 16 characters
    assert out.strip().splitlines()[-2:] == [
        "8 runs: 0 finished, 0 to resume, 8 to train",
        "left: 307k tokens, time unknown until a run has finished",
    ]


def test_plan_totals_mention_excluded_and_identical_runs(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        """\
        experiment: demo
        train: {max_iters: 100, eval_interval: 10}
        variants:
          a: {model: {kind: bigram}}
          c: {model: {kind: bigram, n_embd: 16}}
        grid: {train.block_size: [8, 16]}
        exclude: [{variant: c}]
        """,
    )
    # --set over a grid key: its two points are one run, trained once
    result = runner.invoke(app, ["plan", str(path), "--set", "train.block_size=8"])
    assert result.exit_code == 0, result.output
    assert "demo: 1 runs" in result.stdout
    assert "1 runs: 0 finished, 0 to resume, 1 to train, 2 excluded, 1 identical runs dropped" in (
        result.stdout
    )
    assert "left: 25.6k tokens" in result.stdout
    assert "identical: a bs=8 s=1337 = a s=1337" in result.stdout


def test_plan_with_set_and_only(tmp_path: Path) -> None:
    path = write_spec(tmp_path, GOOD)
    result = runner.invoke(
        app,
        [
            "plan",
            str(path),
            "--set",
            "train.max_iters=200",
            "--set",
            "seeds=[5]",
            "--only",
            "multi_head *",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "demo: 2 runs" in result.stdout
    assert "multi_head bs=8 iters=200 s=5" in result.stdout
    assert "multi_head bs=16 iters=200 s=5" in result.stdout
    assert "bigram-" not in result.stdout
    assert "left: 154k tokens" in result.stdout  # 200 x 32 x (8 + 16)


def test_plan_on_a_bad_spec_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BAD)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    kinds = "bigram, uniform_avg, softmax_avg, single_head, multi_head, transformer"
    assert result.stderr.splitlines() == [
        f"{path}: train.batch_size: expected an integer (got '32')",
        f"{path}: train.max_iters: must be > 0 (got 0)",
        f"{path}: model.kind: must be one of {kinds} (got 'transformr')",
        f"{path}: grid.train.blok_size: unknown key (did you mean train.block_size?)",
    ]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("text", "args", "expected"),
    [
        (None, [], "{path}: no such file"),
        (
            "experiment: !!python/object/apply:os.system ['true']\n",
            [],
            "{path}: line 1: invalid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'",
        ),
        ("experiment: t\nvariants:\n  a: {}\n  a: {}\n", [], "{path}: line 4: a: duplicate key"),
        (
            GOOD,
            ["--set", "train.max_iters"],
            "--set 'train.max_iters': expected KEY=VALUE, e.g. train.max_iters=200",
        ),
        (
            GOOD,
            ["--set", "train.max_iter=3"],
            "--set: train.max_iter: unknown key (did you mean train.max_iters?)",
        ),
        (GOOD, ["--only", "transformer-*"], "--only transformer-*: no run name matches"),
    ],
)
def test_plan_user_errors(tmp_path: Path, text: str | None, args: list[str], expected: str) -> None:
    path = tmp_path / "spec.yaml"
    if text is not None:
        write_spec(tmp_path, text)
    result = runner.invoke(app, ["plan", str(path), *args])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [expected.format(path=path)]
    assert result.stdout == ""
    assert "Traceback" not in result.output


# --- run ----------------------------------------------------------------------------------------


def test_run_dry_run_prints_the_plan_and_exits_0(tmp_path: Path) -> None:
    path = write_spec(tmp_path, GOOD)
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "demo: 8 runs" in result.stdout
    assert "bigram bs=8 s=1" in result.stdout
    assert result.stdout.strip().splitlines()[-2:] == [
        "8 runs: 0 finished, 0 to resume, 8 to train",
        "left: 307k tokens, time unknown until a run has finished",
    ]
    assert not (tmp_path / "mlflow.db").exists()  # read, never created
    assert result.stderr == ""


def test_run_dry_run_with_only(tmp_path: Path) -> None:
    path = write_spec(tmp_path, GOOD)
    result = runner.invoke(app, ["run", str(path), "--dry-run", "--only", "bigram * s=2"])
    assert result.exit_code == 0, result.output
    assert "demo: 2 runs" in result.stdout


def test_run_on_a_bad_spec_exits_2(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BAD)
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 4
    assert "Traceback" not in result.output


# --- schema -------------------------------------------------------------------------------------


def test_schema_prints_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    for key in (
        "experiment",
        "variants",
        "grid",
        "zip",
        "exclude",
        "seeds",
        "train",
        "model",
        "data",
    ):
        assert key in schema["properties"], key
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)


# --- import cost --------------------------------------------------------------------------------

HEAVY = ("torch", "mlflow", "pandas", "seaborn")


def heavy_modules_after(code: str) -> list[str]:
    """The heavy top-level modules imported once ``code`` ran in a fresh interpreter."""
    script = (
        "import sys, json\n"
        f"{code}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_neither_torch_nor_mlflow() -> None:
    code = (
        "from typer.testing import CliRunner\n"
        "from workbench.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0 and 'plan' in result.stdout, result.output\n"
    )
    assert heavy_modules_after(code) == []


def test_help_of_the_console_script_imports_neither_torch_nor_mlflow() -> None:
    code = (
        "from workbench.cli import main\n"
        "sys.argv = ['workbench', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
    )
    assert heavy_modules_after(code) == []


def test_schema_imports_no_heavy_module() -> None:
    code = (
        "from typer.testing import CliRunner\n"
        "from workbench.cli import app\n"
        "assert CliRunner().invoke(app, ['schema']).exit_code == 0\n"
    )
    assert heavy_modules_after(code) == []


@pytest.mark.parametrize(
    "module", ["workbench", "workbench.grid", "workbench.spec", "workbench.cli"]
)
def test_light_modules_do_not_import_torch(module: str) -> None:
    assert heavy_modules_after(f"import {module}") == []


@pytest.mark.slow
def test_the_driver_of_a_local_sweep_does_not_import_torch(tmp_path: Path) -> None:
    """The workers train and write their runs; the driver reads their events, which must not
    make it import torch to read them (seconds)."""
    spec = write_spec(tmp_path)  # two runs, two workers where there are two cores
    code = (
        "import os\n"
        f"os.chdir({str(tmp_path)!r})\n"
        "from workbench.cli import main\n"
        f"sys.argv = ['workbench', 'run', {str(spec)!r}, '--no-progress']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
    )
    heavy = heavy_modules_after(code)
    assert "mlflow" in heavy and "torch" not in heavy, heavy
    runs = Store(tmp_path).runs()
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags["workbench.torch_version"] for r in runs)


def test_the_check_itself_sees_torch() -> None:
    # Guards the tests above: the same probe does see torch when it is imported.
    pytest.importorskip("torch")
    assert "torch" in heavy_modules_after("import torch")


def test_committed_schema_file_is_up_to_date() -> None:
    """experiments/*.yaml point editors at workbench.schema.json; it must match the code."""
    import json
    from pathlib import Path

    from workbench.spec import spec_json_schema

    committed = Path(__file__).resolve().parents[1] / "workbench.schema.json"
    assert json.loads(committed.read_text()) == spec_json_schema(), (
        "regenerate it: workbench schema > workbench.schema.json"
    )


# --- the console script's exit -------------------------------------------------------------------


def console_run(
    *args: str, before: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``workbench ARGS`` through the console script's function, in a fresh interpreter, its
    output piped (so buffered): ``before`` runs first."""
    script = (
        "import sys\n"
        f"{before}\n"
        "from workbench.cli import console\n"
        f"sys.argv = ['workbench', *{list(args)!r}]\n"
        "console()\n"
        "raise SystemExit('console() returned')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_the_console_script_exits_with_the_commands_code_its_output_and_atexit_handlers(
    tmp_path: Path,
) -> None:
    before = "import atexit\natexit.register(lambda: print('atexit ran'))"
    done = console_run("--version", before=before)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"workbench {__version__}", "atexit ran"]
    spec = write_spec(tmp_path, train={"max_iters": 0})
    done = console_run("run", str(spec), before=before, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "max_iters" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.rstrip().endswith("atexit ran")
    assert not (tmp_path / "mlflow.db").exists()


def test_the_console_script_exits_as_python_does_with_a_message() -> None:
    before = (  # the module, not the Typer app that workbench.cli exports under its name
        "import workbench.cli\n"
        "sys.modules['workbench.cli.app'].main = lambda: sys.exit('stopped: why')"
    )
    done = console_run("--version", before=before)
    assert done.returncode == 1 and done.stderr.strip() == "stopped: why", done


def test_the_estimate_comes_from_runs_of_the_same_shape_anywhere_in_the_experiment(
    tmp_path: Path,
) -> None:
    """A run of another plan (another max_iters) still times a step of its shape; a shape
    nobody measured is estimated per token from its model; nothing measured: unknown."""
    from workbench.cli.estimate import StepTimes, params_of
    from workbench.grid import expand
    from workbench.tracking import RunRecord

    one_variant = {"b": {"model": {"kind": "bigram"}}}
    spec = write_spec(tmp_path, variants=one_variant, grid={"train.block_size": [8, 16]})
    runs = expand(spec).runs  # bigram at block 8 and 16
    assert [r.config.train.block_size for r in runs] == [8, 16]
    assert StepTimes.of([]).seconds(runs[0], 100) is None
    measured = {**params_of(runs[0]), "train.max_iters": "1000"}  # same shape, longer
    finished = RunRecord("id", "FINISHED", {}, {"wall_time_s": 2.0}, 0, params=measured)
    killed = RunRecord("id2", "KILLED", {}, {"wall_time_s": 99.0}, 0, params=measured)
    times = StepTimes.of([finished, killed])
    assert times.measured == 1
    assert times.seconds(runs[0], 100) == pytest.approx(0.2)  # 2 ms a step
    # block 16: twice the tokens a step, at the bigram's measured seconds per token
    assert times.seconds(runs[1], 100) == pytest.approx(0.4)


def test_the_time_left_is_labelled_and_comes_from_each_shapes_step_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shapes: estimating until each has a measured rate; then the steps left of every
    unfinished run at its shape's seconds per step, shared among the runs training at once."""
    import io

    from rich.console import Console

    from workbench.cli import progress
    from workbench.grid import expand
    from workbench.sweep import events
    from workbench.sweep.driver import Action, Decision
    from workbench.tracking import RunState

    one_variant = {"b": {"model": {"kind": "bigram"}}}
    spec = write_spec(tmp_path, variants=one_variant, grid={"train.block_size": [8, 16]},
                      seeds=[1, 2])  # fmt: skip
    runs = expand(spec).runs  # 2 shapes x 2 seeds
    assert len(runs) == 4 and {r.config.train.max_iters for r in runs} == {40}
    display = progress.SweepProgress(Console(file=io.StringIO()), live=False)
    display.start([Decision(r, Action.NEW, RunState.TO_DO) for r in runs])
    assert display._left() == "time left: estimating"
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    small, large = runs[0], runs[2]
    assert small.config.train.block_size == 8 and large.config.train.block_size == 16
    for run in (small, large):
        display.event(events.Started(run.key, 1))
        display.event(events.Progress(run.key, 0, {}))
    clock[0] = 1.0
    display.event(events.Progress(small.key, 20, {}))  # 50 ms a step
    assert display._left() == "time left: estimating"  # block 16 not measured yet
    display.event(events.Progress(large.key, 10, {}))  # 100 ms a step
    # left: 20 + 40 steps at 50 ms, 30 + 40 at 100 ms = 10 s, two runs at once
    assert display._left() == "about 5s left"


def test_a_sweep_interrupted_before_any_run_ended_is_not_nothing_to_do(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from workbench.cli.progress import print_summary
    from workbench.grid import expand
    from workbench.sweep.driver import Action, Decision, Summary
    from workbench.tracking import RunState

    runs = expand(write_spec(tmp_path)).runs
    decisions = [Decision(r, Action.NEW, RunState.TO_DO) for r in runs]
    out = io.StringIO()
    print_summary(Console(file=out, width=200), Summary("1", "s", decisions), "t", 3.0)
    assert (
        out.getvalue().strip() == f"t: {len(runs)} runs: 0 finished, {len(runs)} not started, in 3s"
    )
