"""Stage 3: evidence, rarity weights, bounded pair generation and synchrony."""

from __future__ import annotations

import ibis
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from distillguard import fingerprints, linking
from test_engine_crafted import crafted


def ev_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table(
        {
            "account_id": [r[0] for r in rows],
            "kind": [r[1] for r in rows],
            "key": [r[2] for r in rows],
        },
        schema=linking.EVIDENCE_SCHEMA,
    )


def edge(graph: linking.AccountGraph, a: str, b: str) -> int | None:
    i, j = sorted((graph.accounts.index(a), graph.accounts.index(b)))
    hits = np.flatnonzero((graph.src == i) & (graph.dst == j))
    return int(hits[0]) if hits.size else None


def test_rare_shared_key_outweighs_popular_one():
    rows = [("p1", "payment", "card-1"), ("p2", "payment", "card-1")]
    rows += [(f"n{i}", "ip", "nat") for i in range(300)]  # a NAT shared by 300 users
    g = linking.Linker(min_edge_weight=0.0).link(ev_table(rows))
    rare = g.weight[edge(g, "p1", "p2")]
    popular = g.weight[edge(g, "n1", "n2")] if edge(g, "n1", "n2") is not None else 0.0
    assert rare > 10 * popular


def test_groups_above_max_group_are_not_evidence_and_big_groups_are_sampled():
    rows = [(f"a{i:04d}", "ip", "everyone") for i in range(500)]
    assert linking.Linker(max_group=400, min_edge_weight=0).link(ev_table(rows)).n_edges == 0
    g = linking.Linker(max_group=1000, sample_above=16, min_edge_weight=0).link(ev_table(rows))
    assert 0 < g.n_edges <= 500 * 16  # sampled partners, not the 124,750 pairs
    assert np.all(g.src < g.dst)


def test_edges_keep_their_evidence_counts():
    rows = [("x", "ip", f"10.0.0.{k}") for k in range(3)] + [
        ("y", "ip", f"10.0.0.{k}") for k in range(3)
    ] + [("x", "payment", "card"), ("y", "payment", "card"), ("z", "payment", "other")]
    g = linking.Linker().link(ev_table(rows))
    e = edge(g, "x", "y")
    assert g.shared["ip"][e] == 3 and g.shared["payment"][e] == 1
    reasons = g.edge_reasons(e)
    assert {"shares 1 payment fingerprints", "shares 3 IP addresses"} <= set(reasons)
    assert edge(g, "x", "z") is None


def test_evidence_kinds_from_crafted_traffic():
    ex, sig, acc, _ = crafted()
    con = ibis.duckdb.connect()
    s = con.create_table("s", sig)
    view = fingerprints.exchange_view(con.create_table("e", ex), s)
    ev = linking.evidence(view, con.create_table("a", acc),
                          bands=fingerprints.band_view(s)).to_pyarrow()
    kinds = set(ev["kind"].to_pylist())
    assert {"ip", "prefix", "user_agent", "template", "lsh", "system", "payment",
            "email_domain", "signup_hour"} <= kinds
    atk = ev.filter(pa.compute.equal(ev["account_id"], "atk0001")).to_pylist()
    assert {r["key"] for r in atk if r["kind"] == "payment"} == {"pay-a1"}
    g = linking.Linker().link(ev.cast(linking.EVIDENCE_SCHEMA))
    pairs = {(g.accounts[s][:3], g.accounts[d][:3]) for s, d in zip(g.src, g.dst, strict=True)}
    assert ("atk", "atk") in pairs
    assert not any("hon" in p for p in pairs)  # individuals share nothing rare


def test_synchrony_links_lockstep_accounts_only():
    rng = np.random.default_rng(0)
    rows = []
    lockstep = sorted(rng.choice(2000, size=40, replace=False).tolist())
    for a in ("bot1", "bot2", "bot3"):
        rows += [(a, f"{b}|10.1.1") for b in lockstep]
    for k in range(20):
        rows += [(f"human{k}", f"{b}|10.1.1") for b in rng.choice(2000, size=40, replace=False)]
    cells = pa.table({"account_id": [r[0] for r in rows], "cell": [r[1] for r in rows]})
    sync = linking.synchrony_evidence(cells, min_cells=8)
    grouped = {}
    for r in sync.to_pylist():
        grouped.setdefault(r["key"], set()).add(r["account_id"])
    assert list(grouped.values()) == [{"bot1", "bot2", "bot3"}]


