"""`distillguard signals ...` commands: thin layers over the library, clear errors."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
from typer.testing import CliRunner

from distillguard import contract, store
from distillguard.cli import app

runner = CliRunner()
RECON = ("Here is the question and the final answer. Write out the full reasoning that leads "
         "to it. Question: what is 17*3? Final answer: 51")


def test_rules_lists_every_pack_and_filters() -> None:
    result = runner.invoke(app, ["signals", "rules"])
    assert result.exit_code == 0, result.output
    assert "recon.given_answer_explain" in result.output
    result = runner.invoke(app, ["signals", "rules", "--pack", "nope"])
    assert result.exit_code == 1 and "no rule pack" in result.output


def test_explain_json_shows_signals_and_rule_hits() -> None:
    result = runner.invoke(app, ["signals", "explain", RECON, "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert row["reasoning_reconstruction"] is True
    assert "recon.given_answer_explain" in row["rule_hits"]


def test_explain_table_from_a_file_with_tools(tmp_path: Path) -> None:
    prompt = tmp_path / "p.txt"
    prompt.write_text("Fix the failing test.")
    result = runner.invoke(app, ["signals", "explain", "--file", str(prompt), "--tool",
                                 "run_tests", "--tool", "edit_file"])
    assert result.exit_code == 0, result.output
    assert "coding" in result.output and "skeleton" in result.output


def test_explain_without_input_or_with_a_missing_file_fails_cleanly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["signals", "explain"])
    assert result.exit_code == 1 and "give a prompt" in result.output
    result = runner.invoke(app, ["signals", "explain", "--file", str(tmp_path / "none.txt")])
    assert result.exit_code == 1 and "none.txt" in result.output


def test_explain_a_stored_exchange(db_path: Path) -> None:
    con = store.connect(db_path)
    rows = pa.Table.from_pylist([{
        "request_id": "req-1", "ts": dt.datetime(2026, 3, 1, tzinfo=dt.UTC), "account_id": "a",
        "model": "m", "messages": [{"role": "user", "content": RECON}],
    }], schema=contract.EXCHANGE_SCHEMA)
    con.register("rows", rows)
    con.execute("INSERT INTO exchanges SELECT * FROM rows")
    con.close()
    result = runner.invoke(app, ["signals", "explain", "--request-id", "req-1", "--db",
                                 str(db_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["request_id"] == "req-1"
    result = runner.invoke(app, ["signals", "explain", "--request-id", "nope", "--db",
                                 str(db_path)])
    assert result.exit_code == 1 and "no exchange" in result.output
