"""`distillguard demo`: the README's main job, end to end on the embedded DuckDB store.

It is the four everyday commands in sequence (simulate -> ingest -> scan -> eval), called as the
same functions the CLI runs, so the demo shows exactly what a user would see step by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.rule import Rule

from distillguard.cli import app
from distillguard.cli.common import console
from distillguard.cli.eval import eval_command
from distillguard.cli.ingest import ingest_command, stats_command
from distillguard.cli.lab import simulate_command
from distillguard.cli.scan import scan_command


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working directory (replaced).")] = Path(
        "out/demo"
    ),
    scenario: Annotated[str, typer.Option(help="Traffic-lab scenario to simulate.")] = "standard",
    scale: Annotated[float, typer.Option(help="Scenario scale.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 20261123,
    corpus: Annotated[
        Path | None,
        typer.Option(help="Public prompt corpora (default: ../shared/data if present, "
                     "else built-in generators)."),
    ] = None,
    engine: Annotated[str, typer.Option(help="Scan engine: duckdb or spark.")] = "duckdb",
) -> None:
    """Simulate labelled traffic, ingest it, scan for campaigns and score the findings.

    Everything lands under --out: the lab's logs and truth/, the store
    (distillguard.duckdb), findings/ and the evaluation report findings.eval.json.

    Example: [bold]distillguard demo --scenario smoke --out /tmp/dg-demo[/]
    """
    db = out / "distillguard.duckdb"
    findings = out / "findings"
    db.unlink(missing_ok=True)  # a fresh store each run: the demo is reproducible

    console.print(Rule(f"1/4 simulate: scenario {scenario}, scale {scale}, seed {seed}"))
    simulate_command(out=out, scenario=scenario, scale=scale, seed=seed, corpus=corpus)

    console.print(Rule("2/4 ingest the logs into the embedded store"))
    ingest_command(paths=[str(out / "accounts.parquet")], kind="accounts", db=db)
    ingest_command(paths=[str(out / "exchanges")], kind="exchanges", db=db)
    stats_command(db=db)

    console.print(Rule("3/4 scan: signals -> fingerprints -> linking -> campaigns"))
    scan_command(db=db, engine=engine, out=findings)

    console.print(Rule("4/4 evaluate the findings against the lab's labels and baselines"))
    eval_command(truth=out / "truth", findings=findings, out=out / "findings.eval.json")
