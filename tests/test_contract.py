"""The log contract as enforced by ingest: required fields, types, timestamps with zones,
allowed values, message content forms, text caps, and extra fields kept."""

from __future__ import annotations

import json

from distillguard import contract
from distillguard.ingest import ingest_paths, list_quarantine
from distillguard.ingest.validate import EXCHANGES


def base(**overrides) -> dict:
    record = {
        "request_id": "r1",
        "ts": "2026-01-05T10:00:00Z",
        "account_id": "acct-1",
        "model": "frontier-large",
        "messages": [{"role": "user", "content": "hello"}],
    }
    record.update(overrides)
    return record


def ingest_one(con, tmp_path, record: dict, kind: str = "exchanges"):
    """Ingest one record; return (report, stored row as dict or None, quarantine row or None)."""
    report, stored, quarantined = ingest_many(con, tmp_path, [record], kind)
    return report, next(iter(stored.values()), None), quarantined.get(1)


def ingest_many(con, tmp_path, records: list[dict], kind: str = "exchanges"):
    """Ingest records as one file: (report, stored rows by key, quarantine rows by line)."""
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = ingest_paths(con, [path], kind=kind)
    cursor = con.execute(f"SELECT * FROM {kind}")
    names = [d[0] for d in cursor.description]
    stored = {row[0]: dict(zip(names, row, strict=True)) for row in cursor.fetchall()}
    quarantined = {q["row_number"]: q for q in list_quarantine(con, limit=None)}
    return report, stored, quarantined


def test_required_fields_absent_null_or_empty(con, tmp_path):
    records = []
    for field in contract.EXCHANGE_REQUIRED:
        for value in ("<absent>", None, [] if field == "messages" else ""):
            record = base(request_id=f"{field}-{value}")
            if value == "<absent>":
                del record[field]
            else:
                record[field] = value
            records.append(record)
    _, stored, quarantined = ingest_many(con, tmp_path, records)
    assert stored == {}
    for line, record in enumerate(records, start=1):
        missing = next(f for f in contract.EXCHANGE_REQUIRED if not record.get(f))
        assert quarantined[line]["reason"] == "missing_field", record
        assert quarantined[line]["detail"] == f"{missing}: required"


WRONG_TYPES = [
    ("request_id", 17),
    ("account_id", ["a"]),
    ("model", {"name": "m"}),
    ("ts", True),
    ("messages", {"role": "user"}),
    ("messages", [{"role": 1, "content": "x"}]),
    ("messages", [{"role": "user", "content": {"text": "x"}}]),
    ("tools", "search"),
    ("tools", ["search", 3]),
    ("params", [0.7]),
    ("params", {"max_tokens": 10.5}),
    ("params", {"stream": "yes"}),
    ("input_tokens", 1.5),
    ("status", "200"),
    ("latency_ms", "fast"),
    ("ip", 1234),
    ("extra", "x"),
]


def test_wrong_types_are_bad_type(con, tmp_path):
    records = [{**base(request_id=f"case-{i}"), f: v} for i, (f, v) in enumerate(WRONG_TYPES)]
    _, stored, quarantined = ingest_many(con, tmp_path, records)
    assert stored == {}
    for line, (field, _) in enumerate(WRONG_TYPES, start=1):
        assert quarantined[line]["reason"] == "bad_type", field
        assert quarantined[line]["detail"].startswith(field)


GOOD_TIMESTAMPS = [
    ("2026-01-05T10:00:00Z", 1767607200000),
    ("2026-01-05t10:00:00z", 1767607200000),
    ("2026-01-05 10:00:00Z", 1767607200000),
    ("2026-01-05T12:00:00+02:00", 1767607200000),
    ("2026-01-05T05:30:00.5-04:30", 1767607200500),
    ("2026-01-05T10:00:00.999999999Z", 1767607200999),
    (1767607200000, 1767607200000),
]
BAD_TIMESTAMPS = ["2026-01-05T10:00:00", "2026-01-05", "05/01/2026 10:00 UTC",
                  "2026-13-45T10:00:00Z"]


def test_timestamps_need_a_zone_and_become_utc(con, tmp_path):
    cases = [ts for ts, _ in GOOD_TIMESTAMPS] + BAD_TIMESTAMPS
    records = [base(request_id=f"t{i}", ts=ts) for i, ts in enumerate(cases)]
    _, stored, quarantined = ingest_many(con, tmp_path, records)
    for i, (_, epoch_ms) in enumerate(GOOD_TIMESTAMPS):
        assert int(stored[f"t{i}"]["ts"].timestamp() * 1000) == epoch_ms, cases[i]
    first_bad = len(GOOD_TIMESTAMPS) + 1
    assert {line: q["reason"] for line, q in quarantined.items()} == {
        line: "bad_timestamp" for line in range(first_bad, first_bad + len(BAD_TIMESTAMPS))
    }


BAD_VALUES = [
    ("endpoint", "embeddings"),
    ("ip", "10.0.0.256"),
    ("ip", "localhost"),
    ("status", 42),
    ("output_tokens", -1),
    ("params", {"n": 0}),
    ("messages", [{"role": "robot", "content": "x"}, {"role": "user", "content": "y"}]),
    ("messages", [{"role": "system", "content": "only a system prompt"}]),
]


