"""The ``workbench`` command: a thin adapter over the library.

Heavy modules (torch, mlflow, pandas) are imported inside the commands that need them, so
``workbench --help`` answers at once.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from workbench import __version__, compat
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.grid import Plan
    from workbench.sweep.packs import PackSetting

MAX_PACK_SIZE = 256  # a pack's run keys (17 characters each) fit one MLflow tag of 8000

app = typer.Typer(
    help="Reproducible ablations of the 'Let's build GPT' ladder, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # a docstring's lines are rewrapped as one paragraph
)

SpecArg = Annotated[
    Path, typer.Argument(help="Experiment spec (YAML), e.g. experiments/ablation.yaml.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a value for every run (dotted key, YAML value); repeatable.",
    ),
]
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option("--only", metavar="GLOB", help="Keep the runs whose name matches; repeatable."),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """A problem the user can fix: one line each on stderr, exit code 2, no traceback."""
    try:
        yield
    except WorkbenchError as exc:
        for line in exc.lines():
            typer.echo(line, err=True)
        raise typer.Exit(code=2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"workbench {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Reproducible ablations of the 'Let's build GPT' ladder, tracked in MLflow."""


def _expand(spec: Path, sets: list[str] | None, only: list[str] | None) -> Plan:
    from workbench.grid import expand

    return expand(spec, sets or [], only or [])


TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
    ),
]


def _tracking_uri(explicit: str | None) -> str:
    import logging

    from workbench.settings import load_settings
    from workbench.store import tracking_uri

    # "Creating initial MLflow database tables..." is noise on a terminal, and a store error
    # reaches the user as one line (workbench.store.store_errors), not as MLflow's traceback.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

    return tracking_uri(explicit, load_settings().tracking_uri)


@app.command()
def plan(
    spec: SpecArg,
    set_: SetOpt = None,
    only: OnlyOpt = None,
    tracking_uri: TrackingOpt = None,
    offline: Annotated[
        bool, typer.Option("--no-store", help="Don't read the tracking store for run states.")
    ] = False,
) -> None:
    """Show the runs a spec expands to (names, what varies, parameters, tokens) and, from the
    tracking store, which are finished, failed, diverged, killed, running, stale or still to do,
    and the tokens and estimated time of what is left."""
    with user_errors():
        expanded = _expand(spec, set_, only)
        if offline:
            from workbench.cli.plan_view import print_plan

            print_plan(expanded)
        else:
            _print_plan_from_store(expanded, _tracking_uri(tracking_uri))


def _print_plan_from_store(
    expanded: Plan, uri: str, force: bool = False, rerun_failed: bool = False
) -> None:
    """The plan with each run's state in the store and what a ``workbench run`` would do."""
    from workbench.cli.plan_view import print_plan, what_is_left
    from workbench.sweep.driver import plan_records

    records = plan_records(expanded, uri)
    left = what_is_left(expanded, records, uri, force, rerun_failed)
    status = {key: record.state for key, record in records.items()}
    print_plan(expanded, status, left=left)


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    only: OnlyOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan and what is left to train; train nothing."),
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j", min=1, help="Runs at once (default: one per GPU, else per core)."
        ),
    ] = None,
    jobs_per_gpu: Annotated[
        int, typer.Option("--jobs-per-gpu", min=1, help="Runs sharing each GPU.")
    ] = 1,
    tracking_uri: TrackingOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain runs that are done.")] = False,
    rerun_failed: Annotated[
        bool, typer.Option("--rerun-failed", help="Retry runs that failed or diverged.")
    ] = False,
    checkpoint_dir: Annotated[
        Path, typer.Option("--checkpoint-dir", help="Where resume checkpoints live.")
    ] = Path("runs/checkpoints"),
    checkpoint_every: Annotated[
        float,
        typer.Option(
            "--checkpoint-every",
            min=0.0,
            metavar="SECONDS",
            help="Checkpoint at eval points at most this often (0: every eval).",
        ),
    ] = 10.0,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Live progress (off when piped).")
    ] = True,
    executor: Annotated[
        str, typer.Option("--executor", help="local (worker processes) or ray (a Ray cluster).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster: auto, or ray://HOST:10001 (default: local)."),
    ] = None,
    cpus_per_run: Annotated[
        float, typer.Option("--cpus-per-run", min=0.0, help="Ray: CPUs each run asks for.")
    ] = 1.0,
    gpus_per_run: Annotated[
        float,
        typer.Option("--gpus-per-run", min=0.0, help="Ray: GPUs each run asks for (0.25 packs 4)."),
    ] = 0.0,
    max_retries: Annotated[
        int,
        typer.Option("--max-retries", min=0, help="Ray: retries of a crashed worker, per run."),
    ] = 2,
    pack: Annotated[
        bool | None,
        typer.Option(
            "--pack/--no-pack",
            help="Train runs that differ only in seed, learning rate or schedule together, as "
            "one stacked model (default: on a GPU only).",
        ),
    ] = None,
    pack_size: Annotated[
        int | None,
        typer.Option("--pack-size", min=2, help="Runs per pack at most (default: 64)."),
    ] = None,
    system_metrics: Annotated[
        bool,
        typer.Option(
            "--system-metrics",
            help="Record MLflow's system metrics (CPU, memory, GPU) of each run; needs psutil "
            "(pip install 'workbench[system-metrics]'), and pynvml for GPUs.",
        ),
    ] = False,
) -> None:
    """Train every run of a spec and record it in MLflow; runs already finished are skipped,
    interrupted ones resume from their checkpoint."""
    with user_errors():
        if system_metrics:
            _require_psutil()
        if pack_size is not None and pack_size > MAX_PACK_SIZE:  # its keys are one MLflow tag
            raise WorkbenchError(f"--pack-size {pack_size}: at most {MAX_PACK_SIZE}")
        expanded = _expand(spec, set_, only)
        from workbench.cli.plan_view import make_console

        console = make_console()
        if dry_run:  # what this command would do: the store is read, nothing written
            _print_plan_from_store(expanded, _tracking_uri(tracking_uri), force, rerun_failed)
            return
        from workbench.cache import check_folders
        from workbench.settings import load_settings
        from workbench.sweep.driver import Options
        from workbench.sweep.executors import make_executor
        from workbench.sweep.packs import DEFAULT_PACK_SIZE

        check_folders(load_settings().cache_dir)  # a cache others can write to: refused here
        chosen, threads = make_executor(
            executor, jobs, jobs_per_gpu, address, cpus_per_run, gpus_per_run, max_retries
        )
        options = Options(
            tracking_uri=_tracking_uri(tracking_uri),
            checkpoint_dir=checkpoint_dir.resolve(),
            data_dir=load_settings().data_dir,
            force=force,
            rerun_failed=rerun_failed,
            threads_per_job=threads,
            checkpoint_every_s=checkpoint_every,
            system_metrics=system_metrics,
            pack=_pack_setting(pack, executor, gpus_per_run),
            pack_size=pack_size or DEFAULT_PACK_SIZE,
            workers=getattr(chosen, "jobs", 1),  # local worker processes; Ray: its own slots
        )
        from workbench.cli.progress import download_data, sweep_with_progress

        download_data(expanded, options.data_dir)
        live = progress and console.is_terminal
        code = sweep_with_progress(expanded, chosen, options, console, live)
        raise typer.Exit(code=code)


