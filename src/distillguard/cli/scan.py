"""`distillguard scan` commands: `scan` (run the detector), `campaigns` and `report` (show it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from distillguard.cli import app
from distillguard.cli.common import DEFAULT_DB_PATH, DbOption, console, fail


def _read_ids(values: list[str] | None, path: Path | None) -> list[str]:
    """Ids given on the command line plus those in a file (one per line, # comments)."""
    ids = list(values or [])
    if path is not None:
        if not path.is_file():
            raise fail(f"{path}: allow-list file not found")
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                ids.append(line)
    return ids


def _read_verdicts(path: Path) -> dict[str, bool]:
    """Analyst verdicts: CSV/TSV lines `account_id,attacker|honest` (or true/false, 1/0)."""
    if not path.is_file():
        raise fail(f"{path}: verdicts file not found")
    verdicts: dict[str, bool] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.lower().startswith("account_id"):
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",")]
        label = parts[1].lower() if len(parts) > 1 else ""
        if label in ("attacker", "true", "1", "yes"):
            verdicts[parts[0]] = True
        elif label in ("honest", "false", "0", "no"):
            verdicts[parts[0]] = False
        else:
            raise fail(f"{path}:{n}: expected `account_id,attacker|honest`, got {line!r}")
    return verdicts


def _parse_step(text: str) -> timedelta:
    """`6h`, `30m`, `1d` -> timedelta."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise fail(f"--replay-every {text!r}: use a number and m, h or d (e.g. 6h)") from None
    if value <= 0:
        raise fail("--replay-every must be positive")
    return timedelta(**{unit: value})


@app.command("scan")
def scan_command(
    db: DbOption = DEFAULT_DB_PATH,
    until: Annotated[
        str | None, typer.Option(help="Only use exchanges up to this time (RFC 3339).")
    ] = None,
    engine: Annotated[str, typer.Option(help="duckdb (default) or spark.")] = "duckdb",
    out: Annotated[
        Path | None,
        typer.Option(help="Also write accounts/campaigns/exchanges.parquet + campaigns.json here."),
    ] = None,
    allow_account: Annotated[
        list[str] | None, typer.Option(help="Licensed account id never to flag (repeatable).")
    ] = None,
    allow_org: Annotated[
        list[str] | None, typer.Option(help="Licensed org id never to flag (repeatable).")
    ] = None,
    allow_list: Annotated[
        Path | None, typer.Option(help="File of allow-listed account ids, one per line.")
    ] = None,
    verdicts: Annotated[
        Path | None,
        typer.Option(help="Analyst verdicts (account_id,attacker|honest): supervised scoring."),
    ] = None,
    replay_every: Annotated[
        str | None,
        typer.Option(help="Replay the log in steps (e.g. 6h, 1d): true first-flag times."),
    ] = None,
    replay_from: Annotated[
        str | None,
        typer.Option(help="Start the replay at this time (RFC 3339) instead of the log's start."),
    ] = None,
) -> None:
    """Find distillation campaigns in the stored exchanges and write the findings.

    Example: [bold]distillguard scan --db lab.duckdb --until 2026-02-03T00:00:00Z --out findings/[/]

    With --replay-every 6h the log is scanned as it grew (checkpoint after checkpoint), so
    first_flagged_at and pivot times are what a provider scanning every 6 h would have seen.
    """
    from distillguard import store
    from distillguard.engine import STAGES, DiskFullError, parse_until, replay, scan
    from distillguard.reports import campaign_summary_table

    if not Path(db).exists():
        raise fail(f"{db}: no store here (run `distillguard ingest` first)")
    try:
        until_ts = parse_until(until)
    except ValueError:
        raise fail(f"--until {until!r}: not an RFC 3339 timestamp") from None
    try:
        from_ts = parse_until(replay_from)
    except ValueError:
        raise fail(f"--replay-from {replay_from!r}: not an RFC 3339 timestamp") from None
    if from_ts is not None and replay_every is None:
        raise fail("--replay-from needs --replay-every")
    if engine not in ("duckdb", "spark"):
        raise fail(f"--engine {engine!r}: choose duckdb or spark")
    step = _parse_step(replay_every) if replay_every else None
    allow_accounts = _read_ids(allow_account, allow_list)
    verdict_map = _read_verdicts(verdicts) if verdicts else None
    con = store.connect(db)
    columns = (TextColumn("{task.description:<14}"), BarColumn(), TextColumn("{task.completed:,}/"
               "{task.total:,}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks = {s: bar.add_task(s, total=1, visible=False) for s in STAGES}

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(tasks[stage], completed=done, total=max(total, 1), visible=True)

        args = dict(engine=engine, out=out, allow_accounts=allow_accounts,
                    allow_orgs=allow_org or (), verdicts=verdict_map, progress=progress)
        try:
            if step is None:
                findings = scan(con, until=until_ts, **args)
            else:
                findings = replay(con, every=step, until=until_ts, start=from_ts, **args)
        except (ValueError, DiskFullError) as exc:
            raise fail(str(exc)) from None
        finally:
            con.close()
    flagged = sum(1 for f in findings.accounts["flagged"].to_pylist() if f)
    console.print(
        f"scanned {findings.n_exchanges:,} exchanges ({findings.n_annotated:,} newly annotated) "
        f"of {findings.accounts.num_rows:,} accounts: {findings.campaigns.num_rows} campaigns, "
        f"{flagged:,} accounts flagged, {findings.exchanges.num_rows:,} exchanges attributed"
    )
    if findings.allow_listed:
        console.print(f"allow-listed (never flagged): {len(findings.allow_listed)} accounts")
    if findings.campaigns.num_rows:
        console.print(campaign_summary_table(findings.campaigns))
    console.print("time per stage: " + ", ".join(
        f"{k} {v:.1f}s" for k, v in findings.seconds.items()))
    if out:
        console.print(f"findings written to {out}")


def _load(db: Path, findings: Path | None):
    from distillguard import reports, store

    if findings is not None:
        if not (findings / "accounts.parquet").is_file():
            raise fail(f"{findings}: no accounts.parquet (not a findings directory)")
        return reports.load_from_dir(findings)
    if not Path(db).exists():
        raise fail(f"{db}: no store here (run `distillguard scan` first)")
    con = store.connect(db, read_only=True)
    try:
        return reports.load_from_store(con)
    finally:
        con.close()


FindingsOption = Annotated[
    Path | None, typer.Option(help="Read a findings directory instead of the store.")
]


@app.command("campaigns")
def campaigns_command(db: DbOption = DEFAULT_DB_PATH, findings: FindingsOption = None) -> None:
    """List the campaigns of the last scan, one line each.

    Example: [bold]distillguard campaigns --db lab.duckdb[/]
    """
    from distillguard.reports import campaign_summary_table

    _, campaigns = _load(db, findings)
    if campaigns.num_rows == 0:
        console.print("no campaigns found (run `distillguard scan` first?)")
        return
    console.print(campaign_summary_table(campaigns))


@app.command("report")
def report_command(
    db: DbOption = DEFAULT_DB_PATH,
    findings: FindingsOption = None,
    campaign: Annotated[str | None, typer.Option(help="Only this campaign.")] = None,
    account: Annotated[str | None, typer.Option(help="Explain one account instead.")] = None,
    format: Annotated[str, typer.Option(help="rich, markdown or json.")] = "rich",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
) -> None:
    """The campaign report: evidence, infrastructure, capabilities, pivots, accounts.

    Example: [bold]distillguard report --db lab.duckdb --format markdown -o report.md[/]
    """
    from distillguard import reports

    accounts, campaigns = _load(db, findings)
    if account is not None:
        rows = [a for a in accounts.to_pylist() if a["account_id"] == account]
        if not rows:
            raise fail(f"account {account!r} is not in the findings")
        console.print(reports.account_panel(rows[0]))
        return
    if campaign is not None:
        campaigns = campaigns.filter(campaigns["campaign_id"] == campaign)
        if campaigns.num_rows == 0:
            raise fail(f"campaign {campaign!r} is not in the findings")
    if format == "rich":
        reports.render(console, accounts, campaigns)
        return
    if format not in ("markdown", "json"):
        raise fail(f"--format {format!r}: choose rich, markdown or json")
    text = (reports.to_markdown if format == "markdown" else reports.to_json)(accounts, campaigns)
    if output:
        output.write_text(text)
        console.print(f"report written to {output}")
    else:
        print(text)
