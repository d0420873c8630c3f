"""Stage 3: the account graph, whose edges are evidence of common control.

Two halves:

* `evidence(view, accounts)` (Ibis, runs on DuckDB or Spark) lists every (account, kind, key)
  an account used: addresses, /24 or /48 prefixes, user agents, template signatures and their
  LSH bands, system prompts, payment fingerprints, e-mail domains, sign-up address and sign-up
  hour. A replay to time T scans the exchanges up to T, so the evidence is what was known then.
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

import itertools
from collections.abc import Iterable, Iterator
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

#: Kinds whose key names who pays or owns an account, not a place strangers pass through: past
#: a handful of accounts, more accounts on one key is more suspicious, not less. Their rarity
#: decay stops at `OWNER_DECAY_DF` sharers, so an operator's card funding 25 accounts ties each
#: pair as firmly as a card three accounts share, instead of a quarter as firmly as a family's.
OWNER_KINDS = frozenset({"payment"})
OWNER_DECAY_DF = 3

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
    ]
)


def evidence(view: ir.Table, accounts: ir.Table, *, bands: ir.Table | None = None) -> ir.Table:
    """Every distinct (account, kind, key) used: see EVIDENCE_SCHEMA.
    `bands` (`fingerprints.band_view`) adds the LSH band keys; without it there are none."""

    def per_exchange(kind: str, table: ir.Table, key: ir.Value) -> ir.Table:
        # nullable types throughout: the view and the bands come from different tables, and
        # a union needs one schema
        t = table.select(account_id=_nullable(table.account_id), key=key.cast("string"))
        t = t.filter(t.key.notnull() & (t.key != ""))
        return t.distinct().mutate(kind=ibis.literal(kind))

    parts = [
        per_exchange("ip", view, view.ip),
        per_exchange("prefix", view, view.prefix),
        per_exchange("user_agent", view, view.user_agent),
        per_exchange("template", view, view.template_sig),
        per_exchange("system", view, view.system_hash),
    ]
    if bands is not None:
        parts.append(per_exchange("lsh", bands, bands.template_lsh.unnest()))
    # sign-up attributes of the accounts active in the view only
    acc = accounts.semi_join(view.select("account_id").distinct(), "account_id")
    for kind, key in (
        ("payment", acc.payment_fingerprint),
        ("email_domain", acc.email_domain),
        ("signup_ip", acc.signup_ip),
        ("signup_hour", acc.created_at.truncate("h").cast("string")),
    ):
        t = acc.select("account_id", key=key.cast("string"))
        parts.append(t.filter(t.key.notnull() & (t.key != "")).mutate(kind=ibis.literal(kind)))
    cols = ["account_id", "kind", "key"]
    return ibis.union(*[p.select(*cols) for p in parts], distinct=False)


def _nullable(column: ir.Value) -> ir.Value:
    return column.cast(column.type().copy(nullable=True))


def shared_evidence(ev: ir.Table) -> ir.Table:
    """The rows of `ev` whose key at least two accounts used (Ibis). Only those can tie
    accounts: an edge, a dense block, a campaign signature or indicator all need a key in
    common, and most template and LSH keys are used by one account only."""
    keys = ev.group_by(["kind", "key"]).aggregate(df=ev.count())
    return ev.semi_join(keys.filter(keys.df >= 2).select("kind", "key"), ["kind", "key"])


def key_counts(ev: ir.Table) -> ir.Table:
    """Keys per (account, kind) over all of `ev` (Ibis): the hub discount of `Linker.link`
    counts every key an account used, shared or not."""
    return ev.group_by(["account_id", "kind"]).aggregate(n_keys=ev.count())


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
    (EVIDENCE_SCHEMA).
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

    def owner_weight(self) -> np.ndarray:
        """Each edge's weight from OWNER_KINDS only (a shared payment instrument)."""
        parts = [v for k, v in self.by_kind.items() if k in OWNER_KINDS]
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
    #: pair products per block of source accounts (first pass) or per batch of rows at the
    #: edges (second pass): what bounds the temporaries, however many pairs the population has
    product_batch: int = 1 << 22
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(KIND_WEIGHTS))
    seed: int = 0

    def key_weights(self, df: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        """Rarity weight of each key: kind weight / log2(1 + accounts sharing it), with the
        sharing of `OWNER_KINDS` keys counted up to `OWNER_DECAY_DF` only."""
        base = np.array([self.kind_weights.get(k, 0.0) for k in kinds])
        owner = np.isin(kinds, list(OWNER_KINDS))
        return base / np.log2(1.0 + np.where(owner, np.minimum(df, OWNER_DECAY_DF), df))

    @staticmethod
    def _hub_factor(counts: np.ndarray) -> np.ndarray:
        """How many times more keys of one kind an account has (`counts`) than the
        population's 90th percentile (at least 1). An account that sends hundreds of different
        prompts or rotates through hundreds of addresses collides with everyone by chance; its
        shared keys are discounted by the square root of this factor on each side of a pair."""
        active = counts[counts > 0]
        typical = max(1.0, float(np.quantile(active, 0.9))) if active.size else 1.0
        return np.maximum(1.0, counts / typical)

    def link(
        self,
        ev: pa.Table,
        accounts: Iterable[str] | None = None,
        key_counts: pa.Table | None = None,
    ) -> AccountGraph:
        """Build the graph; `accounts` fixes the vertex list (default: accounts in `ev`).

        `ev` may hold only the rows of keys shared by at least two accounts (the only ones that
        can make an edge: `shared_evidence`) when `key_counts` (keys per account and kind over
        *all* evidence: `key_counts`) is given for the hub discount.

        Pairs are never listed one row per shared key: per kind, keys of up to `sample_above`
        accounts go through a sparse product (accounts x keys) @ (keys x accounts), which sums
        every pair's evidence in place, and bigger keys add their sampled pairs
        (`_sampled_pairs`) to the same sparse matrix. Two passes keep few pairs in memory at a
        time: the first sums every kind's capped weights for a block of source accounts at a
        time (`_strong_pairs`), whose strong entries are the edges; the second computes each
        kind's weight and shared-key count at those edges alone.
        """
        names, acct, key_idx, uniq_kind = encode_evidence(ev, accounts)
        n = len(names)
        key_idx, acct = distinct_pairs(key_idx, acct, n)
        df = np.bincount(key_idx, minlength=uniq_kind.size)
        kw = self.key_weights(df.astype(float), uniq_kind)
        usable = (df >= 2) & (df <= self.max_group) & (kw > 0)
        counts = _keys_per_account(key_counts, names) if key_counts is not None else None
        # random 64-bit tokens per account: member-set hashes and the sampling order
        tokens = np.random.default_rng(self.seed).integers(0, 2**63, size=n, dtype=np.uint64)
        kinds = sorted(self.kind_weights)
        keys_of = {k: usable & (uniq_kind == k) for k in kinds}
        hub = {}
        for kname in sorted(USAGE_KINDS & set(kinds)):
            if counts is not None:
                per_account = counts.get(kname, np.zeros(n))
            else:
                per_account = np.bincount(acct[(uniq_kind == kname)[key_idx]],
                                          minlength=n).astype(float)
            hub[kname] = self._hub_factor(per_account)
        enc = _EncodedKeys(acct, key_idx, df, kw, n, tokens)
        src, dst = self._strong_pairs(enc, keys_of, hub)
        by_kind, shared = {}, {}
        for kname in kinds:
            pairs = self._kind_pairs(enc, keys_of[kname], at=(src, dst))
            w = pairs.real
            if kname in hub:
                w /= np.sqrt(hub[kname][src] * hub[kname][dst])
            by_kind[kname] = np.minimum(w, self.kind_cap)
            shared[kname] = np.rint(pairs.imag).astype(np.int64)
        weight = np.sum(list(by_kind.values()), axis=0)
        return AccountGraph(names, src, dst, weight, by_kind, shared)

    def _strong_pairs(
        self,
        enc: _EncodedKeys,
        keys_of: dict[str, np.ndarray],
        hub: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first pass: pairs (src < dst, sorted) whose capped evidence summed over kinds
        reaches `min_edge_weight`. Computed for a block of consecutive source accounts at a
        time (about `product_batch` pair products each), every kind's rows of the block summed
        before the next block starts: the small keys' products exist one block at a time,
        not for the whole population. Each kind's sampled pairs of big keys are still held
        whole for the pass (`_KindRows.sampled`): at 20M exchanges 410M entries, most of the
        linker's 9.5 GB peak (docs/detection.md)."""
        kinds = sorted(keys_of)  # summed in kind order, like `weight` in `link`
        parts = {k: self._kind_rows(enc, keys_of[k]) for k in kinds}
        cost = np.sum([p.cost for p in parts.values()], axis=0)
        src, dst = [], []
        for lo, hi in _batches(cost, self.product_batch):
            total = None
            for kname in kinds:
                w = parts[kname].upper_rows(lo, hi)
                if kname in hub:
                    rows = np.repeat(np.arange(lo, hi), np.diff(w.indptr))
                    w.data /= np.sqrt(hub[kname][rows] * hub[kname][w.indices])
                # many keys of one kind (e.g. every LSH band of one shared prompt) are one
                # piece of evidence, not many: each kind's total is capped, so strong edges
                # need several independent kinds
                np.minimum(w.data, self.kind_cap, out=w.data)
                total = w if total is None else total + w
            total = total.tocoo()
            strong = total.data >= self.min_edge_weight
            src.append(total.row[strong].astype(np.int64) + lo)
            dst.append(total.col[strong].astype(np.int64))
        if not src:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        src, dst = np.concatenate(src), np.concatenate(dst)
        order = np.lexsort((dst, src))  # blocks come in order; within one, the CSR's order
        return src[order], dst[order]

    def _kind_rows(
        self,
        enc: _EncodedKeys,
        keys: np.ndarray,
    ) -> _KindRows:
        """One kind's pairs (`keys`: mask of its usable keys), to be read a block of source
        accounts at a time: keys of up to `sample_above` accounts as an incidence matrix whose
        product with its transpose sums every pair's keys, bigger keys as their sampled
        pairs (`_sampled_pairs`) summed into one sparse matrix."""
        from scipy import sparse

        left, sampled = self._split_keys(enc, keys)
        left.data *= enc.kw[left.indices]  # each key's weight
        n = enc.n
        sampled_m = _sum_matrices(itertools.chain(
            [sparse.csr_matrix((n, n))],
            (sparse.csr_matrix((v.real, (lo, hi)), shape=(n, n)) for lo, hi, v in sampled)))
        return _KindRows(left, sampled_m.tocsr())

    def _kind_pairs(
        self,
        enc: _EncodedKeys,
        keys: np.ndarray,
        at: tuple[np.ndarray, np.ndarray],
    ) -> np.ndarray:
        """The second pass: one kind's summed key weight at the pairs `at=(src, dst)` (src <
        dst) alone (`keys`: mask over keys), as a complex array: weight + 1j * number of
        shared keys."""
        a, sampled = self._split_keys(enc, keys)
        return _pairs_at(a, enc.kw + 1j, sampled, *at, enc.n, self.product_batch)

    def _split_keys(
        self,
        enc: _EncodedKeys,
        keys: np.ndarray,
    ):
        """One kind's usable keys (`keys`: mask over keys), as both passes read them: those of
        up to `sample_above` accounts as an accounts x keys incidence matrix (CSR, ones), the
        bigger ones as an iterator of their sampled pairs (`_sampled_pairs`)."""
        from scipy import sparse

        acct, key_idx, df = enc.acct, enc.key_idx, enc.df
        small = keys & (df <= self.sample_above)
        rows = small[key_idx]
        incidence = sparse.csr_matrix((np.ones(int(rows.sum())), (acct[rows], key_idx[rows])),
                                      shape=(enc.n, df.size))
        big = np.flatnonzero(keys & (df > self.sample_above))
        sampled = _sampled_pairs(acct[np.isin(key_idx, big)], df[big], enc.kw[big],
                                 self.sample_above, enc.tokens) if big.size else iter(())
        return incidence, sampled


@dataclass
class _EncodedKeys:
    """The evidence as both passes of `Linker.link` read it: distinct (account, key) rows
    (`acct`, `key_idx`), each key's number of accounts (`df`) and weight (`kw`), the number of
    accounts `n` and their random 64-bit `tokens` (member-set hashes, sampling order)."""

    acct: np.ndarray
    key_idx: np.ndarray
    df: np.ndarray
    kw: np.ndarray
    n: int
    tokens: np.ndarray


@dataclass
class _KindRows:
    """One kind's pair weights, read by blocks of source accounts (`Linker._kind_rows`):
    `left` (accounts x keys, each key's weight) times its transpose's pattern gives the small
    keys' pairs, `sampled` (accounts x accounts, upper triangle) the big keys' sampled ones."""

    left: object
    sampled: object

    def __post_init__(self) -> None:
        self.right = (self.left.T != 0).astype(float).tocsr()  # keys x accounts, ones
        # per account: the pair products its row makes (both triangles) and its sampled pairs
        self.cost = self.left.astype(bool).astype(float) @ np.diff(self.right.indptr) + np.diff(
            self.sampled.indptr)

    def upper_rows(self, lo: int, hi: int):
        """Rows [lo, hi) of the kind's upper-triangular pair matrix, as (hi - lo) x n CSR."""
        from scipy import sparse

        block = sparse.triu(self.left[lo:hi] @ self.right, k=lo + 1, format="csr")
        return block + self.sampled[lo:hi]


def _pairs_at(a, value: np.ndarray, sampled: Iterable, src: np.ndarray, dst: np.ndarray,
              n: int, budget: int) -> np.ndarray:
    """`Linker._kind_pairs` at the pairs (src, dst) alone (sorted by src, as a CSR matrix lists
    them). Small keys: the product restricted to the rows of the pairs' first ends, a batch of
    rows at a time (about `budget` products; at most the cost of the full product, whereas two
    rows per pair would read a hub's long row once per pair), each pair read off its row.
    Sampled pairs of big keys: looked up among the wanted ones."""
    out = np.zeros(src.size, dtype=complex)
    right = a.T.tocsr().astype(complex)  # keys x accounts, weighted
    right.data *= np.repeat(value, np.diff(right.indptr))
    firsts = sorted_unique(src)
    cost = a @ np.diff(right.indptr).astype(float)  # per account: the products its row makes
    for lo, hi in _batches(cost[firsts], budget):
        rows = firsts[lo:hi]
        e0, e1 = np.searchsorted(src, rows[0], "left"), np.searchsorted(src, rows[-1], "right")
        m = (a[rows] @ right).tocsr()
        out[e0:e1] = np.asarray(m[np.searchsorted(rows, src[e0:e1]), dst[e0:e1]]).ravel()
    # a bit table of the wanted pairs' hashes (under 1% false hits) before the exact lookup
    bits = 1 << max(16, int(np.ceil(np.log2(64 * max(1, src.size)))))
    wanted = src * n + dst
    table = np.zeros(bits, dtype=bool)
    table[_slot(wanted, bits)] = True
    wanted = pa.array(wanted)
    for lo, hi, v in sampled:
        code = lo.astype(np.int64) * n + hi
        maybe = np.flatnonzero(table[_slot(code, bits)])
        at = pc.index_in(pa.array(code[maybe]), value_set=wanted)
        at = at.fill_null(-1).to_numpy(zero_copy_only=False)
        hit = at >= 0
        out += np.bincount(at[hit], weights=v[maybe][hit].real, minlength=src.size)
        out += 1j * np.bincount(at[hit], weights=v[maybe][hit].imag, minlength=src.size)
    return out


def _slot(code: np.ndarray, bits: int) -> np.ndarray:
    """Multiplicative (Fibonacci) hash of non-negative int64 codes into [0, bits), bits a power
    of two."""
    mixed = code.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (mixed >> np.uint64(64 - int(bits).bit_length() + 1)).astype(np.int64)


def _sampled_pairs(
    members: np.ndarray, sizes: np.ndarray, kw: np.ndarray, sample_above: int,
    tokens: np.ndarray, chunk_rows: int = 1 << 22,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sampled pairs of big keys (`members`: their accounts, key after key, `sizes` each).

    Each key's members are put in a pseudo-random cyclic order and each is linked to the next
    `h` of them, `h` chosen so a pair is linked with the probability it would have if every
    member drew `sample_above` random partners (1 - (1 - 1/(m-1))^(2 sample_above)): every
    member gets ~2 x sample_above partners, every pair at most once per key, vectorised over
    all keys and with no O(m^2). Keys with the same members (the LSH bands of one prompt) are
    sampled once, carrying the sum of their weights and their number. Yields (lo, hi,
    weight + 1j * keys) arrays (lo < hi) of about `chunk_rows` pairs at a time, so the caller
    sums them into a sparse matrix without holding every pair at once.
    """
    starts = np.cumsum(sizes) - sizes
    # a hash of each key's member set: the sum of its members' random 64-bit tokens
    set_hash = np.add.reduceat(tokens[members], starts)
    uniq, first, inv = np.unique(set_hash, return_index=True, return_inverse=True)
    value = np.bincount(inv, weights=kw, minlength=uniq.size) + 1j * np.bincount(
        inv, minlength=uniq.size)
    m = sizes[first]
    base = np.repeat(np.cumsum(m) - m, m)  # each set's first row
    rows = np.repeat(starts[first], m) + np.arange(base.size) - base
    of_set = np.repeat(np.arange(uniq.size), m)
    # the cyclic order of a set: its members sorted by a mix of their token and the set's hash
    ring = members[rows][np.lexsort((_mix64(tokens[members[rows]] ^ uniq[of_set]), of_set))]
    pos = np.arange(ring.size) - base
    p = 1.0 - (1.0 - 1.0 / (m - 1)) ** (2 * sample_above)
    hops = np.maximum(1, np.rint((m - 1) / 2 * p).astype(np.int64))
    # (ring position, hop) pieces, concatenated once per chunk: growing one array piece by
    # piece would copy the whole chunk at every hop
    ats: list[np.ndarray] = []
    hop_list: list[np.ndarray] = []
    pending = 0
    hops_at = hops[of_set]
    for h in range(1, int(hops.max()) + 2):
        if pending >= chunk_rows or (h > hops.max() and pending):
            at, hop = np.concatenate(ats), np.concatenate(hop_list)
            of = of_set[at]
            # the partner `hop` places further round the ring: at + hop, less the set's size
            # when that passes the ring's end (hop < m, so once at most; no division)
            size = m[of]
            ahead = at + hop
            ahead -= np.where(pos[at] + hop >= size, size, 0)
            a, b = ring[at], ring[ahead]
            yield np.minimum(a, b), np.maximum(a, b), value[of]
            ats, hop_list, pending = [], [], 0
        more = np.flatnonzero(hops_at >= h)
        ats.append(more)
        hop_list.append(np.full(more.size, h))
        pending += more.size


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)` by sorting: NumPy 2.4's hash-based `np.unique` (used when no
    index, inverse or counts are asked for) took 17 s on 7.5 million int64s here, a sort 0.2 s."""
    s = np.sort(values)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s


def owned_key_ties(ev: pa.Table, names: list[str], group: np.ndarray,
                   linker: Linker) -> dict[tuple[int, int, int], float]:
    """Per (group, other group, account of the first group): the summed rarity weight
    (`Linker.key_weights`) of the control keys (every kind but CONTENT_KINDS) the account
    shares with members of the other group, counting only keys the groups own: at least half
    of the key's users are in a group (`group[i] >= 0`, `i` indexing the sorted `names`), and
    at most `linker.max_group` use it. Unlike a graph edge, no pair has to be strong: an
    operator rotating one pool of addresses over thousands of accounts ties each pair of its
    accounts by an address or two (far below an edge), each account to the rest of its fleet by
    dozens."""
    control = ev.filter(pc.invert(pc.is_in(pc.cast(ev["kind"], pa.string()),
                                           value_set=pa.array(sorted(CONTENT_KINDS)))))
    if control.num_rows == 0:
        return {}
    _, acct, key_idx, kinds = encode_evidence(control, names)
    df = np.bincount(key_idx, minlength=kinds.size)
    of_row = group[acct]
    grouped = of_row >= 0
    n_grouped = np.bincount(key_idx[grouped], minlength=df.size)
    weight = linker.key_weights(df.astype(float), kinds)
    owned = (2 * n_grouped >= df) & (df >= 2) & (df <= linker.max_group) & (weight > 0)
    rows = grouped & owned[key_idx]
    if not rows.any():
        return {}
    from scipy import sparse

    # (accounts x owned keys, each key's weight) @ (owned keys x groups, 1 where the key has a
    # member in the group): per account and group, the weight of the keys it shares with that
    # group, without listing one row per key and group (a pool address used by hundreds of
    # one fleet's accounts in hundreds of groups would be hundreds of thousands)
    keys, key_col = np.unique(key_idx[rows], return_inverse=True)
    labels, group_col = np.unique(of_row[rows], return_inverse=True)
    uses = sparse.csr_matrix((weight[key_idx[rows]], (acct[rows], key_col)),
                             shape=(group.size, keys.size))
    member = sparse.csr_matrix((np.ones(key_col.size), (key_col, group_col)),
                               shape=(keys.size, labels.size))
    member.data[:] = 1.0  # duplicates (several members in one group) were summed
    ties = (uses @ member).tocoo()
    own, other = group[ties.row], labels[ties.col]
    across = own != other
    return {(int(g), int(o), int(a)): float(w) for g, o, a, w in zip(
        own[across], other[across], ties.row[across], ties.data[across], strict=True)}


def distinct_pairs(
    key_idx: np.ndarray, acct: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (key, account) pairs of `encode_evidence`'s rows, ordered by key then
    account, as int32 arrays (both stay in memory while a graph is built: 47M rows at 10M
    exchanges); `n` is the number of accounts. The pairs are coded in int64, which key * n
    would overflow in int32."""
    pair = sorted_unique(key_idx.astype(np.int64) * n + acct)
    return (pair // n).astype(np.int32), (pair % n).astype(np.int32)


def _batches(cost: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Ranges [lo, hi) of consecutive items (keys, pairs) whose summed `cost` stays about
    `budget` (one item over it gets a range of its own); items of zero cost at either end are
    left out."""
    used = np.flatnonzero(cost)
    if used.size == 0:
        return []
    first, last = int(used[0]), int(used[-1]) + 1
    cum = np.cumsum(cost[first:last])
    cuts = np.searchsorted(cum, np.arange(budget, int(cum[-1]), budget), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [last - first]])) + first
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


def _sum_matrices(matrices: Iterable):
    """Sum of sparse matrices, pairwise like a binary counter: adding each chunk of sampled
    pairs to one growing sum copies that sum once per chunk (quadratic in the chunks), this
    copies each entry about log2(chunks) times and holds about that many partial sums."""
    stack: list[tuple[int, object]] = []
    for m in matrices:
        level = 0
        while stack and stack[-1][0] == level:
            m = stack.pop()[1] + m
            level += 1
        stack.append((level, m))
    total = stack.pop()[1]
    while stack:
        total = stack.pop()[1] + total
    return total


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a cheap, well-mixed 64-bit hash (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys_per_account(key_counts: pa.Table, names: list[str]) -> dict[str, np.ndarray]:
    """Per kind, the number of distinct keys each account (index into `names`) used."""
    idx = pc.index_in(key_counts["account_id"], value_set=pa.array(names, pa.string()))
    idx = idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    kinds = np.asarray(key_counts["kind"].to_pylist(), dtype=object)
    n_keys = key_counts["n_keys"].to_numpy(zero_copy_only=False).astype(float)
    out = {}
    for kname in np.unique(kinds):
        sel = (kinds == kname) & (idx >= 0)
        out[str(kname)] = np.bincount(idx[sel], weights=n_keys[sel], minlength=len(names))
    return out


def encode_evidence(
    ev: pa.Table, accounts: Iterable[str] | None = None
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised encoding of an evidence table: (sorted account names, account index per row,
    key index per row, kind name per key); the indices are int32. Rows of accounts not in
    `accounts` are dropped. Columns may be plain or dictionary-encoded strings. Keys are
    numbered in sorted (kind, key) order, so rows may come in any order: the graph, its
    sampling and Leiden then do not depend on how an engine returned the evidence."""
    if accounts is None:
        accounts = pc.unique(ev["account_id"]).to_pylist()
    names = sorted(set(accounts))
    acct = pc.index_in(ev["account_id"], value_set=pa.array(names, pa.string()))
    acct = acct.fill_null(-1).to_numpy(zero_copy_only=False)
    keep = acct >= 0
    # (rank of the kind, rank of the key) in one int64, numbered in sorted order; no string
    # per row is built (the 47M rows of a 10M-exchange scan would take gigabytes)
    kind_values, kind_of_row = dictionary_codes(ev["kind"])
    key_values, key_of_row = dictionary_codes(ev["key"])
    kind_rank, key_rank = _sorted_rank(kind_values), _sorted_rank(key_values)
    code = pa.array(kind_rank[kind_of_row] * len(key_values) + key_rank[key_of_row])
    del kind_of_row, key_of_row
    combos = np.sort(pc.unique(code).to_numpy())
    key_idx = pc.index_in(code, value_set=pa.array(combos)).to_numpy()
    sorted_kinds = np.asarray(kind_values.to_pylist(), dtype=object)[np.argsort(kind_rank)]
    return names, acct[keep], key_idx[keep], sorted_kinds[combos // len(key_values)]


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(distinct values, each row's index into them) of a plain or dictionary column."""
    enc = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()  # one dictionary for all chunks
    return enc.dictionary, enc.indices.to_numpy(zero_copy_only=False)


def _sorted_rank(values: pa.Array) -> np.ndarray:
    """Each value's position in sorted (code-point) order."""
    order = pc.array_sort_indices(values).to_numpy()
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank
