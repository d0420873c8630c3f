"""The bad-input corpus: every bad row is quarantined with the right reason, every good row
is stored, and a file that is not what it claims to be is one clear error."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from distillguard import contract
from distillguard.ingest import ingest_paths, list_quarantine, readers, stats

DATA = Path(__file__).parent / "data" / "ingest"
BAD = DATA / "exchanges_bad.jsonl"
EXPECTED: dict[int, str] = {
    int(k): v for k, v in json.loads((DATA / "exchanges_bad.expected.json").read_text()).items()
}
LINES = BAD.read_bytes().split(b"\n")
STORED_IDS = {json.loads(LINES[row - 1])["request_id"] for row, w in EXPECTED.items() if w == "stored"}


def quarantined_by_row(con) -> dict[int, str]:
    rows = list_quarantine(con, limit=None)
    return {r["row_number"]: r["reason"] for r in rows}


def test_every_bad_row_quarantined_with_its_reason_and_every_good_row_stored(con):
    report = ingest_paths(con, [BAD])
    assert report.errors == []
    quarantined = quarantined_by_row(con)
    expected_reasons = {
        row: what for row, what in EXPECTED.items()
        if what not in ("stored", "replay", "blank")
    }
    assert quarantined == expected_reasons
    stored = {r[0] for r in con.execute("SELECT request_id FROM exchanges").fetchall()}
    assert stored == STORED_IDS
    # Counts add up: nothing vanished.
    n_rows = sum(1 for what in EXPECTED.values() if what != "blank")
    assert report.read == n_rows
    assert report.read == report.stored + report.duplicates + report.quarantined_total
    assert report.duplicates == sum(1 for w in EXPECTED.values() if w == "replay")
    assert report.files[0].blank == 1


def test_quarantine_rows_carry_source_row_raw_text_and_detail(con):
    ingest_paths(con, [BAD])
    rows = {r["row_number"]: r for r in list_quarantine(con, limit=None)}
    truncated = rows[4]
    assert truncated["source_file"] == str(BAD.resolve())
    assert truncated["kind"] == "exchanges"
    assert truncated["raw"].startswith('{"request_id": "truncated-json"')
    assert truncated["raw_length"] == len(BAD.read_bytes().split(b"\n")[3])
    assert "not valid JSON" in truncated["detail"]
    assert "request_id" in rows[5]["detail"] and "string" in rows[5]["detail"]
    assert "time zone" in rows[12]["detail"]
    assert "\ufffd" in rows[11]["raw"]  # bad bytes shown as replacement characters
    assert "already stored" in rows[14]["detail"] or "repeats row 1" in rows[14]["detail"]


def test_reingesting_the_corpus_changes_nothing(con):
    first = ingest_paths(con, [BAD])
    before = con.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    quarantine_before = con.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    second = ingest_paths(con, [BAD])
    assert second.stored == 0
    assert second.duplicates == first.stored + first.duplicates
    assert con.execute("SELECT count(*) FROM exchanges").fetchone()[0] == before
    assert con.execute("SELECT count(*) FROM quarantine").fetchone()[0] == quarantine_before


def test_good_rows_are_converted_to_the_contract(con):
    ingest_paths(con, [BAD])
    ts = dict(con.execute("SELECT request_id, epoch_ms(ts) FROM exchanges").fetchall())
    assert ts["good-1"] == 1767607200000  # 2026-01-05T10:00:00Z
    assert ts["good-2-earlier"] == 1767582000000  # 08:30+05:30 = 03:00Z: out of order is fine
    assert ts["good-3-epoch-ms"] == 1767500000000
    assert ts["good-crlf"] == 1767639600123  # -08:00, nanoseconds cut to milliseconds
    messages, extra, params = con.execute(
        "SELECT messages, extra, params FROM exchanges WHERE request_id = 'good-extra-fields'"
    ).fetchone()
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"what is in\n{contract.IMAGE_PLACEHOLDER}"},
    ]
    assert json.loads(extra["gateway_region"]) == "eu-west-1"
    assert json.loads(extra["trace"]) == {"span": "abc", "sampled": True}
    assert json.loads(extra["params.seed"]) == 42
    assert params["temperature"] == 0.2 and params["n"] == 1


def test_future_timestamps_are_stored_and_counted_as_clock_skew(con):
    ingest_paths(con, [BAD])
    sanity = stats(con)["sanity"]
    assert sanity["future_ts"] == 1
    assert sanity["ancient_ts"] == 0


def test_five_mib_prompt_is_truncated_and_flagged_not_dropped(con, tmp_path):
    prompt = "é" + "x" * (5 << 20)  # a multi-byte character first: the cut must stay valid
    path = tmp_path / "big.jsonl"
    record = {
        "request_id": "big-1", "ts": "2026-01-05T10:00:00Z", "account_id": "a", "model": "m",
        "messages": [{"role": "user", "content": prompt}], "response_text": "short",
    }
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    report = ingest_paths(con, [path])
    assert report.stored == 1 and report.truncated == 1
    length, fields, response = con.execute(
        "SELECT strlen(messages[1].content), truncated_fields, response_text FROM exchanges"
    ).fetchone()
    assert contract.TEXT_FIELD_CAP_BYTES - 4 < length <= contract.TEXT_FIELD_CAP_BYTES
    assert fields == ["messages"]
    assert response == "short"


def test_oversize_line_is_quarantined_without_parsing(con, tmp_path, monkeypatch):
    monkeypatch.setattr(contract, "LINE_CAP_BYTES", 64 << 10)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 16 << 10)  # the line spans several reads
    good = json.dumps({"request_id": "ok", "ts": "2026-01-05T10:00:00Z", "account_id": "a",
                       "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    huge = json.dumps({"request_id": "huge", "blob": "z" * (200 << 10)})
    path = tmp_path / "huge.jsonl"
    path.write_text(f"{good}\n{huge}\n{good.replace('ok', 'ok2')}\n")
    report = ingest_paths(con, [path])
    assert report.stored == 2
    assert report.quarantined == {"oversize": 1}
    row = list_quarantine(con)[0]
    assert row["row_number"] == 2
    assert row["raw_length"] == len(huge)
    assert len(row["raw"]) <= contract.QUARANTINE_RAW_CAP_BYTES


def test_awkward_json_is_stored_or_quarantined_never_fatal(con, tmp_path):
    head = '{"ts":"2026-01-05T10:00:00Z","account_id":"a","model":"m",'
    user = '"messages":[{"role":"user","content":"%s"}]'
    lines = [
        head + '"request_id":"dup-known","request_id":"second",' + user % "x" + "}",
        head + '"request_id":"nul",' + user % "nul\\u0000byte" + "}",
        head + '"request_id":"surrogate",' + user % "lone \\ud800" + "}",
        head + '"request_id":"dup-unknown","k":1,"k":2,"we\\"ird.key":3,' + user % "x" + "}",
        head + '"request_id":"dup-extra","extra":{"a":"1","a":"2"},' + user % "x" + "}",
    ]
    path = tmp_path / "awkward.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ingest_paths(con, [path])
    assert report.errors == []
    assert report.quarantined == {"bad_json": 1}  # the lone surrogate escape
    extras = dict(con.execute("SELECT request_id, extra FROM exchanges").fetchall())
    assert set(extras) == {"dup-known", "nul", "dup-unknown", "dup-extra"}  # first key wins
    assert extras["dup-unknown"] == {"k": "1", 'we"ird.key': "3"}
    assert extras["dup-extra"] == {"a": "1"}


def test_a_row_duckdb_cannot_process_is_isolated(con, tmp_path, monkeypatch):
    """Defence in depth: a data error inside the SQL quarantines one row, not the file."""
    from distillguard.ingest import validate

    real = validate.json_stage

    def fragile(spec, types, source):  # fails on any batch holding the poisoned row
        return real(spec, types, source).replace(
            "FROM _values3",
            "FROM _values3 WHERE CASE WHEN contains(line, 'POISON') "
            "THEN error('boom') ELSE true END")

    monkeypatch.setattr(validate, "json_stage", fragile)
    good = [json.dumps({"request_id": f"r{i}", "ts": "2026-01-05T10:00:00Z",
                        "account_id": "a", "model": "m",
                        "messages": [{"role": "user", "content": "POISON" if i == 5 else "ok"}]})
            for i in range(9)]
    path = tmp_path / "poison.jsonl"
    path.write_text("\n".join(good) + "\n")
    report = ingest_paths(con, [path])
    assert report.stored == 8 and report.quarantined == {"bad_json": 1}
    row = list_quarantine(con)[0]
    assert row["row_number"] == 6 and "boom" in row["detail"] and "POISON" in row["raw"]
    assert report.files[0].isolated == 1


def test_a_systemic_duckdb_failure_stops_the_file_instead_of_bisecting_forever(
        con, tmp_path, monkeypatch):
    from distillguard.ingest import load, validate

    real = validate.json_stage
    monkeypatch.setattr(load, "MAX_ISOLATED_ROWS", 3)
    monkeypatch.setattr(validate, "json_stage", lambda *a: real(*a).replace(
        "FROM _values3", "FROM _values3 WHERE error('always')"))
    path = tmp_path / "many.jsonl"
    path.write_text("{}\n" * 40)
    report = ingest_paths(con, [path])
    assert len(report.errors) == 1 and "more than 3 rows" in report.errors[0]
    assert report.quarantined == {"bad_json": 3}


def test_empty_file_is_noted_not_an_error(con):
    report = ingest_paths(con, [DATA / "empty.jsonl"])
    assert report.errors == []
    assert report.read == 0
    assert report.files[0].note == "empty file"


def test_binary_file_is_one_clear_error_and_other_files_still_ingest(con, tmp_path):
    binary = tmp_path / "model.bin.jsonl"
    binary.write_bytes(os.urandom(4096) + b"\x00" * 16)
    report = ingest_paths(con, [binary, BAD])
    assert len(report.errors) == 1
    assert report.errors[0].startswith(str(binary))
    assert "binary" in report.errors[0] and "\n" not in report.errors[0]
    assert report.stored > 0


def test_corrupt_parquet_and_corrupt_gzip_are_one_line_errors(con, tmp_path):
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(BAD.read_bytes())[:200])
    report = ingest_paths(con, [parquet, gz])
    assert len(report.errors) == 2
    assert all("\n" not in e for e in report.errors)
    assert "broken.parquet" in report.errors[0] and "Parquet" in report.errors[0]
    assert "cut.jsonl.gz" in report.errors[1] and "gzip" in report.errors[1]


def test_rows_before_the_damage_in_a_compressed_file_are_kept(con, tmp_path, monkeypatch):
    lines = [json.dumps({"request_id": f"r{i}", "ts": "2026-01-05T10:00:00Z", "account_id": "a",
                         "model": "m", "messages": [{"role": "user", "content": f"q{i} " * 50}]})
             for i in range(2000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(readers, "CHUNK_BYTES", 64 << 10)
    report = ingest_paths(con, [gz])
    assert len(report.errors) == 1 and "after line" in report.errors[0]
    assert 0 < report.stored < 2000
    stored = {r[0] for r in con.execute("SELECT request_id FROM exchanges").fetchall()}
    assert stored == {f"r{i}" for i in range(report.stored)}


def test_claimed_format_that_does_not_match_is_an_error(con, tmp_path):
    report = ingest_paths(con, [BAD], format="parquet")
    assert report.stored == 0 and "not a Parquet file" in report.errors[0]


def test_missing_paths_are_reported(con, tmp_path):
    report = ingest_paths(con, [tmp_path / "nope.jsonl", str(tmp_path / "*.zst")])
    assert len(report.errors) == 2
    assert "no such file" in report.errors[0] and "no file matches" in report.errors[1]


def test_accounts_bad_rows(con):
    report = ingest_paths(con, [DATA / "accounts.jsonl"], kind="accounts")
    assert report.stored == 2
    assert report.duplicates == 1  # acct-1 repeated verbatim
    assert report.quarantined == {
        "bad_timestamp": 1,  # zone-less created_at
        "bad_value": 1,  # unknown verification path
        "missing_field": 1,  # no account_id
        "duplicate": 1,  # acct-2 again with a different email domain
    }
    extra = con.execute("SELECT extra FROM accounts WHERE account_id = 'acct-2'").fetchone()[0]
    assert json.loads(extra["referral"]) == "campus"


def test_unknown_kind_or_format_is_a_value_error(con):
    with pytest.raises(ValueError, match="unknown kind"):
        ingest_paths(con, [BAD], kind="findings")
    with pytest.raises(ValueError, match="unknown format"):
        ingest_paths(con, [BAD], format="csv")