def _pack_setting(pack: bool | None, executor: str, gpus_per_run: float) -> PackSetting:
    """--pack, --no-pack, or by default: on a GPU. Ray runs on GPUs when they ask for them (the
    driver's machine may have none); locally, the driver looks for GPUs itself."""
    if pack is not None:
        return "on" if pack else "off"
    return "on" if executor == "ray" and gpus_per_run > 0 else "auto"


def _require_psutil() -> None:
    """MLflow samples system metrics with psutil, which workbench does not require."""
    import importlib

    try:
        importlib.import_module("psutil")
    except ImportError:
        raise WorkbenchError(
            "--system-metrics needs psutil, which is not installed: "
            "pip install 'workbench[system-metrics]'"
        ) from None


@app.command()
def sample(
    run: Annotated[
        str,
        typer.Argument(
            help="A run name, run key or MLflow run id (a name or key of several configs is "
            "refused, listing them)."
        ),
    ],
    prompt: Annotated[
        str, typer.Option("--prompt", help="Text to continue.", show_default="a newline")
    ] = "\n",
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Characters to generate.")] = 500,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Default: the run's seed.")] = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="Look for the run name only here.")
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Generate text from a finished run's weights and tokenizer, loaded from MLflow."""
    with user_errors():
        from workbench.sampling import generate_text
        from workbench.store import store_errors

        uri = _tracking_uri(tracking_uri)
        with store_errors(uri, os_errors=False):
            text = generate_text(uri, run, prompt, tokens, temperature, seed, experiment)
        typer.echo(text)


@app.command()
def report(
    experiment: Annotated[
        list[str] | None,
        typer.Option(
            "--experiment",
            "-e",
            help="Experiment to report on; repeatable "
            "(default: every experiment with workbench runs).",
        ),
    ] = None,
    spec: Annotated[
        Path | None, typer.Option("--spec", help="Report on this spec's experiment.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output file (one experiment) or folder (default: reports/)."),
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Write one self-contained HTML page per experiment (tables, plots, samples, attention
    maps) and the tidy CSV beside it, read from MLflow. An experiment that cannot be reported
    is one line on stderr and exit code 1; the others are written."""
    with user_errors():
        names = list(experiment or [])
        if spec is not None:
            names.append(_expand(spec, None, None).experiment)
        from workbench.report import report_experiments

        def warn(line: str) -> None:
            typer.echo(line, err=True)

        from workbench.store import store_errors

        uri = _tracking_uri(tracking_uri)
        with store_errors(uri, os_errors=False):
            reports = report_experiments(uri, names or None, out, warn)
        for path in reports.paths:
            typer.echo(str(path))
        for line in reports.failures:
            typer.echo(line, err=True)
        if reports.failures:
            raise typer.Exit(code=1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the spec, for editors that check and complete YAML."""
    from workbench.spec import spec_json_schema

    typer.echo(json.dumps(spec_json_schema(), indent=2))


def main() -> None:
    app()


def console() -> None:
    """The ``workbench`` command and ``python -m workbench``: :func:`main`, then the process's
    exit without the interpreter's teardown of the modules the command loaded (MLflow,
    SQLAlchemy, pandas: about 0.4 s, a quarter of a rerun). Nothing is lost by it: the store
    commits each call, atexit's handlers (MLflow's, multiprocessing's, logging's) run as in any
    exit, and stdout and stderr are flushed. A thread still running keeps the usual exit."""
    try:
        main()
        code = 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:  # as Python does with a message
            print(done.code, file=sys.stderr)
            code = 1
    main_thread = threading.main_thread()
    if any(t is not main_thread and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    compat.exit_without_teardown(code)
