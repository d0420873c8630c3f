"""`distillguard ingest`, `stats` and `quarantine`: thin layers over `distillguard.ingest`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from distillguard import contract, store
from distillguard.cli import app
from distillguard.cli.common import DEFAULT_DB_PATH, DbOption, console, err_console, fail
from distillguard.ingest import (
    FORMATS,
    KINDS,
    IngestReport,
    ingest_paths,
    list_quarantine,
    stats,
)

REASONS = contract.QUARANTINE_REASONS
SANITY_LABELS = {
    "future_ts": "ts more than 5 min in the future (clock skew)",
    "ancient_ts": "ts before 2020 (epoch seconds sent as ms?)",
}


def _short(path: str) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _reasons(counts: dict[str, int]) -> str:
    return "\n".join(f"{r} {counts[r]:,}" for r in REASONS if counts.get(r))


def _report_table(report: IngestReport) -> Table:
    """Per file and total: read / stored / duplicates / truncated / quarantined by reason."""
    table = Table(title=f"ingest ({report.kind})")
    table.add_column("file", overflow="fold")
    table.add_column("format")
    for name in ("read", "stored", "duplicates", "truncated"):
        table.add_column(name, justify="right")
    table.add_column("quarantined", no_wrap=True)
    for f in report.files:
        note = f"[red]{f.error}[/]" if f.error else (f"[dim]{f.note}[/]" if f.note else "")
        quarantined = _reasons(f.quarantined)
        table.add_row(
            _short(f.path), f.format, f"{f.read:,}", f"{f.stored:,}", f"{f.duplicates:,}",
            f"{f.truncated:,}", "\n".join(x for x in (quarantined, note) if x) or "0",
        )
    table.add_section()
    table.add_row(
        f"total ({len(report.files)} files)", "", f"{report.read:,}", f"{report.stored:,}",
        f"{report.duplicates:,}", f"{report.truncated:,}", _reasons(report.quarantined) or "0",
        style="bold",
    )
    return table


@app.command("ingest")
def ingest_command(
    paths: Annotated[list[str], typer.Argument(
        help="Files, directories or globs (quote globs): .jsonl[.gz|.zst], .parquet.")],
    kind: Annotated[str, typer.Option(
        "--kind", "-k", help=f"Record kind: {' | '.join(KINDS)}.")] = "exchanges",
    format: Annotated[str, typer.Option(
        "--format", "-f", help=f"Input format: {' | '.join(FORMATS)} (auto: by content).")
    ] = "auto",
    db: DbOption = DEFAULT_DB_PATH,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Load logs into the store: bad rows are quarantined, replays are skipped.

    Re-ingesting is safe: rows are deduplicated on request_id (accounts: account_id).

    Exit status 1 if a file could not be read; quarantined rows alone are not a failure.

    Example: [bold]distillguard ingest logs/2026-01-*.jsonl.gz --db prod.duckdb[/]
    """
    if kind not in KINDS:
        raise fail(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    if format not in FORMATS:
        raise fail(f"--format {format}: choose one of {', '.join(FORMATS)}")
    con = store.connect(db)
    try:
        with Progress(
            TextColumn("[bold]ingesting[/] {task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeElapsedColumn(), console=err_console, transient=True,
        ) as bar:
            tasks: dict[str, int] = {}

            def progress(path: str, done: int, total: int) -> None:
                if path not in tasks:
                    tasks[path] = bar.add_task(Path(path).name, total=total or None)
                bar.update(tasks[path], completed=done)

            report = ingest_paths(con, paths, kind=kind, format=format, progress=progress)
    finally:
        con.close()
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        console.print(_report_table(report))
        for error in report.errors:
            err_console.print(f"[bold red]error:[/] {error}")
        if report.quarantined_total:
            console.print(
                f"{report.quarantined_total:,} rows quarantined: see "
                f"[bold]distillguard quarantine --db {db}[/]"
            )
    if report.errors:
        raise typer.Exit(1)


def _open_read_only(db: Path):
    try:
        return store.connect(db, read_only=True)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None


@app.command("stats")
def stats_command(
    db: DbOption = DEFAULT_DB_PATH,
    top: Annotated[int, typer.Option(help="How many models to list.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """What the store holds: counts, date range, accounts, models, endpoints, sanity checks.

    Sanity checks (never rejections): clock skew, i.e. timestamps in the future or before 2020;

    traffic from accounts missing from the accounts table; error responses; truncated fields.

    Example: [bold]distillguard stats --db prod.duckdb[/]
    """
    con = _open_read_only(db)
    try:
        figures = stats(con, top=top)
    finally:
        con.close()
    if as_json:
        console.print_json(json.dumps(figures))
        return
    overview = Table(title=f"store {db}", show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    for label, key in (
        ("exchanges", "exchanges"), ("first ts", "first_ts"), ("last ts", "last_ts"),
        ("accounts with traffic", "accounts_with_traffic"), ("account records", "accounts"),
        ("API keys", "api_keys"),
    ):
        value = figures[key]
        overview.add_row(label, f"{value:,}" if isinstance(value, int) else str(value or "-"))
    console.print(overview)
    for key, column in (("models", "model"), ("endpoints", "endpoint"),
                        ("quarantine", "reason"), ("sanity", "check")):
        if not figures[key]:
            continue
        table = Table(title=key)
        table.add_column(column)
        table.add_column("rows", justify="right")
        for name, count in figures[key].items():
            style = "yellow" if key == "sanity" and count else None
            label = SANITY_LABELS.get(name, name.replace("_", " ")) if key == "sanity" else name
            table.add_row(label, f"{count:,}", style=style)
        console.print(table)


@app.command("quarantine")
def quarantine_command(
    db: DbOption = DEFAULT_DB_PATH,
    reason: Annotated[str | None, typer.Option(
        "--reason", "-r", help=f"Only this reason: {', '.join(REASONS)}.")] = None,
    source: Annotated[str | None, typer.Option(
        "--file", help="Only rows whose source file path contains this text.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", "-k", help="exchanges | accounts")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows (0: all).")] = 50,
    raw_chars: Annotated[int, typer.Option(
        "--raw-chars", help="Show this many characters of each raw row.")] = 120,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON lines (full raw text).")] = False,
) -> None:
    """List quarantined rows: source file, row number, reason, detail and the raw text.

    Example: [bold]distillguard quarantine --reason bad_timestamp --file 2026-01-05[/]
    """
    if reason is not None and reason not in REASONS:
        raise fail(f"--reason {reason}: choose one of {', '.join(REASONS)}")
    con = _open_read_only(db)
    try:
        rows = list_quarantine(con, reason=reason, source=source, kind=kind,
                               limit=limit or None)
    finally:
        con.close()
    if as_json:
        for row in rows:
            row["ingested_at"] = row["ingested_at"].isoformat()
            console.print(json.dumps(row, ensure_ascii=False), markup=False, highlight=False,
                          soft_wrap=True)
        return
    table = Table(title=f"quarantine ({len(rows):,} rows shown)")
    for name in ("file", "row", "kind", "reason", "detail", "raw", "bytes"):
        table.add_column(name, overflow="fold", justify="right" if name in ("row", "bytes") else "left")
    for row in rows:
        raw = row["raw"] or ""
        shown = raw[:raw_chars] + ("…" if len(raw) > raw_chars else "")
        table.add_row(row["source_file"], f"{row['row_number']:,}", row["kind"], row["reason"],
                      row["detail"] or "", shown, f"{row['raw_length'] or 0:,}")
    console.print(table)