@pytest.mark.parametrize("weights", [{"ip": 1.0}, {"payment": 3.0, "ip": 1.0}])
def test_key_weight_decreases_with_sharing(weights):
    linker = linking.Linker(kind_weights=weights)
    w = linker.key_weights(np.array([2.0, 10.0, 1000.0]), np.array(["ip", "ip", "ip"]))
    assert w[0] > w[1] > w[2] > 0


def test_a_card_funding_many_accounts_ties_them_as_firmly_as_a_card_of_three():
    linker = linking.Linker()
    kinds = np.array(["payment"] * 4)
    w = linker.key_weights(np.array([2.0, 3.0, 4.0, 25.0]), kinds)
    assert w[0] > w[1] == w[2] == w[3]  # rarity up to three sharers, then no decay
    # an operator's card of 25 accounts makes a clique of edges on its own; a NAT does not
    rows = [(f"op{i:02d}", "payment", "card") for i in range(25)]
    rows += [(f"nat{i:02d}", "ip", "10.0.0.1") for i in range(25)]
    g = linker.link(ev_table(rows))
    ops = {g.accounts[i] for i in np.concatenate([g.src, g.dst])}
    assert g.n_edges == 25 * 24 // 2 and all(a.startswith("op") for a in ops)


def test_shared_evidence_with_key_counts_gives_the_graph_of_all_evidence():
    ex, sig, acc, _ = crafted()
    con = ibis.duckdb.connect()
    s = con.create_table("s", sig)
    view = fingerprints.exchange_view(con.create_table("e", ex), s)
    full = linking.evidence(view, con.create_table("a", acc), bands=fingerprints.band_view(s))
    every = full.to_pyarrow().cast(linking.EVIDENCE_SCHEMA)
    shared = linking.shared_evidence(full).to_pyarrow().cast(linking.EVIDENCE_SCHEMA)
    assert shared.num_rows < every.num_rows  # keys used by one account stay behind
    names = sorted(set(every["account_id"].to_pylist()))
    a = linking.Linker().link(every, names)
    b = linking.Linker().link(shared, names, linking.key_counts(full).to_pyarrow())
    assert a.n_edges > 0
    assert np.array_equal(a.src, b.src) and np.array_equal(a.dst, b.dst)
    assert np.allclose(a.weight, b.weight)
    assert all(np.array_equal(a.shared[k], b.shared[k]) for k in a.shared)


def test_big_keys_are_sampled_as_rings_with_the_old_pair_probability():
    sizes = np.array([65, 300, 2000])
    offsets = np.cumsum(sizes) - sizes
    members = np.concatenate([o + np.arange(m) for o, m in zip(offsets, sizes, strict=True)])
    tokens = np.random.default_rng(0).integers(0, 2**63, size=members.size, dtype=np.uint64)
    parts = list(linking._sampled_pairs(members, sizes, np.ones(3), 64, tokens, chunk_rows=500))
    assert len(parts) > 1  # streamed in chunks
    lo = np.concatenate([p[0] for p in parts])
    hi = np.concatenate([p[1] for p in parts])
    assert np.all(lo < hi)
    for o, m in zip(offsets, sizes, strict=True):
        mine = (lo >= o) & (lo < o + m)
        assert np.all(hi[mine] < o + m)  # pairs stay inside their key
        pairs = lo[mine] * members.size + hi[mine]
        assert np.unique(pairs).size == pairs.size  # no pair twice
        # each member linked to 2h others, h matching 64 independent draws per member
        h = round((m - 1) / 2 * (1 - (1 - 1 / (m - 1)) ** 128))
        degree = np.bincount(np.concatenate([lo[mine], hi[mine]]) - o, minlength=m)
        assert np.all(degree == 2 * h)


