"""Readers (native JSONL plain/gz/zst, Parquet, OpenAI and Anthropic pairs), directories and
globs, idempotent and incremental loading, stats, and the CLI commands."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from typer.testing import CliRunner

from distillguard import contract, store
from distillguard.cli import app
from distillguard.ingest import ingest_paths, stats

DATA = Path(__file__).parent / "data" / "ingest"


def exchange(i: int, **overrides) -> dict:
    record = {
        "request_id": f"r-{i}",
        "ts": f"2026-01-05T10:{i % 60:02d}:00Z",
        "account_id": f"acct-{i % 3}",
        "model": "frontier-large" if i % 2 else "frontier-mini",
        "messages": [{"role": "user", "content": f"question {i}"}],
        "response_text": f"answer {i}",
        "status": 200,
    }
    record.update(overrides)
    return record


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def ids(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT request_id FROM exchanges").fetchall()}


def test_plain_gzip_and_zstd_jsonl(con, tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", [exchange(i) for i in range(5)])
    gz = write_jsonl(tmp_path / "b.jsonl.gz", [exchange(i) for i in range(5, 10)])
    zst = write_jsonl(tmp_path / "c.jsonl.zst", [exchange(i) for i in range(10, 15)])
    report = ingest_paths(con, [plain, gz, zst])
    assert report.errors == []
    assert [f.stored for f in report.files] == [5, 5, 5]
    assert ids(con) == {f"r-{i}" for i in range(15)}


def test_compression_is_found_by_content_not_name(con, tmp_path):
    path = tmp_path / "misnamed.jsonl"
    path.write_bytes(gzip.compress(b"".join(json.dumps(exchange(i)).encode() + b"\n"
                                            for i in range(3))))
    assert ingest_paths(con, [path]).stored == 3


def test_parquet_in_the_contract(con, tmp_path):
    records = [exchange(i) for i in range(4)]
    for r in records:
        r["ts"] = datetime.fromisoformat(r["ts"])
    table = contract.conform(pa.Table.from_pylist(records), contract.EXCHANGE_SCHEMA)
    pq.write_table(table, tmp_path / "ex.parquet")
    report = ingest_paths(con, [tmp_path / "ex.parquet"])
    assert report.files[0].format == "parquet"
    assert report.stored == 4 and report.errors == []
    stored = con.execute("SELECT ts FROM exchanges WHERE request_id = 'r-1'").fetchone()[0]
    assert stored == datetime(2026, 1, 5, 10, 1, tzinfo=UTC)


def test_parquet_rows_are_validated_and_extra_columns_kept(con, tmp_path):
    table = pa.table({
        "request_id": ["p1", "p2", "p3", "p4"],
        "ts": ["2026-01-05T10:00:00Z", "2026-01-05T10:00:00", "2026-01-05T10:00:00+02:00",
               "2026-01-05T11:00:00Z"],
        "account_id": ["a", "a", None, "a"],
        "model": ["m"] * 4,
        "messages": [[{"role": "user", "content": "hi"}]] * 3
        + [[{"role": "assistant", "content": "no user"}]],
        "tenant": ["t1", "t2", "t3", "t4"],
    })
    null_role = table.slice(0, 1).set_column(
        4, "messages", pa.array([[{"role": None, "content": "x"}, {"role": "user", "content": "y"}]]))
    null_role = null_role.set_column(0, "request_id", pa.array(["p5"]))
    table = pa.concat_tables([table, null_role.cast(table.schema)])
    pq.write_table(table, tmp_path / "mixed.parquet")
    report = ingest_paths(con, [tmp_path / "mixed.parquet"])
    assert report.stored == 1
    assert report.quarantined == {"bad_timestamp": 1, "missing_field": 1, "bad_value": 2}
    extra = con.execute("SELECT extra FROM exchanges").fetchone()[0]
    assert json.loads(extra["tenant"]) == "t1"
    rows = con.execute(
        "SELECT row_number, reason, raw FROM quarantine ORDER BY row_number").fetchall()
    assert [(r[0], r[1]) for r in rows] == [
        (2, "bad_timestamp"), (3, "missing_field"), (4, "bad_value"), (5, "bad_value")]
    assert json.loads(rows[0][2])["request_id"] == "p2"


def test_parquet_value_that_cannot_fit_the_contract_is_quarantined(con, tmp_path):
    table = pa.table({"request_id": ["x"], "ts": ["2026-01-05T10:00:00Z"], "account_id": ["a"],
                      "model": ["m"], "messages": ["not a list"]})
    pq.write_table(table, tmp_path / "wrong.parquet")
    report = ingest_paths(con, [tmp_path / "wrong.parquet"])
    assert report.stored == 0 and report.quarantined == {"bad_type": 1}
    detail, raw = con.execute("SELECT detail, raw FROM quarantine").fetchone()
    assert detail.startswith("messages:")
    assert json.loads(raw) == {"request_id": "x", "ts": "2026-01-05T10:00:00Z",
                               "account_id": "a", "model": "m", "messages": "not a list"}


def test_openai_pairs(con):
    report = ingest_paths(con, [DATA / "openai_pairs.jsonl"])
    assert report.files[0].format == "openai"
    assert report.stored == 2
    assert report.quarantined == {"missing_field": 1}  # third pair: no account id
    cursor = con.execute("SELECT * FROM exchanges WHERE request_id = 'gw-openai-1'")
    r = dict(zip([d[0] for d in cursor.description], cursor.fetchone(), strict=True))
    assert r["account_id"] == "acct-42" and r["api_key_id"] == "key-7"
    assert r["endpoint"] == "chat.completions" and r["model"] == "gpt-4o"
    assert r["system"] == "You are a careful math tutor."
    assert list(r["messages"]) == [{"role": "user", "content": "Solve 12*17 step by step."}]
    assert list(r["tools"]) == ["calculator"] and list(r["tool_calls"]) == ["calculator"]
    assert r["params"]["max_tokens"] == 512 and r["params"]["logprobs"] is False
    assert r["response_text"] == "12*17 = 204." and r["stop_reason"] == "tool_calls"
    assert (r["input_tokens"], r["output_tokens"], r["status"]) == (31, 12, 200)
    assert json.loads(dict(r["extra"])["region"]) == "us-east-1"
    second = con.execute(
        "SELECT ts, request_id, reasoning_tokens, params.reasoning_effort, system, messages "
        "FROM exchanges WHERE request_id = 'chatcmpl-A2'").fetchone()
    assert second[0] == datetime.fromtimestamp(1767607260, UTC)  # response.created
    assert second[2] == 256 and second[3] == "high" and second[4] == "Answer tersely."
    assert second[5][0]["content"] == f"Describe this chart.\n{contract.IMAGE_PLACEHOLDER}"


def test_anthropic_pairs(con):
    report = ingest_paths(con, [DATA / "anthropic_pairs.jsonl"])
    assert report.files[0].format == "anthropic"
    assert report.stored == 3 and report.errors == []
    first = con.execute(
        "SELECT system, messages, reasoning_text, response_text, tool_calls, tools, "
        "params.reasoning_budget, stop_reason, endpoint, epoch_ms(ts) "
        "FROM exchanges WHERE request_id = 'gw-anthropic-1'").fetchone()
    assert first[0] == "You are a senior engineer."
    assert [m["role"] for m in first[1]] == ["user", "assistant", "user"]
    assert first[1][2]["content"] == f"Now explain it.\n{contract.IMAGE_PLACEHOLDER}"
    assert first[2] == "The user wants an explanation..."
    assert first[3] == "Binary search halves the range each step."
    assert first[4] == ["run_code"] and first[5] == ["run_code"]
    assert first[6] == 1024 and first[7] == "tool_use" and first[8] == "messages"
    assert first[9] == 1767607200123
    error = con.execute(
        "SELECT status, error FROM exchanges WHERE request_id = 'gw-anthropic-3'").fetchone()
    assert error == (529, "Overloaded")
    second = con.execute(
        "SELECT epoch_ms(ts) FROM exchanges WHERE request_id = 'msg_02'").fetchone()[0]
    assert second == 1767610800000  # 12:00+01:00


def test_directories_and_globs(con, tmp_path):
    day1 = tmp_path / "logs" / "2026-01-05"
    day1.mkdir(parents=True)
    write_jsonl(day1 / "part-0.jsonl", [exchange(i) for i in range(3)])
    write_jsonl(day1 / "part-1.jsonl.gz", [exchange(i) for i in range(3, 6)])
    (day1 / "README.txt").write_text("not a log")
    (day1 / ".hidden.jsonl").write_text("garbage\n")
    report = ingest_paths(con, [tmp_path / "logs"])
    assert len(report.files) == 2 and report.stored == 6
    report = ingest_paths(con, [str(tmp_path / "logs" / "*" / "*.jsonl*")])
    assert len(report.files) == 2 and report.duplicates == 6 and report.stored == 0


def test_reingest_is_idempotent_and_new_days_append(con, tmp_path):
    day1 = write_jsonl(tmp_path / "day1.jsonl", [exchange(i) for i in range(10)])
    first = ingest_paths(con, [day1])
    again = ingest_paths(con, [day1])
    assert (first.stored, again.stored, again.duplicates) == (10, 0, 10)
    day2 = write_jsonl(tmp_path / "day2.jsonl", [exchange(i) for i in range(8, 20)])
    third = ingest_paths(con, [day2])
    assert third.stored == 10 and third.duplicates == 2
    assert con.execute("SELECT count(*) FROM exchanges").fetchone()[0] == 20
    assert con.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0


def test_gateway_replay_after_a_crash_is_idempotent(db_path, tmp_path):
    """A segment ingested, the process killed, the segment ingested again on restart."""
    segment = write_jsonl(tmp_path / "segment-000001.jsonl", [exchange(i) for i in range(50)])
    con = store.connect(db_path)
    ingest_paths(con, [segment])
    con.close()
    con = store.connect(db_path)
    report = ingest_paths(con, [segment])
    assert report.stored == 0 and report.duplicates == 50
    assert con.execute("SELECT count(DISTINCT request_id), count(*) FROM exchanges").fetchone() \
        == (50, 50)
    con.close()


def test_accounts_from_jsonl_and_parquet(con, tmp_path):
    table = pa.table({"account_id": ["acct-7"], "created_at": [datetime(2025, 1, 1, tzinfo=UTC)],
                      "verification_path": ["research_program"]})
    pq.write_table(contract.conform(table, contract.ACCOUNT_SCHEMA), tmp_path / "acc.parquet")
    report = ingest_paths(con, [tmp_path / "acc.parquet", DATA / "accounts.jsonl"],
                          kind="accounts")
    assert report.stored == 3
    assert con.execute("SELECT count(*) FROM accounts").fetchone()[0] == 3


def test_progress_is_reported_per_file(con, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [exchange(i) for i in range(3)])
    calls = []
    ingest_paths(con, [path], progress=lambda p, done, total: calls.append((p, done, total)))
    assert calls and calls[-1] == (str(path), path.stat().st_size, path.stat().st_size)


def test_report_names_files_as_given_and_the_quarantine_records_absolute_paths(
        con, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("rel.jsonl").write_text("not json\n")
    report = ingest_paths(con, ["rel.jsonl", str(tmp_path / "rel.jsonl")])
    assert [f.path for f in report.files] == ["rel.jsonl"]  # the same file once
    source = con.execute("SELECT source_file FROM quarantine").fetchone()[0]
    assert source == str((tmp_path / "rel.jsonl").resolve())


def test_stats(con, tmp_path):
    ingest_paths(con, [write_jsonl(tmp_path / "a.jsonl",
                                   [exchange(i) for i in range(6)]
                                   + [exchange(6, ts=1000, status=500)])])
    ingest_paths(con, [DATA / "accounts.jsonl"], kind="accounts")
    figures = stats(con)
    assert figures["exchanges"] == 7
    assert figures["first_ts"].startswith("1970-01-01")
    assert figures["models"] == {"frontier-mini": 4, "frontier-large": 3}
    assert figures["accounts_with_traffic"] == 3 and figures["accounts"] == 2
    sanity = figures["sanity"]
    assert sanity["ancient_ts"] == 1 and sanity["error_responses"] == 1
    # acct-0 has no account record; acct-1 and acct-2 do.
    assert sanity["exchanges_without_account_record"] == 3
    assert sanity["accounts_without_traffic"] == 0


runner = CliRunner(env={"COLUMNS": "250"})


def test_cli_ingest_stats_quarantine(tmp_path):
    db = tmp_path / "cli.duckdb"
    bad = DATA / "exchanges_bad.jsonl"
    result = runner.invoke(app, ["ingest", str(bad), "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "quarantined" in result.output and "bad_timestamp" in result.output
    result = runner.invoke(app, ["stats", "--db", str(db), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["exchanges"] == 7
    result = runner.invoke(app, ["quarantine", "--db", str(db), "--reason", "bad_utf8",
                                 "--json"])
    lines = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    assert [r["row_number"] for r in lines] == [11]
    result = runner.invoke(app, ["quarantine", "--db", str(db)])
    assert result.exit_code == 0 and "missing_field" in result.output


def test_cli_unreadable_file_exits_non_zero_with_one_line(tmp_path):
    binary = tmp_path / "x.jsonl"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    result = runner.invoke(app, ["ingest", str(binary), "--db", str(tmp_path / "s.duckdb")])
    assert result.exit_code == 1
    assert "binary data" in result.output
    assert "Traceback" not in result.output


def test_cli_stats_without_store_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["stats", "--db", str(tmp_path / "none.duckdb")])
    assert result.exit_code == 1 and "no store here" in " ".join(result.output.split())
