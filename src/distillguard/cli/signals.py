"""`distillguard signals`: train the classifier, explain a prompt's signals, list the rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from distillguard.cli import app
from distillguard.cli.common import DEFAULT_DB_PATH, console, fail

signals_app = typer.Typer(
    help="Request signals: rule packs, template signatures, the learned classifier.",
    no_args_is_help=True,
)
app.add_typer(signals_app, name="signals")

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


@signals_app.command("train")
def train_command(
    data: Annotated[
        Path, typer.Option("--data", help="Public corpora directory (organic/, tasks/, tool_use/).")
    ] = SHARED_DATA,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write the artifact and MODEL_CARD.md "
                                   "(default: the package's signals/model/)."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Random seed (default: the shipped model's; same seed, same "
                                    "model)."),
    ] = None,
) -> None:
    """Train the distill_score classifier reproducibly and write it with its model card.

    Example: distillguard signals train --data ../shared/data
    """
    from distillguard.signals.classifier import default_artifact_path
    from distillguard.signals.training import SEED, train, write_artifacts

    if not (data / "organic").is_dir() or not (data / "tasks").is_dir():
        raise fail(f"{data}: no corpora here (expected organic/ and tasks/; see --data)")
    with console.status("building the data set and fitting (about a minute)..."):
        result = train(data, seed=SEED if seed is None else seed)
        artifact, card = write_artifacts(result, out or default_artifact_path().parent, data)
    m = result.metrics
    console.print(
        f"held-out: AUC {m['roc_auc']}, precision {m['precision_at_0.5']}, recall "
        f"{m['recall_at_0.5']}, organic FPR {m['organic_fpr_at_0.5']} "
        f"({result.n_train} train / {result.n_test} test)"
    )
    console.print(f"wrote {artifact} ({artifact.stat().st_size / 1024:.0f} KiB) and {card}")


def _exchange_from_store(db: Path, request_id: str) -> dict:
    from distillguard import store

    if not db.exists():
        raise fail(f"{db}: no store here (run `distillguard ingest` first)")
    con = store.connect(db, read_only=True)
    try:
        rows = con.execute(
            "SELECT * FROM exchanges WHERE request_id = ?", [request_id]
        ).to_arrow_table()
    finally:
        con.close()
    if rows.num_rows == 0:
        raise fail(f"no exchange with request_id {request_id!r} in {db}")
    return rows.to_pylist()[0]


@signals_app.command("explain")
def explain_command(
    text: Annotated[str | None, typer.Argument(help="The prompt (user turn) to explain.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    tools: Annotated[
        list[str] | None, typer.Option("--tool", help="A tool name offered (repeatable).")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Explain a stored exchange instead.")
    ] = None,
    db: Annotated[Path, typer.Option("--db", help="DuckDB store file (with --request-id).",
                                     envvar="DISTILLGUARD_DB")] = DEFAULT_DB_PATH,
    as_json: Annotated[bool, typer.Option("--json", help="Print the signal row as JSON.")] = False,
) -> None:
    """Show which rules match a prompt and every signal computed for it.

    Example: distillguard signals explain "Here is the question and the final answer. Write out
    the reasoning that leads to it."
    """
    from distillguard.signals import default_annotator
    from distillguard.signals.templates import skeleton

    if request_id is not None:
        exchange = _exchange_from_store(db, request_id)
    else:
        if file is not None:
            try:
                text = file.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise fail(f"{file}: {exc.strerror}") from exc
        if text is None:
            raise fail("give a prompt, --file PATH or --request-id ID")
        exchange = {"messages": [{"role": "user", "content": text}], "system": system,
                    "tools": tools or []}
    annotator = default_annotator()
    row = annotator.annotate_request(exchange)
    if as_json:
        console.print_json(json.dumps(row, default=str))
        return
    rules = {r.id: r for r in annotator.matcher.rules}
    table = Table(title="signals", show_header=False)
    for key in ("cot", "reasoning_reconstruction", "rubric", "safe_rewrite", "capability",
                "extraction_params", "language", "distill_score", "prompt_chars",
                "template_sig", "system_hash"):
        value = row[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    hits = Table(title=f"rule hits ({len(row['rule_hits'])})")
    hits.add_column("rule", no_wrap=True)
    hits.add_column("sets")
    hits.add_column("why")
    for rule_id in row["rule_hits"]:
        rule = rules[rule_id]
        hits.add_row(rule.id, rule.capability or rule.signal, rule.description)
    console.print(hits)
    from distillguard.signals.annotate import user_text

    console.print(f"[bold]skeleton:[/] {skeleton(user_text(exchange.get('messages')))[:500]}")
    console.print(f"[bold]LSH band keys:[/] {' '.join(row['template_lsh'])}")


@signals_app.command("rules")
def rules_command(
    pack: Annotated[str | None, typer.Option("--pack", help="Only this pack.")] = None,
    verbose: Annotated[bool, typer.Option("--patterns", help="Show the patterns too.")] = False,
) -> None:
    """List the detection rules (YAML rule packs shipped in distillguard/signals/rules/).

    Example: distillguard signals rules --pack rubric --patterns
    """
    from distillguard.signals import load_rule_packs

    packs = [p for p in load_rule_packs() if pack is None or p.name == pack]
    if not packs:
        raise fail(f"no rule pack named {pack!r}")
    table = Table(title=f"{sum(len(p.rules) for p in packs)} rules in {len(packs)} packs")
    table.add_column("pack")
    table.add_column("rule", no_wrap=True)
    table.add_column("sets")
    table.add_column("description")
    if verbose:
        table.add_column("patterns")
    for p in packs:
        for rule in p.rules:
            cells = [p.name, rule.id, rule.capability or rule.signal, rule.description]
            if verbose:
                cells.append("\n".join(rule.patterns))
            table.add_row(*cells)
    console.print(table)
