"""Provisioning evidence and the release reaction: the sign-up cohort test, cores tied to the
tail, control-only dense blocks, release-reaction fingerprints and their scoring."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import ibis
import numpy as np
import pyarrow as pa
import pytest

from distillguard import contract, engine, fingerprints, linking, scoring
from distillguard.linking import AccountGraph

FEATURES = [f for f, _, _, _ in scoring.BEHAVIOUR_FEATURES]


# --- the sign-up cohort p-value ------------------------------------------------------------
def test_accounts_created_in_one_batch_are_a_cohort_random_ones_are_not():
    rng = np.random.default_rng(0)
    batch = 0.40 + rng.random(40) * 0.004  # 40 accounts within 0.4% of the sign-up history
    spread = rng.random(10)  # ten accounts created independently, months apart
    assert scoring.cohort_p_value(batch) < 1e-40
    assert scoring.cohort_p_value(spread) > 0.01
    # a few unrelated users in the cluster do not hide the batch
    assert scoring.cohort_p_value(np.r_[batch, rng.random(8)]) < 1e-30
    # unknown sign-up times are ignored; too few known: no evidence
    assert scoring.cohort_p_value(np.r_[batch[:2], [np.nan] * 5]) == 1.0


def test_signup_quantiles_are_population_ranks_and_nan_when_unknown():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    fp = pa.table({"account_id": ["a", "b", "c", "d"],
                   "created_at": pa.array([t0, None, t0 + timedelta(days=2),
                                           t0 + timedelta(days=1)], contract.UTC_TS)})
    q = engine.signup_quantiles(fp)
    assert np.isnan(q[1])
    assert q[0] < q[3] < q[2] == pytest.approx(1.0)


# --- cluster flags: cohort stands in for an outlying control weight ------------------------
def population(n: int = 200, odd: int = 20, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {f: rng.normal(1.0, 0.1, n).clip(0) for f in FEATURES}
    cols["cot_share"] = np.where(np.arange(n) < odd, 0.9, rng.uniform(0, 0.1, n))
    return pa.table({"account_id": [f"a{i:03d}" for i in range(n)], **cols})


def _world(signup: np.ndarray):
    s = scoring.BehaviourScorer().score(population())
    control = np.zeros(200)
    members, internal = {}, {}
    for k in range(30):  # thirty ordinary clusters tied by everyday evidence (a shared card)
        idx = np.arange(100 + 3 * k, 103 + 3 * k)
        control[idx] = 4.0 + 0.2 * (k % 5)
        members[10 + k], internal[10 + k] = idx, 6.0
    odd = np.arange(0, 10)
    control[odd] = 4.6  # cards shared by five: no more than the everyday clusters
    members[0], internal[0] = odd, 60.0
    return s, members, internal, control, odd, signup


def test_a_batch_created_cluster_in_the_tail_is_flagged_an_independent_one_is_not():
    rng = np.random.default_rng(1)
    signup = rng.random(200)
    s, members, internal, control, odd, _ = _world(signup)
    no_block = np.zeros(200, dtype=bool)
    scorer = scoring.ClusterScorer()
    independent = {v.label: v for v in scorer.score(
        members, s, internal, control, no_block, signup_quantile=signup)}
    assert not independent[0].flagged and not independent[0].cohort  # like eval harnesses
    batch = signup.copy()
    batch[odd] = 0.5 + rng.random(odd.size) * 0.002  # created within hours of each other
    cohort = {v.label: v for v in scorer.score(
        members, s, internal, control, no_block, signup_quantile=batch)}
    assert cohort[0].flagged and cohort[0].cohort and cohort[0].cohort_p < 1e-10
    assert set(cohort[0].core) == set(odd)
    assert not any(cohort[k].flagged for k in range(10, 40))
    # a batch of ordinary accounts is still not a campaign: behaviour must be in the tail too
    members[1], internal[1] = np.arange(50, 60), 60.0
    control[50:60] = 4.6
    batch[50:60] = 0.2 + rng.random(10) * 0.002
    v = {v.label: v for v in scorer.score(members, s, internal, control, no_block,
                                          signup_quantile=batch)}
    assert v[1].cohort and not v[1].flagged


def test_core_members_must_be_tied_to_the_tail_not_to_ordinary_neighbours():
    # 0-1-2 attackers (tail) share a card; 3 shares a home address with 4 (ordinary) only
    graph = AccountGraph(
        [f"u{i}" for i in range(5)],
        np.array([0, 1, 3]), np.array([1, 2, 4]), np.array([2.0, 2.0, 2.0]),
        {"payment": np.array([2.0, 2.0, 0.0]), "ip": np.array([0.0, 0.0, 2.0]),
         "template": np.array([0.0, 0.0, 0.0])},
        {"payment": np.array([1, 1, 0]), "ip": np.array([0, 0, 1]),
         "template": np.array([0, 0, 0])},
    )
    label = np.zeros(5, dtype=np.int64)
    tail = np.array([True, True, True, True, False])
    everyone = engine._member_max_control(graph, label)
    to_tail = engine._member_max_control(graph, label, tail)
    assert everyone[3] == 2.0 and to_tail[3] == 0.0
    assert (to_tail[:3] == 2.0).all()


def test_dense_blocks_use_control_evidence_only():
    ev = pa.table({
        "account_id": ["a", "b", "a", "b"], "kind": ["template", "lsh", "payment", "ip"],
        "key": ["t", "l", "p", "i"]})
    kinds = set(engine._control_evidence(ev)["kind"].to_pylist())
    assert kinds == {"payment", "ip"}


# --- release reaction ----------------------------------------------------------------------
def _traffic():
    t0 = datetime(2026, 2, 1, tzinfo=UTC)
    rows = []

    def add(acct, ts, model):
        rows.append({"request_id": f"r{len(rows):05d}", "account_id": acct, "ts": ts,
                     "model": model})

    for h in range(0, 72, 2):  # the old model from the start, for everyone
        for a in ("fleet", "adopter", "idle"):
            add(a, t0 + timedelta(hours=h), "m-old")
    release = t0 + timedelta(hours=24)
    add("probe", release, "m-new")  # the new model's first appearance
    for h in range(2, 24, 2):  # in its first 24 h: the fleet switches, the adopter tries once
        add("fleet", release + timedelta(hours=h, minutes=5), "m-new")
    add("adopter", release + timedelta(hours=20, minutes=5), "m-new")
    return rows, t0


def test_release_reaction_share_counts_the_first_day_of_a_new_model():
    rows, t0 = _traffic()
    ex = pa.Table.from_pylist([{**r, "ip": "198.51.100.1", "user_agent": "ua",
                                "endpoint": "chat.completions", "messages": [],
                                "params": {}, "input_tokens": 10, "output_tokens": 10,
                                "status": 200} for r in rows], schema=contract.EXCHANGE_SCHEMA)
    sig = pa.Table.from_pylist([{"request_id": r["request_id"], "account_id": r["account_id"],
                                 "ts": r["ts"], "model": r["model"], "depth": 0, "cot": False,
                                 "capability": "chat", "template_sig": "t", "template_lsh": [],
                                 "distill_score": 0.1} for r in rows],
                               schema=contract.SIGNAL_SCHEMA)
    acc = pa.Table.from_pylist([{"account_id": a, "created_at": t0 - timedelta(days=30)}
                                for a in ("fleet", "adopter", "idle", "probe")],
                               schema=contract.ACCOUNT_SCHEMA)
    con = ibis.duckdb.connect()
    view = fingerprints.exchange_view(con.create_table("exchanges", ex),
                                      con.create_table("signals", sig))
    fp = fingerprints.account_fingerprints(view, con.create_table("accounts", acc)).to_pyarrow()
    row = {r["account_id"]: r for r in fp.to_pylist()}
    # fleet: 11 of its 23 exchanges in the window went to the new model
    assert row["fleet"]["release_window_n"] == 23
    assert row["fleet"]["release_reaction_share"] == pytest.approx(11 / 23)
    assert row["adopter"]["release_reaction_share"] == pytest.approx(1 / 13)
    assert row["idle"]["release_reaction_share"] == 0.0
    assert row["fleet"]["created_at"] is not None


def test_release_reaction_is_compared_among_accounts_active_in_a_release_window():
    n = 200
    rng = np.random.default_rng(0)
    cols = {f: rng.normal(1.0, 0.1, n).clip(0) for f in FEATURES}
    share = np.r_[[0.5] * 5, rng.uniform(0.0, 0.1, 95), np.zeros(100)]
    window = np.r_[[200] * 100, np.zeros(100)]  # half the accounts never saw a release window
    cols["release_reaction_share"] = share
    t = pa.table({"account_id": [f"a{i:03d}" for i in range(n)], **cols,
                  "release_window_n": window, "n_exchanges": np.full(n, 500.0)})
    s = scoring.BehaviourScorer().score(t)
    c = s.contributions["release_reaction_share"]
    assert c[:5].min() > 2.0  # the fleet that switched within hours
    assert (c[100:] == 0).all()  # no window traffic: no evidence either way
    assert "release reaction" in " ".join(s.reasons(0, top=len(FEATURES)))


def test_account_age_is_compared_on_a_log_scale():
    n = 200
    rng = np.random.default_rng(0)
    cols = {f: rng.normal(1.0, 0.1, n).clip(0) for f in FEATURES}
    cols["age_at_first_use_h"] = np.r_[[48.0] * 5, rng.uniform(0, 8760, n - 5)]
    s = scoring.BehaviourScorer().score(pa.table({"account_id": [str(i) for i in range(n)],
                                                  **cols}))
    # two-day-old accounts in a population spread over a year: several robust z away
    assert s.contributions["age_at_first_use_h"][:5].min() >= 0.5 * 2.0
    assert s.medians["age_at_first_use_h"] > 1000  # reasons quote raw hours


# --- joining by payment instrument ---------------------------------------------------------
def test_accounts_paying_with_a_campaign_card_join_it_with_a_reason():
    names = [f"u{i}" for i in range(8)]
    ev = pa.table({
        "account_id": ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"],
        "kind": ["payment"] * 8,
        # card A: three core members and one quiet fleet account; card B: one core member and
        # two others (the card mostly pays for someone else); card C: nobody flagged
        "key": ["A", "A", "A", "A", "B", "B", "B", "C"]})
    label = np.array([0, 0, 0, 5, 0, -1, -1, 3], dtype=np.int64)
    v = scoring.ClusterVerdict(0, np.array([0, 1, 2, 4]), np.array([0, 1, 2, 4]), 0.9, 5.0,
                               5.0, 0.95, True)
    other = scoring.ClusterVerdict(3, np.array([7]), np.array([7]), 0.1, 1.0, 1.0, 0.2, False)
    joined = engine._join_by_payment([v, other], ev, names, label)
    assert set(joined) == {3}
    assert "same payment instrument as 3 flagged accounts" in joined[3]
    assert set(v.core) == {0, 1, 2, 3, 4} and label[3] == 0
    assert label[5] == -1 and label[6] == -1  # card B: 1 of 3 is not "mostly the campaign's"


def test_a_dense_block_under_half_the_core_flags_only_its_block_members():
    s = scoring.BehaviourScorer().score(population())
    control = np.zeros(200)
    members, internal = {}, {}
    for k in range(30):  # everyday clusters
        idx = np.arange(100 + 3 * k, 103 + 3 * k)
        control[idx] = 4.0 + 0.2 * (k % 5)
        members[10 + k], internal[10 + k] = idx, 6.0
    # a card triad of the tail inside a big cluster of ordinary neighbours, plus one tail
    # account tied to it that is in no dense block
    triad, loner = np.arange(0, 3), np.array([3])
    cluster = np.r_[triad, loner, np.arange(60, 90)]
    members[0], internal[0] = cluster, 60.0
    control[cluster] = 4.0
    in_block = np.zeros(200, dtype=bool)
    in_block[triad] = True
    v = {v.label: v for v in scoring.ClusterScorer().score(
        members, s, internal, control, in_block, member_max_control=np.where(
            np.isin(np.arange(200), np.r_[triad, loner]), 4.0, 0.0))}[0]
    assert v.flagged and set(v.core) == set(triad)
    # without the block nothing ties it beyond everyday evidence
    none = {v.label: v for v in scoring.ClusterScorer().score(
        members, s, internal, control, np.zeros(200, dtype=bool), member_max_control=np.where(
            np.isin(np.arange(200), np.r_[triad, loner]), 4.0, 0.0))}[0]
    assert not none.flagged


def _merged_by_graph(vs, graph: AccountGraph, label: np.ndarray):
    ties = engine._graph_ties(graph, engine._core_labels(vs, label.size))
    return engine._merge_flagged(vs, label, ties, 0.5)


def test_a_small_flagged_cluster_tied_to_two_campaigns_does_not_merge_them():
    # campaign A: vertices 0-9, campaign B: 10-19, a triad 20-22 tied strongly to both
    label = np.r_[[0] * 10, [1] * 10, [2] * 3].astype(np.int64)
    src, dst, w = [], [], []
    for t in (20, 21, 22):
        for a, wt in ((0, 10.0), (10, 8.0)):  # the triad is tied a little more to A
            src.append(a)
            dst.append(t)
            w.append(wt)
    src.append(1)
    dst.append(11)
    w.append(1.0)  # A and B barely tied directly
    graph = AccountGraph([f"u{i:02d}" for i in range(23)], np.array(src), np.array(dst),
                         np.array(w), {"ip": np.array(w)}, {})

    def verdict(lab, idx):
        return scoring.ClusterVerdict(lab, idx, idx, 0.9, 5.0, 5.0, 0.95, True)

    vs = [verdict(0, np.arange(10)), verdict(1, np.arange(10, 20)),
          verdict(2, np.arange(20, 23))]
    merged = _merged_by_graph(vs, graph, label)
    sizes = sorted(len(v.core) for v in merged if v.flagged)
    assert sizes == [10, 13]  # the triad joined A only
    assert len(set(label[:10]) | set(label[20:])) == 1 and label[10] != label[0]


def _two_flagged_clusters_tied_by(kind: str):
    """Two flagged clusters of five whose accounts are tied pairwise across by `kind` only."""
    label = np.r_[[0] * 5, [1] * 5].astype(np.int64)
    src, dst = np.arange(5), np.arange(5, 10)
    w = np.full(5, 6.0)
    graph = AccountGraph([f"u{i}" for i in range(10)], src, dst, w, {kind: w}, {})
    vs = [scoring.ClusterVerdict(lab, idx, idx, 0.9, 5.0, 5.0, 0.95, True)
          for lab, idx in ((0, np.arange(5)), (1, np.arange(5, 10)))]
    return _merged_by_graph(vs, graph, label)


def test_flagged_clusters_tied_by_control_evidence_merge():
    merged = _two_flagged_clusters_tied_by("payment")
    assert [len(v.core) for v in merged if v.flagged] == [10]


def test_flagged_clusters_tied_only_by_shared_templates_stay_two_campaigns():
    # two operators harvesting one skill from the same public prompt set share templates,
    # not an owner
    for kind in ("template", "lsh", "system", "sync"):
        merged = _two_flagged_clusters_tied_by(kind)
        assert sorted(len(v.core) for v in merged if v.flagged) == [5, 5], kind


def _two_card_groups(n_tied: int):
    """Two flagged card groups of ten; `n_tied` accounts of the first have one surviving
    address-pool edge (1.6, just above the graph's cut) into the second."""
    label = np.r_[[0] * 10, [1] * 10].astype(np.int64)
    src, dst = np.arange(n_tied), np.arange(10, 10 + n_tied)
    w = np.full(n_tied, 1.6)
    graph = AccountGraph([f"u{i:02d}" for i in range(20)], src, dst, w, {"ip": w}, {})
    vs = [scoring.ClusterVerdict(lab, idx, idx, 0.9, 30.0, 30.0, 0.95, True)
          for lab, idx in ((0, np.arange(10)), (1, np.arange(10, 20)))]
    return _merged_by_graph(vs, graph, label)


def test_card_groups_sharing_an_address_pool_merge_when_most_accounts_are_tied():
    # one weak edge per account is all the pruned graph keeps of a shared address pool
    assert [len(v.core) for v in _two_card_groups(8) if v.flagged] == [20]
    assert sorted(len(v.core) for v in _two_card_groups(3) if v.flagged) == [10, 10]


def _fleet_sharing_addresses(n_tied: int):
    """A flagged campaign core of ten (u00-u09) and a flagged group of three (u10-u12), `n_tied`
    of the three sharing one address each with a different campaign account: every pair far
    below a graph edge."""
    names = [f"u{i:02d}" for i in range(13)]
    label = np.r_[[0] * 10, [1] * 3].astype(np.int64)
    ev = pa.table({"account_id": [a for k in range(n_tied) for a in (f"u{10 + k}", f"u0{k}")],
                   "kind": ["ip"] * (2 * n_tied),
                   "key": [f"10.0.0.{k}" for k in range(n_tied) for _ in range(2)]})
    vs = [scoring.ClusterVerdict(lab, idx, idx, 0.9, 5.0, 5.0, 0.95, True)
          for lab, idx in ((0, np.arange(10)), (1, np.arange(10, 13)))]
    ties = linking.owned_key_ties(ev, names, engine._core_labels(vs, 13), linking.Linker())
    return engine._merge_flagged(vs, label, ties, 0.5, note=engine._owned_keys_note), label


def test_groups_tied_only_by_owned_addresses_spread_thin_join_with_a_reason():
    merged, label = _fleet_sharing_addresses(2)
    (v,) = [v for v in merged if v.flagged]
    assert len(v.core) == 13 and set(label) == {0}
    assert len(v.notes) == 1
    assert v.notes[0].startswith("joined 1 group of flagged accounts (3 accounts): 2 of them share")
    # one of three tied is not most of the group
    merged, label = _fleet_sharing_addresses(1)
    assert sorted(len(v.core) for v in merged if v.flagged) == [3, 10]
    assert not any(v.notes for v in merged)
