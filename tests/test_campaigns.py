"""Stage 6: signatures, per-exchange attribution of mixed accounts, pivots, indicators."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import ibis
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from distillguard import campaigns, linking

T0 = datetime(2026, 2, 2, tzinfo=UTC)


def ev(rows):
    return pa.table(
        {"account_id": [r[0] for r in rows], "kind": [r[1] for r in rows],
         "key": [r[2] for r in rows]},
        schema=linking.EVIDENCE_SCHEMA,
    )


def test_signatures_need_two_campaign_users_and_a_campaign_majority():
    rows = [("a1", "template", "t-attack"), ("a2", "template", "t-attack"),
            ("a1", "template", "t-own"),  # one campaign user only
            ("a1", "template", "t-popular"), ("a2", "template", "t-popular")]
    rows += [(f"h{i}", "template", "t-popular") for i in range(5)]  # honest majority
    rows += [("a1", "ip", "10.0.0.1"), ("a2", "ip", "10.0.0.1")]  # not a text kind
    sigs = campaigns.campaign_signatures(ev(rows), {"a1": "C", "a2": "C"})
    assert sigs.to_pylist() == [{"campaign_id": "C", "kind": "template", "key": "t-attack"}]


def _signatures_by_sql(evidence: pa.Table, campaign_of: dict[str, str],
                       purity: float = 0.5) -> pa.Table:
    """The SQL the numpy `campaign_signatures` replaced (a DISTINCT / GROUP BY over the
    strings), kept as its reference."""
    import duckdb

    owners = campaigns.owners_table(campaign_of)  # noqa: F841 (read by DuckDB by name)
    plain = evidence.cast(linking.EVIDENCE_SCHEMA)  # noqa: F841
    return duckdb.sql(
        """
        WITH sig AS (
          SELECT DISTINCT e.kind, e.key, e.account_id, o.campaign_id
          FROM plain e LEFT JOIN owners o USING (account_id)
          WHERE e.kind IN ('template', 'lsh')),
        users AS (SELECT kind, key, count(*) AS n_users FROM sig GROUP BY ALL)
        SELECT s.campaign_id, s.kind, s.key
        FROM sig s JOIN users u USING (kind, key)
        WHERE s.campaign_id IS NOT NULL
        GROUP BY s.campaign_id, s.kind, s.key, u.n_users
        HAVING count(*) >= 2 AND count(*) >= $purity * u.n_users
        ORDER BY ALL
        """, params={"purity": purity}).to_arrow_table()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_signatures_are_those_of_the_sql_they_replaced(seed):
    """Random evidence (repeated rows, keys of several kinds, campaigns and honest users mixed
    on the same keys), plain and dictionary-encoded, at two purities."""
    rng = np.random.default_rng(seed)
    n = 4_000
    rows = list(zip([f"a{i}" for i in rng.integers(0, 300, n)],
                    rng.choice(["template", "lsh", "ip", "payment"], n).tolist(),
                    [f"k{i}" for i in rng.integers(0, 150, n)], strict=True))
    campaign_of = {f"a{i}": f"C{i % 7}" for i in range(0, 300, 2)}
    plain = ev(rows)
    encoded = pa.table({c: pc.dictionary_encode(plain[c]) for c in plain.column_names})
    for purity in (0.5, 0.2):
        want = _signatures_by_sql(plain, campaign_of, purity)
        assert want.num_rows > 0
        for table in (plain, encoded):
            got = campaigns.campaign_signatures(table, campaign_of, purity=purity)
            assert got.equals(want)
    assert campaigns.campaign_signatures(ev([]), campaign_of).num_rows == 0


def view_table():
    """A dedicated attacker (all attack templates), a reseller pooled account (half honest) and
    an honest account."""
    rows = []
    k = 0
    for account, templates in (
        ("atk", ["A1", "A2"] * 5),
        ("pool", ["A1", "H1", "A2", "H2", "H3", "A3", "H1", "H2"]),
        ("hon", ["H1", "H2"]),
    ):
        for t in templates:
            k += 1
            rows.append({"request_id": f"r{k:03d}", "account_id": account,
                         "ts": T0 + timedelta(minutes=k), "model": "m",
                         "capability": "coding" if t.startswith("A") else "general_chat",
                         "template_sig": t, "template_lsh": [f"b-{t}"],
                         "cot": t == "A3", "reasoning_reconstruction": False, "rubric": False,
                         "safe_rewrite": False, "extraction_params": False,
                         "distill_score": 0.1})
    return pa.Table.from_pylist(rows)


def test_attribution_separates_a_mixed_accounts_honest_traffic():
    view = view_table()
    con = ibis.duckdb.connect()
    ac = pa.table({"account_id": ["atk", "pool"], "campaign_id": ["C", "C"]})
    sigs = pa.table({"campaign_id": ["C", "C"], "kind": ["template", "lsh"],
                     "key": ["A1", "b-A2"]})
    bands = con.create_table("b", view.select(["request_id", "account_id", "ts",
                                               "template_lsh"]))
    out = campaigns.attribute(con.create_table("v", view), con.create_table("ac", ac),
                              con.create_table("s", sigs), bands).to_pyarrow().to_pylist()
    by_account: dict[str, set[str]] = {}
    for r in out:
        by_account.setdefault(r["account_id"], set()).add(r["request_id"])
    templates = {r["request_id"]: r["template_sig"] for r in view.to_pylist()}
    assert len(by_account["atk"]) == 10  # dedicated: everything
    # only the matches: signatures (A1, A2 by its LSH band) and a chain-of-thought request (A3)
    assert {templates[r] for r in by_account["pool"]} == {"A1", "A2", "A3"}
    assert "hon" not in by_account
    assert {r["campaign_id"] for r in out} == {"C"}


def test_pivot_to_a_newly_released_model():
    rows = []
    for h in range(48):
        ts = T0 + timedelta(hours=h)
        n_new = 6 if h >= 30 else 0  # the new model takes over 60% from hour 30
        for k in range(10):
            model = "new" if k < n_new else "old"
            rows.append({"request_id": f"r{h}-{k}", "campaign_id": "C", "ts": ts, "model": model})
    attributed = pa.Table.from_pylist(rows, schema=pa.schema(
        [("request_id", pa.string()), ("campaign_id", pa.string()),
         ("ts", pa.timestamp("ms", tz="UTC")), ("model", pa.string())]))
    first_seen = {"old": T0, "new": T0 + timedelta(hours=30)}
    out = campaigns.pivots(attributed, first_seen)
    assert [p["model"] for p in out["C"]] == ["new"]
    assert out["C"][0]["reached_at"] == T0 + timedelta(hours=36)  # end of the 6 h window
    assert out["C"][0]["share"] >= 0.3
    # a model present from the start is never a pivot
    assert campaigns.pivots(attributed, {"old": T0, "new": T0}) == {}


def test_shares_and_indicators():
    attributed = pa.table({"request_id": ["1", "2", "3", "4"], "campaign_id": ["C"] * 4,
                           "capability": ["coding", "coding", "coding", None]})
    assert campaigns.shares(attributed, "capability") == {"C": {"coding": 0.75, "unknown": 0.25}}
    rows = [("a1", "payment", "card"), ("a2", "payment", "card"), ("a3", "payment", "other"),
            ("a1", "prefix", "203.0.113.0/24"), ("a2", "prefix", "203.0.113.0/24"),
            ("a3", "prefix", "203.0.113.0/24")]
    rows += [("b1", "payment", "card"), ("b1", "ip", "198.51.100.7"),
             ("b2", "ip", "198.51.100.7")]  # another campaign's accounts
    out = campaigns.indicators(ev(rows), {"a1": "C", "a2": "C", "a3": "C", "b1": "D", "b2": "D"})
    inds, reasons = out["C"]
    assert inds == {"cidrs": ["203.0.113.0/24"], "payment_fingerprints": ["card"]}
    assert any("payment fingerprints" in r and "2 of 3 accounts" in r for r in reasons)
    # each campaign counts its own accounts only: b1's card is not shared within D
    assert out["D"][0] == {"ips": ["198.51.100.7"]}
    assert out["D"][1] == ["1 shared IP addresses (the most shared one used by 2 of 2 accounts)"]
