"""`scan` end to end on the crafted world: flags, reasons, attribution, store + files, allow-lists,
`--until` replay semantics, incremental signals, reports and the CLI."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distillguard import contract, engine, reports, store
from distillguard.cli import app
from test_engine_crafted import DAYS, T0, load_crafted


@pytest.fixture
def world(con):
    return load_crafted(con)


def flagged(findings: engine.Findings) -> set[str]:
    return {r["account_id"] for r in findings.accounts.to_pylist() if r["flagged"]}


def test_scan_flags_the_campaign_and_nothing_else(con, world, tmp_path):
    f = engine.scan(con, out=tmp_path / "findings")
    attackers = {a for a, p in world.items() if p == "attacker"}
    assert flagged(f) == attackers
    assert f.campaigns.num_rows == 1
    c = f.campaigns.to_pylist()[0]
    assert c["n_accounts"] == len(attackers) and sorted(c["accounts"]) == sorted(attackers)
    assert dict(c["indicators"])["payment_fingerprints"] == ["pay-a0", "pay-a1", "pay-a2"]
    assert "203.0.113.0/24" in dict(c["indicators"])["cidrs"]
    assert f.accounts.schema.equals(contract.FINDING_ACCOUNT_SCHEMA)
    assert f.campaigns.schema.equals(contract.FINDING_CAMPAIGN_SCHEMA)
    # every campaign exchange attributed, no honest one
    n_attack = con.execute(
        "SELECT count(*) FROM exchanges WHERE account_id LIKE 'atk%'").fetchone()[0]
    assert f.exchanges.num_rows == n_attack == c["n_exchanges"]
    # written to the store and to the findings directory
    assert con.execute("SELECT count(*) FROM finding_accounts WHERE flagged").fetchone()[0] == len(
        attackers)
    assert pq.read_table(tmp_path / "findings" / "exchanges.parquet").num_rows == n_attack
    doc = json.loads((tmp_path / "findings" / "campaigns.json").read_text())
    assert doc["campaigns"][0]["campaign_id"] == c["campaign_id"]


def test_every_flagged_account_and_campaign_has_reasons_with_counts(con, world):
    f = engine.scan(con)
    for row in f.accounts.to_pylist():
        if row["flagged"]:
            text = " ".join(row["reasons"])
            assert "member of campaign" in text
            assert "shared evidence" in text and any(ch.isdigit() for ch in text)
            assert "population median" in text  # behavioural evidence, with the reference
    reasons = f.campaigns.to_pylist()[0]["reasons"]
    assert any("shared payment fingerprints" in r and "of 24 accounts" in r for r in reasons)
    assert any("chain-of-thought" in r for r in reasons)


def test_flagged_accounts_rank_above_all_others(con, world):
    rows = engine.scan(con).accounts.to_pylist()
    assert min(r["score"] for r in rows if r["flagged"]) > max(
        r["score"] for r in rows if not r["flagged"])


def test_allow_lists_are_respected_and_reported(con, world):
    f = engine.scan(con, allow_accounts=["atk0001", "atk0002"])
    assert "atk0001" not in flagged(f) and "atk0003" in flagged(f)
    assert f.allow_listed == ["atk0001", "atk0002"]
    row = next(r for r in f.accounts.to_pylist() if r["account_id"] == "atk0001")
    assert any("allow-listed" in r for r in row["reasons"])
    assert any("allow-listed" in r for r in f.campaigns.to_pylist()[0]["reasons"])
    con.execute("UPDATE accounts SET org_id = 'licensed-lab' WHERE account_id LIKE 'atk%'")
    assert flagged(engine.scan(con, allow_orgs=["licensed-lab"])) == set()


def test_until_replay_keeps_the_first_flag_time(con, world):
    day1 = T0 + timedelta(days=1)
    early = engine.scan(con, until=day1)
    assert early.n_exchanges < con.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    first = {r["account_id"]: r["first_flagged_at"] for r in early.accounts.to_pylist()
             if r["flagged"]}
    assert first and all(t == day1 for t in first.values())
    late = engine.scan(con, until=T0 + timedelta(days=DAYS))
    later_rows = {r["account_id"]: r for r in late.accounts.to_pylist()}
    for a, t in first.items():  # flagged earlier -> keeps the earlier time
        assert later_rows[a]["first_flagged_at"] == t
    cid = early.campaigns["campaign_id"][0].as_py()
    assert late.campaigns["campaign_id"][0].as_py() == cid  # stable campaign id
    assert late.campaigns["first_flagged_at"][0].as_py() == day1


def test_signals_are_computed_once(con, world):
    con.execute("DELETE FROM signals WHERE account_id LIKE 'hon00%'")
    missing = con.execute("SELECT count(*) FROM exchanges e ANTI JOIN signals s USING "
                          "(request_id)").fetchone()[0]
    pytest.importorskip("distillguard.signals", reason="needs the signals stage")
    first = engine.scan(con)
    assert first.n_annotated == missing
    assert engine.scan(con).n_annotated == 0


def test_empty_store_gives_empty_findings(con):
    f = engine.scan(con)
    assert f.accounts.num_rows == 0 and f.campaigns.num_rows == 0


def test_bad_arguments_are_clear(con):
    with pytest.raises(ValueError, match="engine must be"):
        engine.scan(con, engine="pandas")
    with pytest.raises(ValueError, match="time zone"):
        engine.scan(con, until=T0.replace(tzinfo=None))


def test_reports_render_markdown_and_json(con, world):
    engine.scan(con)
    accounts, campaigns = reports.load_from_store(con)
    md = reports.to_markdown(accounts, campaigns)
    assert md.startswith("# distillguard campaign report") and "payment fingerprints" in md
    doc = json.loads(reports.to_json(accounts, campaigns))
    assert len(doc["flagged_accounts"]) == 24
    assert isinstance(doc["campaigns"][0]["indicators"], dict)


def test_cli_scan_campaigns_report(db_path, tmp_path):
    con = store.connect(db_path)
    load_crafted(con)
    con.close()
    runner = CliRunner()
    out = tmp_path / "f"
    res = runner.invoke(app, ["scan", "--db", str(db_path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # Rich wraps lines at the terminal width
    assert "1 campaigns" in text and "24 accounts flagged" in text
    res = runner.invoke(app, ["campaigns", "--findings", str(out)])
    assert res.exit_code == 0 and "cmp-" in res.output
    res = runner.invoke(app, ["report", "--db", str(db_path), "--account", "atk0001"])
    assert res.exit_code == 0 and "member of campaign" in res.output
    res = runner.invoke(app, ["report", "--db", str(db_path), "--format", "markdown"])
    assert res.exit_code == 0 and "## cmp-" in res.output
    res = runner.invoke(app, ["scan", "--db", str(db_path), "--until", "yesterday"])
    assert res.exit_code == 1 and "RFC 3339" in " ".join(res.output.split())
    res = runner.invoke(app, ["scan", "--db", str(tmp_path / "nope.duckdb")])
    assert res.exit_code == 1 and "no store here" in " ".join(res.output.split())


def test_replay_stamps_the_checkpoint_that_first_saw_each_flag(con, world):
    f = engine.replay(con, every=timedelta(days=1))
    times = {r["first_flagged_at"] for r in f.accounts.to_pylist() if r["flagged"]}
    assert times and max(times) <= T0 + timedelta(days=DAYS)
    first_ts = con.execute("SELECT min(ts) FROM exchanges").fetchone()[0]
    assert min(times) == first_ts + timedelta(days=1)  # seen at the first daily checkpoint
    with pytest.raises(ValueError, match="positive"):
        engine.replay(con, every=timedelta(0))


def test_replay_from_a_later_start_only_scans_that_window(con, world, monkeypatch):
    start = T0 + timedelta(days=DAYS - 2)
    seen: list[datetime] = []
    real_scan = engine.scan

    def spy(con, until=None, **kw):
        seen.append(until)
        return real_scan(con, until=until, **kw)

    monkeypatch.setattr(engine, "scan", spy)
    f = engine.replay(con, every=timedelta(days=1), start=start)
    assert seen[0] == start + timedelta(days=1) and all(t > start for t in seen)
    times = {r["first_flagged_at"] for r in f.accounts.to_pylist() if r["flagged"]}
    assert times and min(times) > start  # nothing is stamped before the window it replayed


def test_a_second_scan_in_one_process_annotates_the_exchanges_that_arrived(con, world):
    # Ibis switches DuckDB's Python-variable lookup off on the connection it wraps: the second
    # scan's signals must not depend on it (a replay failed there)
    con.execute("DELETE FROM signals")
    first = engine.scan(con, until=T0 + timedelta(days=1))
    later = engine.scan(con)
    total = con.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    assert first.n_annotated > 0 and later.n_annotated > 0
    assert first.n_annotated + later.n_annotated == total
    assert con.execute("SELECT count(*) FROM signals").fetchone()[0] == total


def test_campaign_ids_stay_unique_when_a_campaign_splits():
    """A campaign named after its smallest member splits in two: the larger part keeps the id
    (most of its accounts carried it), the part holding that member must not reuse it."""
    import hashlib

    import numpy as np

    from distillguard.scoring import ClusterVerdict

    names = ["a0", "a1", "a2", "a3", "a4", "a5", "a6"]
    old = "cmp-" + hashlib.sha1(b"a0").hexdigest()[:10]
    prior = {n: (T0, old) for n in names}

    def verdict(label, idx):
        idx = np.array(idx)
        return ClusterVerdict(label, idx, idx, 1.0, 3.0, 3.0, 0.99, True)

    ids = engine._campaign_ids([verdict(0, [0, 1, 2]), verdict(1, [3, 4, 5, 6])], names, prior)
    assert ids[1] == old and ids[0] != old and len(set(ids.values())) == 2


def test_duckdb_gives_its_memory_to_the_graph_stages_and_gets_it_back(con, world, monkeypatch):
    """Linking and clustering run under `duckdb_graph_memory_limit` (DuckDB spills its buffers
    meanwhile); the scan's own limit is back for the campaigns and the caller's after it."""
    seen = {}

    def setting() -> str:
        return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]

    link, attribute = engine.Linker.link, engine.camp.attribute

    def spy_link(self, *a, **k):
        seen["linking"] = setting()
        return link(self, *a, **k)

    def spy_attribute(*a, **k):
        seen["campaigns"] = setting()
        return attribute(*a, **k)

    monkeypatch.setattr(engine.Linker, "link", spy_link)
    monkeypatch.setattr(engine.camp, "attribute", spy_attribute)
    con.execute("SET memory_limit = '2GiB'")  # DuckDB prints limits rounded down
    before = setting()
    config = engine.ScanConfig(duckdb_memory_limit="1GB", duckdb_graph_memory_limit="64MB")
    f = engine.scan(con, config=config)
    assert f.campaigns.num_rows == 1
    assert seen["linking"] == "61.0 MiB" and seen["campaigns"].startswith("953.")  # 64 MB, 1 GB
    assert setting() == before


def test_a_full_disk_is_reported_clearly(db_path, monkeypatch):
    """DuckDB's spill failing on a full disk: a one-line error saying where it spilled and
    what is kept, no traceback; other I/O errors are not relabelled."""
    con = store.connect(db_path)
    load_crafted(con)
    con.close()

    def failing(message):
        def raise_io_error(*args, **kwargs):
            raise duckdb.IOException(message)
        return raise_io_error

    monkeypatch.setattr(engine, "_scan", failing(
        'IO Error: Could not write file "x.tmp/duckdb_temp_block": No space left on device'))
    res = CliRunner().invoke(app, ["scan", "--db", str(db_path)])
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "disk filled up" in text and "signals computed so far" in text
    assert "Traceback" not in res.output
    monkeypatch.setattr(engine, "_scan", failing("IO Error: permission denied"))
    con = store.connect(db_path)
    with pytest.raises(duckdb.IOException, match="permission denied"):
        engine.scan(con)
    con.close()
