"""The ``workbench`` command: a thin adapter over the library.

Heavy modules (torch, mlflow, pandas) are imported inside the commands that need them, so
``workbench --help`` answers at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from workbench import __version__
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.grid import Plan

app = typer.Typer(
    help="Reproducible ablations of the 'Let's build GPT' ladder, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


@app.command()
def plan(spec: SpecArg, set_: SetOpt = None, only: OnlyOpt = None) -> None:
    """Show the runs a spec expands to: names, what varies, parameters and tokens."""
    with user_errors():
        expanded = _expand(spec, set_, only)
        from workbench.plan_view import print_plan

        print_plan(expanded)


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    only: OnlyOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and train nothing.")
    ] = False,
) -> None:
    """Train every run of a spec and record it in MLflow."""
    with user_errors():
        expanded = _expand(spec, set_, only)
        from workbench.plan_view import print_plan

        print_plan(expanded)
        if dry_run:
            return
        raise WorkbenchError("training is not wired to the CLI yet (issue 4); use --dry-run")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the spec, for editors that check and complete YAML."""
    from workbench.spec import spec_json_schema

    typer.echo(json.dumps(spec_json_schema(), indent=2))


def main() -> None:
    app()
