"""Stage 3: the account graph, whose edges are evidence of common control.

Two halves:

* `evidence(view, accounts)` (Ibis, runs on DuckDB or Spark) lists every (account, kind, key)
  an account used: addresses, /24 or /48 prefixes, user agents, template signatures and their
  LSH bands, system prompts, payment fingerprints, e-mail domains, sign-up address and sign-up
  hour. Each row keeps when the account first used the key, so a replay can ask "what was known
  at time T".
* `link(evidence_table)` (in-process, NumPy) turns shared keys into weighted account pairs.
  A key shared by `df` accounts contributes `KIND_WEIGHTS[kind] / log2(1 + df)` to every pair
  that shares it (Adamic-Adar style: a university NAT or a popular agent's system prompt is
  shared by hundreds and counts little; a payment card shared by three accounts counts a lot).
  Keys shared by more than `max_group` accounts are not evidence at all and are skipped; keys
  between `sample_above` and `max_group` link each member to `sample_above` sampled others
  instead of to everyone, so no group costs O(n^2).
* `synchrony_evidence(view)` (in-process, rensa MinHash LSH) adds SynchroTrap-style
  co-activity keys: accounts whose sets of active (time bucket, /24) cells are near-identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import ibis
import ibis.expr.types as ir
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Evidence kinds and how much one rare shared key of that kind says about common control.
KIND_WEIGHTS: dict[str, float] = {
    "payment": 3.0,
    "ip": 1.0,
    "prefix": 0.5,
    "signup_ip": 1.0,
    "signup_hour": 0.5,
    "email_domain": 0.5,
    "user_agent": 0.3,
    "template": 1.0,
    "lsh": 0.08,  # per LSH band key: the bands of one shared prompt add up to about 0.6
    "system": 0.5,
    "sync": 1.5,
}

#: Kinds an account accumulates many keys of by using the API (as opposed to sign-up
#: attributes with one value per account); their shared keys are discounted for hub accounts.
USAGE_KINDS = frozenset({"ip", "prefix", "user_agent", "template", "lsh", "system"})

#: Kinds that show common content or timing rather than common control (a benchmark's prompts,
#: a popular agent's system prompt, evaluation harnesses all hitting a model on its release
#: day): they tie clusters but cannot alone make one a campaign.
CONTENT_KINDS = frozenset({"template", "lsh", "system", "sync"})

#: Human names of evidence kinds, for reasons.
KIND_LABELS: dict[str, str] = {
    "payment": "payment fingerprints",
    "ip": "IP addresses",
    "prefix": "address prefixes (/24, /48)",
    "signup_ip": "sign-up addresses",
    "signup_hour": "sign-up hours (burst)",
    "email_domain": "e-mail domains",
    "user_agent": "user agents",
    "template": "prompt template signatures",
    "lsh": "near-duplicate prompt templates (LSH)",
    "system": "system prompts",
    "sync": "synchronised activity windows",
}

EVIDENCE_SCHEMA = pa.schema(
    [
        ("account_id", pa.string()),
        ("kind", pa.string()),
        ("key", pa.string()),
        ("first_ts", pa.timestamp("ms", tz="UTC")),
        ("n", pa.int64()),
    ]
)


def evidence(view: ir.Table, accounts: ir.Table, *, lsh: bool = True) -> ir.Table:
    """Every (account, kind, key) used, with first use time and count: see EVIDENCE_SCHEMA."""

    def per_exchange(kind: str, key: ir.Value) -> ir.Table:
        t = view.select("account_id", "ts", key=key.cast("string"))
        t = t.filter(t.key.notnull() & (t.key != ""))
        return t.group_by(["account_id", "key"]).aggregate(first_ts=t.ts.min(), n=t.count()).mutate(
            kind=ibis.literal(kind)
        )

    parts = [
        per_exchange("ip", view.ip),
        per_exchange("prefix", view.prefix),
        per_exchange("user_agent", view.user_agent),
        per_exchange("template", view.template_sig),
        per_exchange("system", view.system_hash),
    ]
    if lsh:
        parts.append(per_exchange("lsh", view.template_lsh.unnest()))
    first_use = view.group_by("account_id").aggregate(first_ts=view.ts.min())
    acc = accounts.join(first_use, "account_id")
    for kind, key in (
        ("payment", acc.payment_fingerprint),
        ("email_domain", acc.email_domain),
        ("signup_ip", acc.signup_ip),
        ("signup_hour", acc.created_at.truncate("h").cast("string")),
    ):
        t = acc.select("account_id", "first_ts", key=key.cast("string"))
        parts.append(
            t.filter(t.key.notnull() & (t.key != "")).mutate(
                kind=ibis.literal(kind), n=ibis.literal(1, "int64")
            )
        )
    cols = ["account_id", "kind", "key", "first_ts", "n"]
    return ibis.union(*[p.select(*cols) for p in parts], distinct=False)


def activity_cells(view: ir.Table, *, bucket_minutes: int = 10) -> ir.Table:
    """Distinct (account, time bucket x /24 prefix) cells an account was active in (Ibis)."""
    bucket = (view.ts.epoch_seconds() // (bucket_minutes * 60)).cast("int64").cast("string")
    cells = view.select("account_id", cell=bucket + "|" + view.prefix.fill_null(""))
    return cells.distinct()


def synchrony_evidence(
    cells: pa.Table,
    *,
    min_cells: int = 8,
    num_perm: int = 64,
    bands: int = 16,
    threshold: float = 0.5,
) -> pa.Table:
    """SynchroTrap / CopyCatch-style co-activity: accounts acting in the same (time bucket,
    /24 prefix) cells far more than chance.

    Each account's set of active cells (`activity_cells`) is MinHashed (rensa) and bucketed by
    LSH, so candidate pairs come from bucket collisions rather than an all-pairs comparison;
    each candidate pair is then confirmed by its exact Jaccard similarity (>= `threshold`).
    Confirmed pairs are joined into groups (union-find) and emitted as `sync` evidence keys
    (EVIDENCE_SCHEMA; first_ts is left null: the group only exists once both are active).
    """
    from rensa import RMinHash, RMinHashLSH

    grouped = cells.group_by("account_id").aggregate([("cell", "list")])
    per_account = {
        a: set(c)
        for a, c in zip(grouped["account_id"].to_pylist(), grouped["cell_list"].to_pylist(),
                        strict=True)
        if len(c) >= min_cells
    }
    names = sorted(per_account)
    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
    hashes = []
    for i, a in enumerate(names):
        m = RMinHash(num_perm=num_perm, seed=42)
        m.update(sorted(per_account[a]))
        hashes.append(m)
        lsh.insert(i, m)
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(names):
        for j in lsh.query(hashes[i]):
            if j <= i:
                continue
            sa, sb = per_account[a], per_account[names[j]]
            if len(sa & sb) / len(sa | sb) >= threshold:
                parent[find(j)] = find(i)
    groups: dict[int, list[str]] = {}
    for i, a in enumerate(names):
        groups.setdefault(find(i), []).append(a)
    rows = [(a, f"sync-{m[0]}") for m in groups.values() if len(m) > 1 for a in m]
    return pa.table(
        {
            "account_id": pa.array([r[0] for r in rows], pa.string()),
            "kind": pa.array(["sync"] * len(rows), pa.string()),
            "key": pa.array([r[1] for r in rows], pa.string()),
            "first_ts": pa.nulls(len(rows), pa.timestamp("ms", tz="UTC")),
            "n": pa.array([len(per_account[r[0]]) for r in rows], pa.int64()),
        },
        schema=EVIDENCE_SCHEMA,
    )


@dataclass
class AccountGraph:
    """Weighted account pairs with the evidence behind each edge.

    `accounts` is the vertex list (sorted ids); `src < dst` index into it. `weight` is the summed
    evidence weight; `by_kind[kind]` is each edge's weight from that kind and `shared[kind]` the
    number of shared keys of that kind (the counts reports quote).
    """

    accounts: list[str]
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    by_kind: dict[str, np.ndarray] = field(default_factory=dict)
    shared: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.src.size)

    def control_weight(self) -> np.ndarray:
        """Each edge's weight from control kinds only (everything but CONTENT_KINDS)."""
        parts = [v for k, v in self.by_kind.items() if k not in CONTENT_KINDS]
        return np.sum(parts, axis=0) if parts else np.zeros(self.n_edges)

    def edge_reasons(self, i: int) -> list[str]:
        """Human-readable evidence of edge `i`."""
        return [
            f"shares {int(self.shared[k][i])} {KIND_LABELS[k]}"
            for k in sorted(self.shared, key=lambda k: -self.by_kind[k][i])
            if self.shared[k][i] > 0
        ]