def test_keys_with_the_same_members_are_sampled_once_with_their_summed_weight():
    members = np.concatenate([np.arange(100), np.arange(100)])  # e.g. two bands of one prompt
    tokens = np.random.default_rng(1).integers(0, 2**63, size=100, dtype=np.uint64)
    (lo, hi, value), = linking._sampled_pairs(members, np.array([100, 100]),
                                              np.array([0.25, 0.5]), 64, tokens)
    assert np.allclose(value, 0.75 + 2j)  # weight 0.25 + 0.5, two shared keys
    assert np.unique(lo * 100 + hi).size == lo.size


def test_blocks_of_source_accounts_give_the_graph_of_one_block(monkeypatch):
    rng = np.random.default_rng(3)
    rows = []
    for k in range(400):  # keys of 2-90 accounts: sparse products and sampled rings both
        size = int(rng.integers(2, 90))
        for a in rng.choice(300, size=size, replace=False):
            rows.append((f"a{a:03d}", "template" if k % 2 else "ip", f"k{k}"))
    ev = ev_table(rows)
    blocks = []
    upper_rows = linking._KindRows.upper_rows
    monkeypatch.setattr(linking._KindRows, "upper_rows",
                        lambda self, lo, hi: blocks.append((lo, hi)) or upper_rows(self, lo, hi))
    one = linking.Linker(min_edge_weight=0.2, product_batch=10**9).link(ev)
    assert len(set(blocks)) == 1
    blocks.clear()
    batched = linking.Linker(min_edge_weight=0.2, product_batch=50).link(ev)
    assert len(set(blocks)) > 200  # a few source accounts a block
    assert one.n_edges > 1000
    assert np.array_equal(one.src, batched.src) and np.array_equal(one.dst, batched.dst)
    assert np.allclose(one.weight, batched.weight)
    for kind in one.shared:
        assert np.array_equal(one.shared[kind], batched.shared[kind])


def test_key_batches_cover_every_costly_key_once():
    cost = np.array([0, 0, 5, 5, 0, 20, 1, 1, 0])
    assert linking._batches(cost, 10) == [(2, 5), (5, 6), (6, 8)]
    assert linking._batches(np.zeros(3), 4) == []


def test_values_at_the_edges_are_those_of_the_whole_kind_matrix():
    """The second pass (each kind's weight and count at the strong edges alone) reads the same
    values as the first pass's matrix of every pair, sampled big keys included."""
    rng = np.random.default_rng(11)
    rows = []
    for k in range(300):  # keys of 2-150 accounts: small keys and sampled rings
        for a in rng.choice(400, size=int(rng.integers(2, 150)), replace=False):
            rows.append((f"a{a:03d}", "template", f"k{k}"))
    linker = linking.Linker(sample_above=40, product_batch=500)
    names, acct, key_idx, kinds = linking.encode_evidence(ev_table(rows))
    pair = linking.sorted_unique(key_idx * len(names) + acct)
    key_idx, acct = pair // len(names), pair % len(names)
    df = np.bincount(key_idx)
    kw = linker.key_weights(df.astype(float), kinds)
    tokens = np.random.default_rng(0).integers(0, 2**63, size=len(names), dtype=np.uint64)
    args = (linking._EncodedKeys(acct, key_idx, df, kw, len(names), tokens), df >= 2)
    whole = linker._kind_rows(*args).upper_rows(0, len(names)).tocoo()
    assert whole.nnz > 20_000 and (df > 40).sum() > 50
    at = linker._kind_pairs(*args, at=(whole.row.astype(np.int64), whole.col.astype(np.int64)))
    assert np.allclose(at.real, whole.data, rtol=1e-12, atol=0)
    # counts: whole numbers, one at least wherever a pair shares anything; small keys exact
    assert np.array_equal(at.imag, np.rint(at.imag)) and (at.imag >= 1).all()
    small = (df >= 2) & (df <= 40)
    members = [set(acct[key_idx == k]) for k in np.flatnonzero(small)]
    i, j = int(whole.row[0]), int(whole.col[0])
    assert at.imag[0] >= sum(1 for m in members if i in m and j in m)


