"""Stage 6: flagged clusters become campaigns, with per-exchange attribution and evidence.

`attribute` decides exchange by exchange (Ibis, so it runs where the exchanges live): an account
that is dedicated to its campaign contributes all its exchanges; an account that mixes honest
and attack traffic (a reseller's pooled account) contributes only the exchanges that carry the
campaign's signature, i.e. a template or near-duplicate (LSH) band that the campaign's accounts
share and the rest of the population does not.

`summarise` builds the FINDING_CAMPAIGN rows: accounts, exchange counts, first/last seen,
capability and model shares, release pivots, infrastructure indicators and reasons.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import duckdb
import ibis
import ibis.expr.types as ir
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distillguard import contract
from distillguard.fingerprints import NEW_MODEL_AFTER_S
from distillguard.linking import KIND_LABELS, dictionary_codes, distinct_pairs

#: Evidence kinds whose keys are prompt texts: what a campaign's own exchanges carry.
SIGNATURE_KINDS = ("template", "lsh")

#: Infrastructure evidence kinds reported as indicators (indicator name -> evidence kind).
INDICATOR_KINDS = {
    "cidrs": "prefix",
    "ips": "ip",
    "payment_fingerprints": "payment",
    "user_agents": "user_agent",
    "template_signatures": "template",
    "email_domains": "email_domain",
}


_names = itertools.count()


@contextmanager
def _sql(con: duckdb.DuckDBPyConnection | None, **tables: pa.Table) -> Iterator[tuple]:
    """A DuckDB connection with the Arrow `tables` registered under fresh names (yielded with
    it, in order). `con`, when given, is the scan's store connection: its memory limit and
    spill directory then bound these queries too (a fresh in-memory connection may take most
    of the machine's memory on tens of millions of evidence rows)."""
    db = con if con is not None else duckdb.connect()
    names = [f"_dg_{name}_{next(_names)}" for name in tables]
    for name, table in zip(names, tables.values(), strict=True):
        db.register(name, table)
    try:
        yield (db, *names)
    finally:
        for name in names:
            db.unregister(name)
        if con is None:
            db.close()


def owners_table(campaign_of: dict[str, str]) -> pa.Table:
    """(account_id, campaign_id) rows of an account -> campaign mapping."""
    return pa.table(
        {"account_id": list(campaign_of), "campaign_id": list(campaign_of.values())},
        schema=pa.schema([("account_id", pa.string()), ("campaign_id", pa.string())]),
    )


def campaign_signatures(ev: pa.Table, campaign_of: dict[str, str], *,
                        purity: float = 0.5) -> pa.Table:
    """(campaign_id, kind, key) for template / LSH keys shared by >= 2 accounts of a campaign,
    where the campaign's accounts are at least `purity` of all accounts using the key; sorted.

    On the evidence's integer codes (its columns may be dictionary-encoded, as the scan's
    are): the same rows as a SQL DISTINCT / GROUP BY over the strings, which took 80 s of a
    20M-exchange scan on its 94M evidence rows."""
    kinds, kind_of = dictionary_codes(ev["kind"])
    keys, key_of = dictionary_codes(ev["key"])
    accounts, account_of = dictionary_codes(ev["account_id"])
    text = np.flatnonzero(np.isin(kinds.to_numpy(zero_copy_only=False), SIGNATURE_KINDS))
    rows = np.flatnonzero(np.isin(kind_of, text))
    # (kind, key) as one code below len(SIGNATURE_KINDS) x keys: distinct (code, account) pairs
    n_keys = len(keys)
    code = np.searchsorted(text, kind_of[rows]).astype(np.int64) * n_keys + key_of[rows]
    kind_key, account = distinct_pairs(code, account_of[rows], len(accounts))
    uniq, users = np.unique(kind_key, return_counts=True)
    key_rank = np.repeat(np.arange(uniq.size), users)
    # each evidence account's campaign number (-1: none), vectorised
    names = pa.array(sorted(set(campaign_of.values())), pa.string())
    owners = owners_table(campaign_of)
    number = pc.index_in(owners["campaign_id"], value_set=names)
    of_account = pc.index_in(accounts.cast(pa.string()), value_set=owners["account_id"])
    campaign = pc.fill_null(pc.take(number, of_account), -1).to_numpy(zero_copy_only=False)
    of = campaign[account]
    mine = of >= 0
    n_names = max(len(names), 1)
    pair, count = np.unique(key_rank[mine].astype(np.int64) * n_names + of[mine],
                            return_counts=True)
    rank, which = np.divmod(pair, n_names)
    keep = (count >= 2) & (count >= purity * users[rank])
    chosen = uniq[rank[keep]]
    return pa.table({
        "campaign_id": names.take(pa.array(which[keep])),
        "kind": kinds.cast(pa.string()).take(pa.array(text[chosen // max(n_keys, 1)])),
        "key": keys.cast(pa.string()).take(pa.array(chosen % max(n_keys, 1))),
    }).sort_by([("campaign_id", "ascending"), ("kind", "ascending"), ("key", "ascending")])


def attribute(
    view: ir.Table,
    account_campaigns: ir.Table,
    signatures: ir.Table,
    bands: ir.Table,
    *,
    dedicated_share: float = 0.6,
) -> ir.Table:
    """Per-exchange attribution: (request_id, campaign_id, account_id, ts, model, capability).

    `account_campaigns` has (account_id, campaign_id); `signatures` (campaign_id, kind, key);
    `bands` each exchange's LSH band keys (`fingerprints.band_view`).
    An exchange matches when its template signature or one of its LSH bands is a signature of
    its account's campaign, or when it carries a distillation signal (chain-of-thought,
    reconstruction, rubric, safe rewrite, extraction parameters, classifier score >= 0.5), or
    targets a capability that is at least 10% of the campaign's other matching traffic.
    Accounts whose matched share is at least `dedicated_share` are dedicated and attributed
    whole; others (pooled reseller accounts) only by their matching exchanges.
    """
    # only the columns attribution reads: `v` is read twice below (the per-account share and
    # the rows kept), so DuckDB materialises it, and the view's other columns (addresses, user
    # agents, tokens...) would be copied with it
    v = view.join(account_campaigns, "account_id")
    v = v.select("request_id", "account_id", "campaign_id", "ts", "model", "capability",
                 "template_sig",
                 signal=(v.cot | v.reasoning_reconstruction | v.rubric | v.safe_rewrite
                         | v.extraction_params).fill_null(False)
                 | (v.distill_score.fill_null(0) >= 0.5))
    tmpl = signatures.filter(signatures.kind == "template").select(
        "campaign_id", t_key="key", t_hit=ibis.literal(1)
    )
    v = v.left_join(
        tmpl, (v.campaign_id == tmpl.campaign_id) & (v.template_sig == tmpl.t_key)
    ).drop("campaign_id_right", "t_key")
    lsh_keys = signatures.filter(signatures.kind == "lsh").select("campaign_id", l_key="key")
    b = bands.select("request_id", "account_id", l_key=bands.template_lsh.unnest())
    b = b.join(account_campaigns.view(), "account_id")  # a second use of the table
    band_hits = (
        b.join(lsh_keys, [b.campaign_id == lsh_keys.campaign_id, b.l_key == lsh_keys.l_key])
        .select("request_id")
        .distinct()
        .mutate(l_hit=ibis.literal(1))
    )
    v = v.left_join(band_hits, "request_id").drop("request_id_right")
    v = v.select("request_id", "account_id", "campaign_id", "ts", "model", "capability",
                 match=(v.t_hit.notnull() | v.l_hit.notnull() | v.signal).cast("float64"))
    # the capabilities a campaign's matching traffic targets (>= 10% of it) also identify its
    # unmatched exchanges: an agentic campaign's tool-use calls carry no chain-of-thought
    matched = v.filter(v.match > 0)
    caps = matched.group_by(["campaign_id", "capability"]).aggregate(c=matched.count())
    caps = caps.mutate(s=caps.c / caps.c.sum().over(group_by=caps.campaign_id))
    caps = caps.filter(caps.s >= 0.1).select("campaign_id", cap_key="capability",
                                              cap_hit=ibis.literal(1))
    v = v.left_join(
        caps, (v.campaign_id == caps.campaign_id) & (v.capability == caps.cap_key)
    ).drop("campaign_id_right", "cap_key")
    v = v.select("request_id", "account_id", "campaign_id", "ts", "model", "capability",
                 match=((v.match > 0) | v.cap_hit.notnull()).cast("float64"))
    share = v.group_by("account_id").aggregate(matched_share=v.match.mean())
    v = v.join(share, "account_id")
    keep = (v.matched_share >= dedicated_share) | (v.match > 0)
    return v.filter(keep).select("request_id", "campaign_id", "account_id", "ts", "model", "capability")


def pivots(
    attributed: pa.Table, model_first_seen: dict[str, datetime], *, min_share: float = 0.3,
    window_hours: int = 6, con: duckdb.DuckDBPyConnection | None = None,
) -> dict[str, list[dict]]:
    """Release pivots per campaign: a model that appeared during the log (first seen more than
    NEW_MODEL_AFTER_S after it starts) and reached `min_share` of the campaign's traffic in a
    `window_hours` window. Returns per campaign [{model, reached_at, share}] where `reached_at`
    is the end of the first such window (the scan that sees it flags it then or later)."""
    if attributed.num_rows == 0:
        return {}
    log_start = min(model_first_seen.values())
    new_models = {
        m for m, t in model_first_seen.items()
        if (t - log_start).total_seconds() > NEW_MODEL_AFTER_S
    }
    if not new_models:
        return {}
    with _sql(con, attributed=attributed.select(["campaign_id", "model", "ts"])) as (db, att):
        rows = db.execute(
            f"""
            WITH w AS (
              SELECT campaign_id, model,
                     time_bucket(INTERVAL '{int(window_hours)} hours', ts) AS win, count(*) AS n
              FROM {att} GROUP BY ALL),
            tot AS (SELECT campaign_id, win, sum(n) AS total FROM w GROUP BY ALL),
            hit AS (
              SELECT w.campaign_id, w.model, w.win, w.n / tot.total AS share,
                     row_number() OVER (PARTITION BY w.campaign_id, w.model ORDER BY w.win) AS k
              FROM w JOIN tot USING (campaign_id, win)
              WHERE w.n >= ? * tot.total)
            SELECT campaign_id, model, win + INTERVAL '{int(window_hours)} hours', share
            FROM hit WHERE k = 1 ORDER BY ALL
            """,
            [min_share],
        ).fetchall()
    out: dict[str, list[dict]] = {}
    for campaign_id, model, reached, share in rows:
        if model in new_models:
            out.setdefault(campaign_id, []).append(
                {"model": model, "reached_at": reached, "share": float(share)}
            )
    return out


def shares(attributed: pa.Table, column: str) -> dict[str, dict[str, float]]:
    """Share of each value of `column` within each campaign's attributed exchanges."""
    g = attributed.group_by(["campaign_id", column]).aggregate([("request_id", "count")])
    totals: dict[str, int] = {}
    for c, n in zip(g["campaign_id"].to_pylist(), g["request_id_count"].to_pylist(), strict=True):
        totals[c] = totals.get(c, 0) + n
    out: dict[str, dict[str, float]] = {}
    for c, v, n in zip(
        g["campaign_id"].to_pylist(), g[column].to_pylist(), g["request_id_count"].to_pylist(),
        strict=True,
    ):
        out.setdefault(c, {})[v if v is not None else "unknown"] = round(n / totals[c], 4)
    return {c: dict(sorted(d.items(), key=lambda kv: -kv[1])) for c, d in out.items()}


def indicators(
    ev: pa.Table, campaign_of: dict[str, str], *, top: int = 10,
    con: duckdb.DuckDBPyConnection | None = None,
) -> dict[str, tuple[dict[str, list[str]], list[str]]]:
    """Per campaign (`campaign_of`: account -> campaign): its infrastructure indicators (keys
    shared by >= 2 of its accounts, most shared first) and a reason per evidence kind with its
    counts. One query for every campaign (the evidence is tens of millions of rows); only the
    per-kind counts and the top keys leave it. `con`: the connection to run on (see `_sql`)."""
    kinds = ", ".join(f"'{k}'" for k in INDICATOR_KINDS.values())
    with _sql(con, ev=ev.select(["account_id", "kind", "key"]),
              owners=owners_table(campaign_of)) as (db, ev_t, owners_t):
        rows = db.execute(
            f"""
            WITH shared AS (
              SELECT o.campaign_id, e.kind, e.key, count(DISTINCT e.account_id) AS n
              FROM {ev_t} e JOIN {owners_t} o USING (account_id)
              GROUP BY ALL HAVING count(DISTINCT e.account_id) >= 2)
            SELECT campaign_id, kind, NULL AS key, count(*) AS n_keys, max(n) AS n
            FROM shared GROUP BY ALL
            UNION ALL
            SELECT campaign_id, kind, key, NULL, n FROM shared
            WHERE kind IN ({kinds})
            QUALIFY row_number() OVER (PARTITION BY campaign_id, kind
                                       ORDER BY n DESC, key) <= ?
            """,
            [top],
        ).fetchall()
    per_kind: dict[str, dict[str, tuple[int, int]]] = {}
    top_keys: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for cid, kind, key, n_keys, n in rows:
        if key is None:
            per_kind.setdefault(cid, {})[kind] = (n_keys, n)
        else:
            top_keys.setdefault(cid, {}).setdefault(kind, []).append((n, key))
    n_accounts = Counter(campaign_of.values())
    return {cid: _indicators_of(per_kind.get(cid, {}), top_keys.get(cid, {}), n)
            for cid, n in n_accounts.items()}


def _indicators_of(per_kind: dict[str, tuple[int, int]],
                   top_keys: dict[str, list[tuple[int, str]]],
                   n_accounts: int) -> tuple[dict[str, list[str]], list[str]]:
    out: dict[str, list[str]] = {}
    for name, kind in INDICATOR_KINDS.items():
        items = sorted(top_keys.get(kind, []), key=lambda t: (-t[0], t[1]))
        if items:
            out[name] = [key for _, key in items]
    reasons = [
        f"{n_keys} shared {KIND_LABELS.get(kind, kind)} "
        f"(the most shared one used by {most} of {n_accounts} accounts)"
        for kind, (n_keys, most) in sorted(per_kind.items(), key=lambda kv: (-kv[1][0], kv[0]))
    ]
    return out, reasons


def empty_findings() -> tuple[pa.Table, pa.Table, pa.Table]:
    return (
        contract.empty_table(contract.FINDING_ACCOUNT_SCHEMA),
        contract.empty_table(contract.FINDING_CAMPAIGN_SCHEMA),
        contract.empty_table(contract.FINDING_EXCHANGE_SCHEMA),
    )
