"""Durability: `kill -9` a gateway process under load; after a restart every exchange that got a
response is in the store exactly once. Also: scan findings in the store reach the gateway."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import duckdb
import httpx
import pyarrow as pa
import pytest

from conftest_gateway import GatewayProcess, chat, keys_config, wait_for
from distillguard import contract, store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
SIGNALS = "conftest_gateway:controlled_signals"


def _config(tmp, upstream_url: str) -> dict:
    return {
        "upstream": upstream_url,
        "store": str(tmp / "store.duckdb"),
        "policy": str(tmp / "policy.yaml"),
        "wal": {"dir": str(tmp / "wal"), "flush_interval_s": 3.0, "segment_max_age_s": 1.0},
        "state": {"enforcement_refresh_s": 0.5},
        "keys": keys_config(),
        "signals": SIGNALS,
    }


def _load(url: str, stop: threading.Event, done: list[str], worker: int) -> None:
    """Send requests until stopped; remember the marker of every COMPLETE response."""
    with httpx.Client(base_url=url, timeout=10,
                      headers={"authorization": f"Bearer key-{worker}"}) as c:
        i = 0
        while not stop.is_set():
            marker = f"m-{uuid.uuid4().hex}"
            stream = i % 3 == 0
            try:
                r = c.post("/v1/chat/completions", json=chat(text=marker, stream=stream))
                if r.status_code == 200 and (not stream or r.content.endswith(b"[DONE]\n\n")):
                    done.append(marker)
            except httpx.HTTPError:
                pass  # in flight when the gateway died: no response, no promise
            i += 1


def _count_markers(db_path) -> dict[str, int]:
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        rows = con.execute(
            "SELECT messages[1].content AS m, count(*) FROM exchanges GROUP BY m").fetchall()
    finally:
        con.close()
    return dict(rows)


def test_kill9_under_load_loses_nothing_and_duplicates_nothing(tmp_path, upstream):
    (tmp_path / "policy.yaml").write_text("rules: []\n")
    cfg = _config(tmp_path, upstream.url)
    gw = GatewayProcess(cfg, tmp_path).start()
    stop, done = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(gw.url, stop, done, w)) for w in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: len(done) >= 60, timeout=60)
    gw.kill9()  # mid-load, with segments not yet ingested
    stop.set()
    for t in threads:
        t.join()
    # segments left behind by the dead process (the orphaned store worker may replay some)
    restarted = GatewayProcess(cfg, tmp_path, name="gw2").start()
    with httpx.Client(base_url=restarted.url,
                      headers={"authorization": "Bearer key-1"}) as c:
        assert c.post("/v1/chat/completions", json=chat(text="after-restart")).status_code == 200
    restarted.stop()  # graceful: final flush
    wait_for(lambda: not list((tmp_path / "wal").glob("seg-*")), timeout=30)
    counts = _count_markers(tmp_path / "store.duckdb")
    missing = [m for m in done if counts.get(m, 0) != 1]
    assert not missing, f"{len(missing)} of {len(done)} answered exchanges not stored once"
    assert all(n == 1 for n in counts.values()), "an exchange was stored twice"
    assert counts.get("after-restart") == 1


def test_scan_findings_in_store_reach_the_gateway(tmp_path, upstream):
    con = store.connect(tmp_path / "store.duckdb")
    now = datetime.now(UTC).replace(microsecond=0)
    findings = pa.table({"account_id": ["acct-3"], "score": [0.97], "flagged": [True],
                         "first_flagged_at": [now], "campaign_id": ["camp-9"],
                         "reasons": [["synchronised template farm"]]})
    findings = contract.conform(findings, contract.FINDING_ACCOUNT_SCHEMA)
    con.execute("INSERT INTO finding_accounts SELECT * FROM findings")
    con.close()
    (tmp_path / "policy.yaml").write_text(
        "rules:\n  - {id: flagged, when: {account.flagged: true}, action: block,"
        " reason: campaign_member}\n")
    gw = GatewayProcess(_config(tmp_path, upstream.url), tmp_path).start()
    try:
        with httpx.Client(base_url=gw.url, headers={"authorization": "Bearer key-3"}) as c:
            r = wait_for(lambda: (r := c.post("/v1/chat/completions", json=chat()))
                         .status_code == 403 and r, timeout=20)
            assert r.json()["distillguard"]["reason"] == "campaign_member"
        with httpx.Client(base_url=gw.url, headers={"authorization": "Bearer key-4"}) as c:
            assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        state = gw.admin("GET", "/admin/accounts/acct-3").json()
        assert state["standing"]["campaign_id"] == "camp-9"
    finally:
        gw.stop()


def test_sigterm_to_the_process_group_still_ends_with_the_final_flush(tmp_path, upstream):
    """A service manager or Ctrl-C signals every process of the group: the store worker ignores
    it, the gateway drains and asks the worker for its final flush, and all of it ends within
    seconds (with an `mp.Event` as the stop signal, a worker that died or timed out at the
    wrong moment left the gateway hanging in shutdown)."""
    import os
    import signal
    import time

    (tmp_path / "policy.yaml").write_text("rules: []\n")
    cfg = _config(tmp_path, upstream.url)
    cfg["wal"]["flush_interval_s"] = 30.0  # nothing is ingested before the final flush
    gw = GatewayProcess(cfg, tmp_path)
    gw.start(new_session=True)
    try:
        with httpx.Client(base_url=gw.url, headers={"authorization": "Bearer key-1"}) as c:
            markers = [f"term-{i}" for i in range(20)]
            for marker in markers:
                assert c.post("/v1/chat/completions", json=chat(text=marker)).status_code == 200
        time.sleep(1.0)  # the worker is waiting for its next pass
        t0 = time.monotonic()
        os.killpg(gw.proc.pid, signal.SIGTERM)
        gw.proc.wait(25)
        assert time.monotonic() - t0 < 25
    finally:
        gw.stop()
    counts = _count_markers(tmp_path / "store.duckdb")
    assert all(counts.get(m) == 1 for m in markers), counts
