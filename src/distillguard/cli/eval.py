"""`distillguard eval`: score a detector's findings against the traffic lab's labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distillguard.cli import app
from distillguard.cli.common import console, fail


def default_out(findings: Path | None, truth: Path) -> Path:
    """Where the JSON goes without --out: beside the findings (or the lab run, baselines only)."""
    if findings is None:
        return truth.resolve().parent / "baselines.eval.json"
    return findings.with_name(f"{findings.stem if findings.is_file() else findings.name}.eval.json")


@app.command("eval")
def eval_command(
    truth: Annotated[
        Path, typer.Option("--truth", help="The lab run's truth/ directory (labels).")
    ],
    findings: Annotated[
        Path | None,
        typer.Option(
            "--findings",
            help="Findings directory (accounts, campaigns and optional exchanges .parquet) or JSON; "
            "omit to score the baselines alone.",
        ),
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option(
            "--db", help="Read the findings from this store's finding tables (left by `scan`)."
        ),
    ] = None,
    logs: Annotated[
        Path | None,
        typer.Option("--logs", help="Directory of the run's logs (default: the parent of truth/)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="JSON report path (default: <findings>.eval.json beside it)."),
    ] = None,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines/--no-baselines",
            help="Also score the volume-threshold and IsolationForest baselines.",
        ),
    ] = True,
    write_baselines: Annotated[
        Path | None,
        typer.Option(
            "--write-baselines",
            help="Also write each baseline's findings as a findings directory under this path.",
        ),
    ] = None,
    fpr: Annotated[
        list[float] | None,
        typer.Option(
            "--fpr",
            help="Also report each baseline re-thresholded to this honest FPR, e.g. 0.001 "
            "(repeatable).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="IsolationForest random seed.")] = 0,
) -> None:
    """Score findings against the lab's labels, side by side with two baselines.

    Prints account-, exchange- and cluster-level metrics, false positives per honest
    population, and time to detection per campaign; writes the same as JSON to --out.

    Examples:

        distillguard eval --truth out/smoke/truth --findings out/smoke/findings

        distillguard eval --truth out/smoke/truth --db lab.duckdb --out report.json

        distillguard eval --truth out/smoke/truth --fpr 0.001 --fpr 0.01   # baselines alone
    """
    # Imported here: scikit-learn costs seconds, and every other command would pay for it.
    from distillguard.lab.evaluate import (
        EvalInputError,
        evaluate,
        load_findings_from_store,
        render_report,
    )

    if findings is not None and db is not None:
        raise fail("give --findings or --db, not both")
    if any(not 0.0 <= rate <= 1.0 for rate in fpr or ()):
        raise fail("--fpr takes a rate between 0 and 1, e.g. 0.001 for 0.1 %")
    with console.status("evaluating") as status:
        try:
            report = evaluate(
                truth,
                load_findings_from_store(db) if db is not None else findings,
                logs,
                baselines=baselines,
                seed=seed,
                baseline_findings_dir=write_baselines,
                baseline_fprs=fpr or (),
                progress=lambda message: status.update(f"evaluating: {message}"),
            )
        except EvalInputError as exc:
            raise fail(str(exc)) from None
    render_report(report, console)
    out = out or default_out(findings or (db.with_suffix("") if db else None), truth)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.to_json())
    console.print(f"report written to [bold]{out}[/]")