@dataclass
class Linker:
    """Turns an evidence table into an `AccountGraph` (see module docstring for the weights)."""

    max_group: int = 2000
    sample_above: int = 64
    min_edge_weight: float = 1.5
    kind_cap: float = 3.0
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(KIND_WEIGHTS))
    seed: int = 0

    def key_weights(self, df: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        """Rarity weight of each key: kind weight / log2(1 + accounts sharing it)."""
        base = np.array([self.kind_weights.get(k, 0.0) for k in kinds])
        return base / np.log2(1.0 + df)

    @staticmethod
    def _hub_factor(acct: np.ndarray, of_kind: np.ndarray, n: int) -> np.ndarray:
        """How many times more keys of one kind an account has than the population's 90th
        percentile (at least 1). An account that sends hundreds of different prompts or
        rotates through hundreds of addresses collides with everyone by chance; its shared
        keys are discounted by the square root of this factor on each side of a pair."""
        counts = np.bincount(acct[of_kind], minlength=n).astype(float)
        active = counts[counts > 0]
        typical = max(1.0, float(np.quantile(active, 0.9))) if active.size else 1.0
        return np.maximum(1.0, counts / typical)

    def link(self, ev: pa.Table, accounts: Iterable[str] | None = None) -> AccountGraph:
        """Build the graph; `accounts` fixes the vertex list (default: accounts in `ev`)."""
        names, acct, key_idx, uniq_kind = encode_evidence(ev, accounts)
        # distinct (account, key) pairs only
        n_keys = uniq_kind.size
        pair = np.unique(key_idx.astype(np.int64) * len(names) + acct)
        key_idx, acct = pair // len(names), pair % len(names)
        df = np.bincount(key_idx, minlength=n_keys)
        kw = self.key_weights(df.astype(float), uniq_kind)
        usable = (df >= 2) & (df <= self.max_group) & (kw > 0)
        rng = np.random.default_rng(self.seed)
        order = np.argsort(key_idx, kind="stable")
        key_idx, acct = key_idx[order], acct[order]
        starts = np.searchsorted(key_idx, np.arange(n_keys))
        ends = np.searchsorted(key_idx, np.arange(n_keys), side="right")
        src_parts, dst_parts, key_parts = [], [], []
        # small groups: all pairs, vectorised over every group of the same size
        for m in np.unique(df[usable & (df <= self.sample_above)]):
            keys = np.flatnonzero(usable & (df == m))
            grid = acct[starts[keys][:, None] + np.arange(m)[None, :]]
            iu, ju = np.triu_indices(m, 1)
            a, b = grid[:, iu].ravel(), grid[:, ju].ravel()
            src_parts.append(np.minimum(a, b))
            dst_parts.append(np.maximum(a, b))
            key_parts.append(np.repeat(keys, iu.size))
        # big groups: sampled partners
        for k in np.flatnonzero(usable & (df > self.sample_above)):
            a, b = _group_pairs(acct[starts[k] : ends[k]], self.sample_above, rng)
            src_parts.append(a)
            dst_parts.append(b)
            key_parts.append(np.full(a.size, k, dtype=np.int64))
        kinds = sorted(self.kind_weights)
        if not src_parts:
            empty = np.zeros(0)
            return AccountGraph(
                names, empty.astype(np.int64), empty.astype(np.int64), empty,
                {k: empty for k in kinds}, {k: empty for k in kinds},
            )
        s = np.concatenate(src_parts)
        d = np.concatenate(dst_parts)
        kk = np.concatenate(key_parts)
        pid = s * len(names) + d
        upid, inv = np.unique(pid, return_inverse=True)
        by_kind, shared = {}, {}
        kind_of_edge = uniq_kind[kk]
        pair_src, pair_dst = upid // len(names), upid % len(names)
        for kname in kinds:
            mask = kind_of_edge == kname
            w = np.bincount(inv[mask], weights=kw[kk[mask]], minlength=upid.size)
            if kname in USAGE_KINDS:
                hub = self._hub_factor(acct, uniq_kind[key_idx] == kname, len(names))
                w = w / np.sqrt(hub[pair_src] * hub[pair_dst])
            # many keys of one kind (e.g. every LSH band of one shared prompt) are one piece of
            # evidence, not many: each kind's total is capped, so strong edges need several
            # independent kinds
            by_kind[kname] = np.minimum(w, self.kind_cap)
            shared[kname] = np.bincount(inv[mask], minlength=upid.size).astype(np.int64)
        weight = np.sum(list(by_kind.values()), axis=0)
        strong = weight >= self.min_edge_weight
        return AccountGraph(
            names,
            (upid // len(names))[strong],
            (upid % len(names))[strong],
            weight[strong],
            {k: v[strong] for k, v in by_kind.items()},
            {k: v[strong] for k, v in shared.items()},
        )


def encode_evidence(
    ev: pa.Table, accounts: Iterable[str] | None = None
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised encoding of an evidence table: (sorted account names, account index per row,
    key index per row, kind name per key). Rows of accounts not in `accounts` are dropped."""
    if accounts is None:
        accounts = pc.unique(ev["account_id"]).to_pylist()
    names = sorted(set(accounts))
    acct = pc.index_in(ev["account_id"], value_set=pa.array(names, pa.string()))
    acct = acct.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = acct >= 0
    full = pc.binary_join_element_wise(ev["kind"], ev["key"], "\x1f")
    enc = pc.dictionary_encode(full).combine_chunks()
    key_idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    kinds = pc.dictionary_encode(ev["kind"]).combine_chunks()
    kind_names = np.asarray(kinds.dictionary.to_pylist(), dtype=object)
    kind_of_key = np.empty(len(enc.dictionary), dtype=object)
    kind_of_key[key_idx] = kind_names[kinds.indices.to_numpy(zero_copy_only=False)]
    return names, acct[keep], key_idx[keep], kind_of_key


def _group_pairs(
    members: np.ndarray, sample_above: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) linking each member of a big group to `sample_above` sampled others."""
    m = members.size
    a = np.repeat(members, sample_above)
    offsets = rng.integers(1, m, size=a.size)
    pos = (np.repeat(np.arange(m), sample_above) + offsets) % m
    b = members[pos]
    span = int(members.max()) + 1
    pairs = np.unique(np.minimum(a, b) * span + np.maximum(a, b))  # each pair once per key
    lo, hi = pairs // span, pairs % span
    return lo, hi