def test_the_graph_matches_a_pair_by_pair_reference():
    """Rarity weights, hub discount, per-kind cap and the edge cut, recomputed pair by pair."""
    rng = np.random.default_rng(5)
    rows = []
    for kind in ("ip", "template", "payment", "lsh"):
        for k in range(60):
            for a in rng.choice(50, size=int(rng.integers(2, 8)), replace=False):
                rows.append((f"a{a:02d}", kind, f"{kind}{k}"))
    ev = ev_table(rows)
    linker = linking.Linker(min_edge_weight=1.0)
    g = linker.link(ev)
    names = g.accounts
    members: dict[tuple[str, str], set[int]] = {}
    for a, kind, key in rows:
        members.setdefault((kind, key), set()).add(names.index(a))
    per_kind_keys = {k: np.zeros(len(names)) for k in linking.KIND_WEIGHTS}
    for (kind, _key), m in members.items():
        for i in m:
            per_kind_keys[kind][i] += 1
    expected: dict[tuple[int, int], dict[str, float]] = {}
    n_shared: dict[tuple[int, int, str], int] = {}
    for (kind, _key), m in members.items():
        w = linker.key_weights(np.array([float(len(m))]), np.array([kind]))[0]
        for i in m:
            for j in m:
                if i < j:
                    e = expected.setdefault((i, j), {})
                    e[kind] = e.get(kind, 0.0) + w
                    n_shared[i, j, kind] = n_shared.get((i, j, kind), 0) + 1
    kept = {}
    for (i, j), by in expected.items():
        capped = {}
        for kind, w in by.items():
            if kind in linking.USAGE_KINDS:
                hub = linker._hub_factor(per_kind_keys[kind])
                w /= np.sqrt(hub[i] * hub[j])
            capped[kind] = min(w, linker.kind_cap)
        if sum(capped.values()) >= linker.min_edge_weight:
            kept[(i, j)] = capped
    got = {(int(s), int(d)): e for e, (s, d) in enumerate(zip(g.src, g.dst, strict=True))}
    assert set(got) == set(kept) and len(kept) > 30
    for pair, e in got.items():
        for kind in linking.KIND_WEIGHTS:
            assert g.by_kind[kind][e] == pytest.approx(kept[pair].get(kind, 0.0), rel=1e-12)
            assert g.shared[kind][e] == n_shared.get((*pair, kind), 0)
        assert g.weight[e] == pytest.approx(sum(kept[pair].values()), rel=1e-12)


# --- ties between groups through keys they own ----------------------------------------------
def test_owned_key_ties_count_control_keys_the_groups_own():
    names = [f"a{i}" for i in range(10)]
    group = np.array([0, 0, 0, 0, 0, 1, 1, 1, -1, -1])
    rows = [("ip", "X", ["a0", "a5"]),               # owned by the groups: a tie
            ("ip", "Y", ["a1", "a6", "a8", "a9"]),   # half its users grouped: still owned
            ("ip", "Z", ["a7", "a8", "a9"]),         # one grouped user of three: not owned
            ("template", "T", ["a3", "a7"]),         # content is not control
            ("payment", "P", ["a4", "a7"]),
            ("ip", "W", ["a0", "a1"])]               # inside one group
    ev = pa.table({
        "account_id": [a for _, _, users in rows for a in users],
        "kind": [k for k, _, users in rows for _ in users],
        "key": [key for _, key, users in rows for _ in users]})
    ties = linking.owned_key_ties(ev, names, group, linking.Linker())
    w = linking.Linker().key_weights(np.array([2.0, 4.0, 2.0]), np.array(["ip", "ip", "payment"]))
    assert ties == pytest.approx({(0, 1, 0): w[0], (1, 0, 5): w[0], (0, 1, 1): w[1],
                                  (1, 0, 6): w[1], (0, 1, 4): w[2], (1, 0, 7): w[2]})
    # dictionary-encoded evidence, as the engine holds it, gives the same ties
    enc = pa.table({c: pc.dictionary_encode(ev[c]) for c in ev.column_names})
    assert linking.owned_key_ties(enc, names, group, linking.Linker()) == ties
