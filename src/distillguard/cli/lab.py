"""`distillguard simulate`: the traffic lab's command (a thin layer over `lab.simulate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from distillguard.cli import app
from distillguard.cli.common import console, err_console, fail
from distillguard.lab.scenario import ScenarioError, list_scenarios
from distillguard.lab.simulate import simulate


@app.command("simulate")
def simulate_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("lab-out"),
    scenario: Annotated[str, typer.Option(
        "--scenario", "-s", help="Shipped scenario name or path to a scenario YAML file.")
    ] = "smoke",
    scale: Annotated[float, typer.Option(
        help="Multiply accounts and exchange targets (not days).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same output.")] = 0,
    corpus: Annotated[Path | None, typer.Option(
        help="Public prompt corpora directory (default: ../shared/data if present).")] = None,
    builtin_prompts: Annotated[bool, typer.Option(
        "--builtin-prompts", help="Ignore any corpus; use the built-in prompt generators.")
    ] = False,
    list_only: Annotated[bool, typer.Option("--list", help="List shipped scenarios.")] = False,
) -> None:
    """Write realistic, labelled API traffic (exchanges, accounts and truth/) for a scenario.

    Example: [bold]distillguard simulate --scenario standard --scale 0.5 --out lab-out[/]
    """
    if list_only:
        for name in list_scenarios():
            console.print(name)
        return
    if corpus is not None and not corpus.is_dir():
        raise fail(f"--corpus {corpus}: not a directory")
    with Progress(TextColumn("[bold]simulating[/] {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} day-groups"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(scenario, total=None)
        try:
            summary = simulate(scenario, out, scale=scale, seed=seed, corpus=corpus,
                               builtin_prompts=builtin_prompts,
                               progress=lambda done, total: bar.update(task, completed=done,
                                                                       total=total))
        except (ScenarioError, FileNotFoundError) as exc:
            raise fail(str(exc)) from exc
    table = Table(title=f"{summary.scenario} (scale {summary.scale}, seed {summary.seed}, "
                        f"{summary.days} days)")
    for column in ("group", "kind", "accounts", "exchanges", "attack exchanges"):
        table.add_column(column, justify="left" if column in ("group", "kind") else "right")
    for name, counts in summary.populations.items():
        table.add_row(name, "honest", f"{counts.accounts:,}", f"{counts.exchanges:,}", "0")
    for name, counts in summary.campaigns.items():
        table.add_row(name, "campaign", f"{counts.accounts:,}", f"{counts.exchanges:,}",
                      f"{counts.attack_exchanges:,}")
    console.print(table)
    for name, count in summary.corpus_skipped.items():
        err_console.print(f"[yellow]warning:[/] {name}: skipped {count:,} malformed record(s)")
    rate = summary.exchanges / summary.seconds if summary.seconds else 0.0
    console.print(f"{summary.exchanges:,} exchanges, {summary.accounts:,} accounts in "
                  f"{summary.seconds:.1f} s ({rate:,.0f}/s); prompts: "
                  f"{summary.corpus or 'built-in generators'}; written to {summary.out}")