def test_values_outside_the_contract_are_bad_value(con, tmp_path):
    records = [base(request_id=f"v{i}", **{f: v}) for i, (f, v) in enumerate(BAD_VALUES)]
    _, stored, quarantined = ingest_many(con, tmp_path, records)
    assert stored == {}
    for line, (field, _) in enumerate(BAD_VALUES, start=1):
        assert quarantined[line]["reason"] == "bad_value", field
        assert quarantined[line]["detail"].startswith(field)


def test_every_documented_endpoint_is_accepted(con, tmp_path):
    records = [base(request_id=e, endpoint=e, ip="::ffff:192.0.2.1") for e in contract.ENDPOINTS]
    _, stored, quarantined = ingest_many(con, tmp_path, records)
    assert quarantined == {}
    assert {r["endpoint"] for r in stored.values()} == set(contract.ENDPOINTS)


def test_all_fields_round_trip(con, tmp_path):
    record = base(
        api_key_id="key-1", org_id="org-1", ip="192.0.2.1", user_agent="curl/8",
        endpoint="chat.completions", system="be terse",
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": None},
                  {"role": "tool", "content": "42"}],
        tools=["calc"], tool_calls=["calc"],
        params={"temperature": 1, "top_p": 0.9, "max_tokens": 100, "n": 2, "logprobs": True,
                "stream": False, "reasoning_effort": "low", "reasoning_budget": 512},
        response_text="a", reasoning_text="because", input_tokens=3, output_tokens=4,
        reasoning_tokens=5, status=200, error=None, latency_ms=12.5, stop_reason="stop",
    )
    _, stored, q = ingest_one(con, tmp_path, record)
    assert q is None
    assert stored["messages"][1] == {"role": "assistant", "content": ""}
    assert stored["params"] == {"temperature": 1.0, "top_p": 0.9, "max_tokens": 100, "n": 2,
                                "logprobs": True, "stream": False, "reasoning_effort": "low",
                                "reasoning_budget": 512}
    for key in ("api_key_id", "org_id", "ip", "user_agent", "system", "tools", "tool_calls",
                "response_text", "reasoning_text", "input_tokens", "output_tokens",
                "reasoning_tokens", "status", "latency_ms", "stop_reason"):
        assert stored[key] == record[key], key
    assert stored["extra"] is None and stored["truncated_fields"] is None


def test_content_parts(con, tmp_path):
    parts = [
        {"type": "text", "text": "look:"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "input_image", "image_url": "data:..."},
        "plain string part",
        {"type": "input_audio", "input_audio": {"data": "..."}},
    ]
    _, stored, _ = ingest_one(con, tmp_path, base(messages=[{"role": "user", "content": parts}]))
    image = contract.IMAGE_PLACEHOLDER
    assert stored["messages"][0]["content"] == (
        f"look:\n{image}\n{image}\nplain string part\n[input_audio]")


def test_unknown_fields_are_kept_as_json_text(con, tmp_path):
    record = base(tenant="t-9", tags=["a", "b"], score=0.5, nested={"k": None},
                  params={"temperature": 0.1, "seed": 7})
    _, stored, _ = ingest_one(con, tmp_path, record)
    extra = stored["extra"]
    assert json.loads(extra["tenant"]) == "t-9"
    assert json.loads(extra["tags"]) == ["a", "b"]
    assert json.loads(extra["score"]) == 0.5
    assert json.loads(extra["nested"]) == {"k": None}
    assert json.loads(extra["params.seed"]) == 7


def test_an_extra_object_in_the_input_is_merged(con, tmp_path):
    _, stored, _ = ingest_one(con, tmp_path, base(extra={"region": '"eu"'}, other=1))
    assert stored["extra"] == {"region": '"eu"', "other": "1"}


def test_text_over_the_cap_is_truncated_and_flagged(con, tmp_path):
    text = "日本" * (contract.TEXT_FIELD_CAP_BYTES // 3)  # 3-byte characters, > cap
    fields = ["system", "response_text", "reasoning_text", "error"]
    _, stored, quarantined = ingest_many(con, tmp_path,
                                         [base(request_id=f, **{f: text}) for f in fields])
    assert quarantined == {}
    for field in fields:
        assert stored[field]["truncated_fields"] == [field]
        cut = stored[field][field]
        assert contract.TEXT_FIELD_CAP_BYTES - 4 < len(cut.encode()) <= contract.TEXT_FIELD_CAP_BYTES
        assert text.startswith(cut)


def test_account_contract(con, tmp_path):
    record = {"account_id": "acct-1", "created_at": "2025-12-01T09:00:00-05:00",
              "verification_path": "startup_program", "billing_country": "DE",
              "signup_ip": "2001:db8::5", "campaign": "launch"}
    _, stored, q = ingest_one(con, tmp_path, record, kind="accounts")
    assert q is None
    assert stored["created_at"].isoformat() == "2025-12-01T14:00:00+00:00"
    assert json.loads(stored["extra"]["campaign"]) == "launch"


def test_every_contract_field_is_read_by_the_validator():
    """The SQL is generated from the schema: a new contract field cannot be forgotten."""
    names = {f.name for f in EXCHANGES.fields}
    assert names == {f.name for f in contract.EXCHANGE_SCHEMA} - {"extra", "truncated_fields"}
