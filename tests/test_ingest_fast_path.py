"""The single-parse fast path for clean JSON lines gives exactly what the per-field exact path
gives, and every line it cannot vouch for falls back to the exact path."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from distillguard import contract, store
from distillguard.ingest import ingest_paths, list_quarantine, readers, validate

DATA = Path(__file__).parent / "data" / "ingest"
TS = "2026-01-05T10:00:00.250Z"


def base(i: int, **fields) -> dict:
    record = {"request_id": f"r{i}", "ts": TS, "account_id": "a1", "model": "m",
              "messages": [{"role": "user", "content": f"hello {i}"}]}
    record.update(fields)
    return record


def _line(record: dict | str) -> str:
    return record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)


#: Lines a real gateway writes (all clean) and lines that are legal but unusual.
VARIED = [
    base(1),
    base(2, ts=1767607200123, api_key_id="k", org_id="o", ip="2001:db8::7",
         user_agent="ua", endpoint="messages", system="sys", response_text="ok",
         reasoning_text="think", tools=["calc", "search"], tool_calls=["calc"],
         params={"temperature": 0.7, "top_p": 1, "max_tokens": 512, "n": 2, "logprobs": True,
                 "stream": False, "reasoning_effort": "high", "reasoning_budget": 0},
         input_tokens=31, output_tokens=12, reasoning_tokens=0, status=200, error=None,
         latency_ms=812, stop_reason="stop"),
    base(3, ts=1767607200123.5, latency_ms=1.5e3, params={"temperature": 1}),
    base(4, ts="2026-01-05 10:00:00+02:00", gateway_region="us-east-1", nested={"a": [1, 2.50]}),
    base(5, messages=[{"role": "system", "content": "s"},
                      {"role": "user", "content": [{"type": "text", "text": "part"},
                                                   {"type": "image_url", "image_url": {"u": 1}},
                                                   "plain", {"type": "input_audio"}]},
                      {"role": "assistant", "content": None}]),
    base(6, response_text="line\nbreak \"quoted\" \\ back \u00e9 \U0001f600 \u0000 nul"),
    base(7, api_key_id=None, tools=[], params={}, status=599),
    '{"request_id": "r8", "ts": "' + TS + '", "account_id": "a1", "model": "m", '
    '"model": "second", "messages": [{"role": "user", "content": "dup key"}]}',
    '{"request_id":"r9","ts":"' + TS + '","account_id":"a1","model":"m",'
    '"messages":[{"role":"user","content":"esc \\u00e9 \\ud83d\\ude00"}],"x":"\\u00e9"}',
    base(10, input_tokens=9223372036854775807),
    base(11, params={"temperature": 0.2, "seed": 7}),  # unknown key inside params
    base(12, extra={"from": "export"}, truncated_fields=["system"]),  # our own export
    base(13, system="s" * (contract.TEXT_FIELD_CAP_BYTES + 10)),  # cut at the cap
    base(14, messages=[{"role": "user", "content": "é" * (contract.TEXT_FIELD_CAP_BYTES // 2 + 5)}]),
    "  " + _line(base(15)),  # leading blanks: legal JSON
    base(16, ts="2026-01-05T10:00:00"),  # zone-less
    base(17, ts=""),
    base(18, request_id=17),
    base(19, input_tokens="12"),
    base(20, status=3_000_000_000),
    base(21, input_tokens=18446744073709551615),
    base(22, input_tokens=1.0),
    base(23, params={"n": 0, "max_tokens": -1}),
    base(24, params={"stream": "yes"}),
    base(25, params="fast"),
    base(26, tools=["a", 1]),
    base(27, tools="a"),
    base(28, messages="hi"),
    base(29, messages=[]),
    base(30, messages=[{"role": "robot", "content": "x"}]),
    base(31, messages=[{"role": "assistant", "content": "no user"}]),
    base(32, messages=[{"role": 1, "content": "x"}]),
    base(33, messages=[{"role": "user", "content": 5}]),
    base(34, endpoint="nope", ip="300.1.1.1", latency_ms=-1),
    base(35, logprobs=True, extra="not an object"),
    base(36, account_id=""),
    base(1, model="other"),  # conflicting duplicate of r1
    base(2, ts=1767607200123, api_key_id="changed"),  # replay of r2 (same identity)
    base(37, params={"temperature": None}),
    base(38, flag=True, count=3, nothing=None),
    "[1, 2]",
    '"just a string"',
    "{not json",
    '{"request_id": "r39"} trailing',
    "",
    base(40, user_agent="ua\r"),
]


def _write(tmp_path: Path, lines: list, name: str = "varied.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(_line(x) for x in lines) + "\n", encoding="utf-8")
    return path


def _snapshot(db: Path, path: Path, kind: str, fast: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(validate, "FAST_JSON", fast)
    with store.connect(db) as con:
        report = ingest_paths(con, [path], kind=kind)
        key = "request_id" if kind == "exchanges" else "account_id"
        rows = con.execute(f"SELECT * FROM {kind} ORDER BY {key}").fetchall()
        quarantine = con.execute(
            "SELECT row_number, kind, reason, detail, raw, raw_length FROM quarantine "
            "ORDER BY row_number"
        ).fetchall()
    counts = (report.read, report.stored, report.duplicates, report.quarantined,
              report.truncated, report.errors)
    return rows, quarantine, counts


@pytest.mark.parametrize(
    ("source", "kind"),
    [("varied", "exchanges"), (DATA / "exchanges_bad.jsonl", "exchanges"),
     (DATA / "accounts.jsonl", "accounts")],
)
def test_fast_path_and_exact_path_store_identical_rows(tmp_path, monkeypatch, source, kind):
    path = _write(tmp_path, VARIED) if source == "varied" else source
    fast = _snapshot(tmp_path / "fast.duckdb", path, kind, True, monkeypatch)
    exact = _snapshot(tmp_path / "exact.duckdb", path, kind, False, monkeypatch)
    assert fast[2] == exact[2]
    assert fast[1] == exact[1]
    assert fast[0] == exact[0]
    assert fast[0] and (source != "varied" or fast[1])


def _routes(lines: list) -> dict[int, bool]:
    """Row number -> did the line take the fast path (run the JSON stage alone)."""
    data = ("\n".join(_line(x) for x in lines) + "\n").encode()
    table, _ = readers._lines_batch(data, 0, "jsonl", True)
    con = store.connect(":memory:")
    validate.install_macros(con)
    types = validate.duck_types(con, "exchanges")
    con.register("_b", table)
    stage = validate.json_stage(validate.EXCHANGES, types, "_b")
    return dict(con.execute(f"SELECT row_number, _fast FROM ({stage})").fetchall())


def test_clean_lines_take_the_fast_path_and_unusual_ones_the_exact_path():
    routes = _routes([base(1), base(2, gateway_region="eu"), base(3, request_id=3),
                      "{bad", base(4, params={"seed": 1}), base(5, ts=1767607200123)])
    assert routes == {1: True, 2: True, 3: False, 4: False, 5: False, 6: True}


def test_one_bad_line_among_good_lines_only_that_line_is_quarantined(con, tmp_path):
    lines = [base(i) for i in range(1, 2001)]
    lines[999] = '{"request_id": "r1000", "ts": "' + TS + '", oops'
    lines[1499] = base(1500, input_tokens="many")
    path = tmp_path / "mostly_good.jsonl"
    data = ("\n".join(_line(x) for x in lines) + "\n").encode()
    path.write_bytes(data[:50_000] + b"\xff\xfe" + data[50_000:])  # and one bad UTF-8 line
    bad_utf8_row = data[:50_000].count(b"\n") + 1
    report = ingest_paths(con, [path])
    assert report.read == 2000 and report.stored == 1997
    by_row = {r["row_number"]: r["reason"] for r in list_quarantine(con, limit=None)}
    assert by_row == {bad_utf8_row: "bad_utf8", 1000: "bad_json", 1500: "bad_type"}
    stored = {r[0] for r in con.execute("SELECT request_id FROM exchanges").fetchall()}
    assert "r1" in stored and "r2000" in stored and "r1000" not in stored


def test_a_batch_table_with_a_bad_json_line_still_parses_in_bulk():
    """try() keeps a malformed line from failing the bulk parse of the whole batch."""
    routes = _routes([base(i) for i in range(1, 50)] + ["{oops"] + [base(99)])
    assert routes[50] is False and sum(routes.values()) == 50


def test_stage_output_types_do_not_depend_on_the_path():
    con = duckdb.connect()
    validate.install_macros(con)
    store.ensure_tables(con)
    types = validate.duck_types(con, "exchanges")
    table = pa.table({"row_number": pa.array([1], pa.int64()),
                      "line": pa.array([_line(base(1))], pa.large_string()),
                      "raw": pa.nulls(1, pa.large_string()), "raw_length": pa.array([10]),
                      "pre_reason": pa.nulls(1, pa.string()),
                      "pre_detail": pa.nulls(1, pa.string())})
    con.register("_b", table)
    described = []
    for fast in (True, False):
        stage = validate.json_stage(validate.EXCHANGES, types, "_b", fast=fast)
        described.append(con.execute(f"DESCRIBE SELECT * FROM ({stage})").fetchall())
    assert described[0] == described[1]
