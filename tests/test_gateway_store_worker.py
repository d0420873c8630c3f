"""The store worker's fast path (gateway/fast_ingest.py) stores what the validating ingest
path stores, and hands it everything it does not accept as clean."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import orjson
import pytest

import distillguard.ingest
from distillguard import store
from distillguard.gateway import fast_ingest
from distillguard.gateway.exchange import ResponseAccumulator, iso, request_fields
from distillguard.gateway.wal import StoreWorker, flush_once
from distillguard.ingest import ingest_paths

TS = 1_764_600_000.0


def _record(i: int, endpoint: str, body: dict, response: dict | None = None,
            events: list[dict] | None = None, **extra) -> dict:
    rec = request_fields(endpoint, body)
    rec.update(request_id=f"gw-test-{i:05d}", ts=iso(TS + i * 0.0137),
               account_id=f"acct-{i % 3}", api_key_id="key-1" if i % 2 else None,
               org_id="org-a" if i % 4 == 0 else None,
               ip=("203.0.113.9", "2001:db8::1", "127.0.0.1", None)[i % 4],
               user_agent="sdk/1.2 (é)" if i % 5 == 0 else None)
    acc = ResponseAccumulator(endpoint)
    if response is not None:
        acc.from_body(response)
    for event in events or ():
        acc.from_event(event)
    rec.update(acc.fields())
    rec.update(status=200, latency_ms=round(1.5 + i / 7, 3), gateway_action="allow")
    rec.update(extra)
    return rec


def gateway_records() -> list[dict]:
    """Records shaped as the gateway writes them: JSON, SSE, Anthropic, completions,
    rejections, upstream failures, degraded, unicode, images, tools."""
    chat = {"id": "x", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "The answer is 42. ✓ 日本語",
        "reasoning_content": "Let me think… step 1."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 30,
                  "completion_tokens_details": {"reasoning_tokens": 7}}}
    tool = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "calc", "arguments": "{\"x\": 1}"}}]},
        "finish_reason": "tool_calls"}]}
    anthropic = {"content": [{"type": "thinking", "thinking": "hmm"},
                             {"type": "text", "text": "Hi there"},
                             {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}],
                 "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 9}}
    sse = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
           {"choices": [{"delta": {"reasoning_content": "think "}}]},
           {"choices": [{"delta": {"content": "Hello"}}]},
           {"choices": [{"delta": {"content": " world"}, "finish_reason": "stop"}]}]
    out = []
    for i in range(60):
        kind = i % 10
        if kind == 0:
            out.append(_record(i, "chat.completions", {
                "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": f"question {i}"}],
                "temperature": 0.7, "top_p": 1, "n": 2, "max_tokens": 100, "logprobs": True,
                "reasoning_effort": "high"}, chat))
        elif kind == 1:
            out.append(_record(i, "chat.completions", {
                "model": "m", "stream": True, "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "look"},
                                                 {"type": "image_url", "image_url": {}}]},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "and now?"}]}, events=sse))
        elif kind == 2:
            out.append(_record(i, "messages", {
                "model": "claude", "system": "sys", "max_tokens": 50,
                "thinking": {"type": "enabled", "budget_tokens": 1000},
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"name": "f", "input_schema": {}}]}, anthropic))
        elif kind == 3:
            out.append(_record(i, "completions", {"model": "m", "prompt": ["a", {"b": 1}]},
                               {"choices": [{"text": "done", "finish_reason": "length"}]}))
        elif kind == 4:  # rejected during the call
            rec = _record(i, "chat.completions", {"model": "m", "messages": [
                {"role": "user", "content": "harvest"}]}, gateway_action="challenge",
                gateway_reasons=["cot_harvesting_pattern"], gateway_would_action="challenge",
                gateway_monitored_rules=["trial-rule"], gateway_cluster_id="camp-1",
                gateway_upstream_cancelled=True)
            rec.update(status=403, error="cot_harvesting_pattern", latency_ms=None)
            out.append(rec)
        elif kind == 5:  # upstream failure
            rec = _record(i, "chat.completions", {"model": "m", "messages": [
                {"role": "user", "content": "x"}]})
            rec.update(status=502, error="upstream_unreachable: ConnectionRefusedError()")
            out.append(rec)
        elif kind == 6:
            out.append(_record(i, "chat.completions", {"model": "m", "tools": [
                {"type": "function", "function": {"name": "calc"}}],
                "messages": [{"role": "user", "content": "use the tool"},
                             {"role": "tool", "content": "3"}]}, tool,
                gateway_action="degrade", gateway_reasons=["flagged_campaign_member"]))
        elif kind == 7:  # upstream error passed through
            rec = _record(i, "chat.completions", {"model": "m", "messages": [
                {"role": "developer", "content": ""}, {"role": "user", "content": "q"}]})
            rec.update(status=429, error='{"error": "slow down"}', input_tokens=0)
            out.append(rec)
        else:
            out.append(_record(i, "chat.completions", {"model": "stub-model", "messages": [
                {"role": "user", "content": f"Natalia sold {i} clips; how many? 🙂"}]}, chat))
    return out


#: Records the fast path must leave to the validator (each alone in a segment).
NOT_CLEAN = {
    "ts_z": {"ts": "2026-12-01T10:00:00Z"},
    "ts_epoch": {"ts": 1_764_600_000_000},
    "ts_invalid_date": {"ts": "2026-02-30T10:00:00.000+00:00"},
    "bad_ip": {"ip": "unknown"},
    "n_zero": {"params": {"n": 0}},
    "negative_tokens": {"output_tokens": -1},
    "huge_tokens": {"input_tokens": 1 << 63},
    "bad_endpoint": {"endpoint": "embeddings"},
    "no_user": {"messages": [{"role": "assistant", "content": "hi"}]},
    "no_messages": {"messages": []},
    "unknown_role": {"messages": [{"role": "user", "content": "a"},
                                  {"role": "robot", "content": "b"}]},
    "empty_model": {"model": ""},
    "status_range": {"status": 42},
    "float_status": {"status": 200.0},
    "params_unknown_key": {"params": {"n": 1, "seed": 7}},
    "own_extra": {"extra": {"k": "v"}},
    "extra_object": {"gateway_detail": {"a": 1}},
    "extra_control_char": {"gateway_reasons": ["line\nbreak"]},
    "extra_null": {"gateway_cluster_id": None},
    "long_text": {"response_text": "x" * (fast_ingest.CAP + 10)},
    "nul_char": {"response_text": "a\x00b"},
}


def _write_segments(directory, segments: list[list[dict]], raw: dict[int, bytes] | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    for n, records in enumerate(segments):
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        if raw and n in raw:
            data += raw[n]
        (directory / f"seg-{1000 + n}-1-{n:06d}.jsonl").write_bytes(data)


def _dump(db) -> tuple[list, list, list]:
    con = store.connect(db, read_only=True)
    try:
        rows = con.execute("SELECT * FROM exchanges").fetchall()  # stored order
        quarantine = con.execute(
            "SELECT row_number, kind, reason, detail, raw, raw_length FROM quarantine "
            "ORDER BY source_file, row_number").fetchall()
        cols = [d[0] for d in con.execute("SELECT * FROM exchanges LIMIT 0").description]
    finally:
        con.close()
    return rows, quarantine, cols


def _reference(tmp_path, wal_dir, name="ref"):
    """What the store held with the validating path only (the worker before fast_ingest)."""
    db = tmp_path / f"{name}.duckdb"
    con = store.connect(db)
    ingest_paths(con, [str(p) for p in sorted(wal_dir.glob("seg-*"))], kind="exchanges",
                 format="jsonl")
    con.close()
    return _dump(db)


def _count_validating(monkeypatch) -> list:
    calls: list = []
    real = distillguard.ingest.ingest_paths

    def spy(con, paths, *args, **kwargs):
        calls.append(list(paths))
        return real(con, paths, *args, **kwargs)

    monkeypatch.setattr(distillguard.ingest, "ingest_paths", spy)
    return calls


def test_fast_path_stores_what_the_validating_path_stores(tmp_path, monkeypatch):
    assert fast_ingest.FAST_PATH_OK
    records = gateway_records()
    wal_dir = tmp_path / "wal"
    _write_segments(wal_dir, [records[:25], records[25:26], records[26:]])
    ref = _reference(tmp_path, wal_dir)
    calls = _count_validating(monkeypatch)
    stored = flush_once(wal_dir, tmp_path / "fast.duckdb", export_snapshot=False)
    assert stored == len(records)
    assert calls == []  # every segment took the fast path
    assert not list(wal_dir.glob("seg-*"))
    got = _dump(tmp_path / "fast.duckdb")
    assert got[2] == ref[2]
    assert len(got[0]) == len(records) and got[0] == ref[0]
    assert got[1] == ref[1] == []


@pytest.mark.parametrize("case", sorted(NOT_CLEAN))
def test_records_that_are_not_clean_take_the_validating_path(tmp_path, monkeypatch, case):
    records = gateway_records()[:12]
    odd = {**records[3], **NOT_CLEAN[case], "request_id": "gw-odd"}
    if case == "own_extra":
        odd.pop("gateway_action")
    wal_dir = tmp_path / "wal"
    _write_segments(wal_dir, [records[:5], [records[5], odd, records[6]], records[7:]])
    ref = _reference(tmp_path, wal_dir)
    calls = _count_validating(monkeypatch)
    flush_once(wal_dir, tmp_path / "fast.duckdb", export_snapshot=False)
    assert len(calls) == 1 and len(calls[0]) == 1 and calls[0][0].endswith("-000001.jsonl")
    got = _dump(tmp_path / "fast.duckdb")
    assert got[0] == ref[0]
    assert got[1] == ref[1]


def test_bad_lines_and_repeated_ids_take_the_validating_path(tmp_path, monkeypatch):
    records = gateway_records()[:20]
    wal_dir = tmp_path / "wal"
    _write_segments(wal_dir, [records[:5], [*records[5:10], records[7]], records[10:]],
                    raw={2: b"\n{\"request_id\": \"truncated by a crash"})
    ref = _reference(tmp_path, wal_dir)
    calls = _count_validating(monkeypatch)
    flush_once(wal_dir, tmp_path / "fast.duckdb", export_snapshot=False)
    # segments 0 and 1 were one run of clean segments (1 repeats an id): validated together
    assert [len(c) for c in calls] == [2, 1]
    got = _dump(tmp_path / "fast.duckdb")
    assert got[0] == ref[0] and got[1] == ref[1]
    assert {q[2] for q in got[1]} == {"bad_json"}  # the replayed row 7 is a harmless repeat


def test_replayed_segments_are_stored_once(tmp_path, monkeypatch):
    """A crash between ingest and delete replays segments: each row still stored once; a
    row whose request id is stored with other content is quarantined as a duplicate."""
    records = gateway_records()
    wal_dir, copy = tmp_path / "wal", tmp_path / "copy"
    _write_segments(wal_dir, [records[:30], records[30:]])
    shutil.copytree(wal_dir, copy)
    db = tmp_path / "fast.duckdb"
    assert flush_once(wal_dir, db, export_snapshot=False) == len(records)
    first = _dump(db)
    conflict = {**records[0], "ts": iso(TS + 999), "model": "other"}
    _write_segments(wal_dir, [[conflict]])
    for p in copy.iterdir():
        shutil.copy(p, wal_dir / p.name.replace("-1-", "-2-"))
    calls = _count_validating(monkeypatch)
    assert flush_once(wal_dir, db, export_snapshot=False) == 0
    assert calls  # the validating path counted the replays
    again = _dump(db)
    assert again[0] == first[0]
    assert [(q[2], q[3]) for q in again[1]] == [
        ("duplicate", "request_id already stored with different content")]


def _autogroup_in_effect() -> bool:
    """The kernel schedules this process by autogroup: /proc/self/autogroup names a group
    (it reads empty where a cgroup CPU controller places the process instead, as in CI's
    container) and its niceness can be written."""
    path = Path("/proc/self/autogroup")
    try:
        return bool(path.read_text().strip()) and os.access(path, os.W_OK)
    except OSError:
        return False


@pytest.mark.skipif(not _autogroup_in_effect(),
                    reason="no autogroup scheduling here, or its niceness cannot be set")
def test_store_worker_in_its_own_session_runs_at_low_priority(tmp_path):
    """In a session of its own the worker is its own autogroup, where its niceness alone
    would weigh nothing against the gateway's session: the group's niceness is lowered too."""
    (tmp_path / "wal").mkdir()
    worker = StoreWorker(tmp_path / "wal", tmp_path / "store.duckdb", 0.2, 60.0,
                         own_session=True)
    worker.start()
    try:
        pid = worker.process.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            group = Path(f"/proc/{pid}/autogroup").read_text()
            if group.split()[-1] == "19":
                break
            time.sleep(0.1)
        assert group.split()[-1] == "19", group
        assert os.getsid(pid) == pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    finally:
        worker.stop()
