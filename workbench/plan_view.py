"""The plan as a rich table: one row per run, then totals."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from workbench.datasets import vocab_size
from workbench.grid import Plan, Run, format_value, short_names


def make_console() -> Console:
    console = Console()
    if not console.is_terminal:  # logs and pipes: don't fold run names at 80 columns
        console.width = max(console.width, 200)
    return console


def parameter_counts(runs: list[Run]) -> dict[str, int]:
    """Parameter count per run key (models built on the meta device, no weights allocated)."""
    from workbench.models import count_params

    cache: dict[str, int] = {}
    vocabs: dict[tuple[str | None, str | None], int] = {}
    counts: dict[str, int] = {}
    for run in runs:
        config = run.config
        source = (config.data.dataset, config.data.path)
        if source not in vocabs:
            vocabs[source] = vocab_size(*source)
        vocab = vocabs[source]
        signature = f"{config.model.model_dump_json()}|{vocab}|{config.train.block_size}"
        if signature not in cache:
            cache[signature] = count_params(config.model, vocab, config.train.block_size)
        counts[run.key] = cache[signature]
    return counts


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def plan_table(
    plan: Plan, params: Mapping[str, int], status: Mapping[str, str] | None = None
) -> Table:
    names = short_names(plan.varying_keys)
    table = Table(title=f"{plan.experiment}: {len(plan.runs)} runs", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("run", overflow="fold")
    table.add_column("kind", no_wrap=True)
    for key in plan.varying_keys:
        table.add_column(names[key], justify="right")
    table.add_column("seed", justify="right")
    table.add_column("params", justify="right")
    table.add_column("tokens", justify="right")
    if status is not None:
        table.add_column("status")
    for i, run in enumerate(plan.runs, start=1):
        row = [str(i), run.name, str(run.config.model.kind)]
        row += [format_value(run.varying[k]) for k in plan.varying_keys]
        row += [str(run.seed), f"{params[run.key]:,}", human(run.tokens)]
        if status is not None:
            row.append(status.get(run.key, "to do"))
        table.add_row(*row)
    return table


def print_plan(
    plan: Plan, status: Mapping[str, str] | None = None, console: Console | None = None
) -> None:
    console = console or make_console()
    params = parameter_counts(plan.runs)
    console.print(plan_table(plan, params, status))
    total_tokens = sum(run.tokens for run in plan.runs)
    notes = [f"{len(plan.runs)} runs", f"{human(total_tokens)} tokens to train"]
    if plan.excluded:
        notes.append(f"{plan.excluded} excluded")
    if plan.duplicates:
        notes.append(f"{len(plan.duplicates)} identical runs dropped")
    console.print(", ".join(notes))
    for dropped, kept in plan.duplicates[:5]:
        console.print(f"  identical: {dropped} = {kept}", style="dim")
    if len(plan.duplicates) > 5:
        console.print(f"  ... and {len(plan.duplicates) - 5} more", style="dim")
