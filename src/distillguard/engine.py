"""`scan`: runs the detection stages over the store and writes findings.

Stages (one module each): signals (cached per request_id in the store) -> fingerprints and
evidence (Ibis: DuckDB or Spark) -> linking -> clustering -> scoring -> campaigns (attribution in
Ibis again). The graph stages run in-process on account-level data (accounts are millions, not
billions; see docs/detection.md for where that stops holding).

Incremental and replayable: signals are only computed for exchanges not yet annotated; with
`until`, only exchanges up to that time are used, and `first_flagged_at` keeps the earliest time
an account / campaign / pivot was flagged by any earlier scan of the same store, so replaying a
scenario day by day (`scan --until day1`, `--until day2`, ...) yields true detection times.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import ibis
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillguard import campaigns as camp
from distillguard import contract
from distillguard.clustering import fraudar, leiden_clusters
from distillguard.fingerprints import (
    account_fingerprints,
    band_view,
    exchange_view,
    model_first_seen,
)
from distillguard.linking import (
    EVIDENCE_SCHEMA,
    AccountGraph,
    Linker,
    activity_cells,
    evidence,
    key_counts,
    owned_key_ties,
    shared_evidence,
)
from distillguard.linking import synchrony_evidence as sync_evidence
from distillguard.reports import to_plain
from distillguard.scoring import AccountScores, BehaviourScorer, ClusterScorer, ClusterVerdict
from distillguard.store import transaction

ENGINES = ("duckdb", "spark")
STAGES = ("signals", "fingerprints", "evidence", "linking", "clustering", "scoring", "campaigns")

#: progress(stage, done, total): called as stages advance (the CLI draws it).
Progress = Callable[[str, int, int], None]


@dataclass
class ScanConfig:
    """Knobs of the detector. Defaults are population-relative, not tuned to one lab seed."""

    linker: Linker = field(default_factory=Linker)
    resolution: float = 1.0
    clusters: ClusterScorer = field(default_factory=ClusterScorer)
    sync_bucket_minutes: int = 10
    sync_min_cells: int = 8
    lsh_evidence: bool = True
    dedicated_share: float = 0.6
    signal_batch_rows: int = 50_000
    #: DuckDB's memory limit during the scan (it spills to its temp directory beyond it);
    #: None leaves the connection's own setting
    duckdb_memory_limit: str | None = "3GB"
    #: DuckDB's memory limit while the graph stages run in-process (linking, clustering): it
    #: spills its buffers (the cached view), so the graph has that memory, and the campaigns
    #: stage reads them back. File-backed stores only. None keeps `duckdb_memory_limit`
    duckdb_graph_memory_limit: str | None = "256MB"
    #: join flagged clusters tied by control keys they own though no graph edge ties them
    #: (`linking.owned_key_ties`): one operator's fleet at tens of millions of exchanges
    merge_by_owned_keys: bool = True


@dataclass
class Findings:
    """The three finding tables (contract.FINDING_*_SCHEMA) plus what the scan measured."""

    accounts: pa.Table
    campaigns: pa.Table
    exchanges: pa.Table
    seconds: dict[str, float] = field(default_factory=dict)
    n_exchanges: int = 0
    n_annotated: int = 0
    allow_listed: list[str] = field(default_factory=list)
    until: datetime | None = None

    def write(self, out: str | Path) -> Path:
        """Write accounts/campaigns/exchanges.parquet and campaigns.json under `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.accounts, out / "accounts.parquet")
        pq.write_table(self.campaigns, out / "campaigns.parquet")
        pq.write_table(self.exchanges, out / "exchanges.parquet")
        (out / "campaigns.json").write_text(json.dumps(campaigns_json(self), indent=2))
        return out


def campaigns_json(findings: Findings) -> dict:
    """The JSON document written beside the Parquet files (campaigns with their evidence)."""
    return {
        "until": findings.until.isoformat() if findings.until else None,
        "n_exchanges_scanned": findings.n_exchanges,
        "n_accounts_flagged": int(pc.sum(findings.accounts["flagged"]).as_py() or 0),
        "allow_listed": findings.allow_listed,
        "campaigns": [to_plain(row) for row in findings.campaigns.to_pylist()],
    }


@contextmanager
def _timed(seconds: dict[str, float], stage: str, progress: Progress | None) -> Iterator[None]:
    start = time.perf_counter()
    if progress:
        progress(stage, 0, 1)
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
    if progress:
        progress(stage, 1, 1)


# ------------------------------------------------------------------------------------------
# signals (stage 1, cached)
# ------------------------------------------------------------------------------------------
def _until_sql(until: datetime | None) -> str:
    return "" if until is None else f"AND e.ts <= TIMESTAMPTZ '{until.isoformat()}'"


def annotate_new(
    con: duckdb.DuckDBPyConnection,
    *,
    until: datetime | None = None,
    batch_rows: int = 50_000,
    commit_rows: int = 500_000,
    progress: Progress | None = None,
) -> int:
    """Compute signals for stored exchanges (up to `until`) that have none yet; return count.

    Streams record batches (only the columns signals read: responses are most of the bytes)
    from the store through a `SignalAnnotator` that analyses each batch's new prompt texts on
    every core, pipelined (`annotate_stream`: the workers analyse the next batch while this
    process writes this one), and appends each result to the `signals` table, so memory stays
    bounded and reruns are free. Rows are committed `commit_rows` at a time: a commit per
    batch (a WAL sync, often a checkpoint) cost more than the inserts; a stopped scan keeps
    what was committed.
    """
    select = (
        "FROM exchanges e WHERE NOT EXISTS "
        "(SELECT 1 FROM signals s WHERE s.request_id = e.request_id) " + _until_sql(until)
    )
    total = con.execute(f"SELECT count(*) {select}").fetchone()[0]
    if total == 0:
        return 0
    from distillguard.signals import SignalAnnotator
    from distillguard.signals.annotate import INPUT_COLUMNS

    columns = ", ".join(f"e.{name}" for name in INPUT_COLUMNS)
    reader = con.cursor().execute(f"SELECT {columns} {select}").fetch_record_batch(batch_rows)
    annotator = SignalAnnotator(workers=os.cpu_count() or 1)
    tables = annotator.annotate_stream(reader)
    done = 0
    try:
        while True:
            with transaction(con):
                start = done
                for annotated in tables:
                    # an explicit relation: Ibis turns DuckDB's lookup of Python variables by
                    # name off on the connections it wraps, so it fails from the second scan
                    con.from_arrow(contract.conform(annotated, contract.SIGNAL_SCHEMA)
                                   ).insert_into("signals")
                    done += annotated.num_rows
                    if progress:
                        progress("signals", done, total)
                    if done - start >= commit_rows:
                        break
                else:
                    break
    finally:
        annotator.close()
    return done


# ------------------------------------------------------------------------------------------
# backends: the same Ibis expressions on DuckDB or Spark
# ------------------------------------------------------------------------------------------
class _Backend:
    """Ibis tables `exchanges`, `signals`, `accounts` on one engine."""

    def __init__(self, ibis_con, cleanup: Callable[[], None] | None = None,
                 temp_tables: bool = False):
        self.ibis = ibis_con
        self._cleanup = cleanup
        self._temp_tables = temp_tables

    def table(self, name: str):
        return self.ibis.table(name)

    def memtable(self, table: pa.Table, name: str):
        """`table` as an input of the backend's queries. On DuckDB a temporary table `name`,
        which the planner has statistics for: a registered Arrow table has none, and with it
        the attribution query of a 10M-exchange scan spilled without bound (7.4 GB in a minute
        against 5 s as a temporary table)."""
        if self._temp_tables:
            return self.ibis.create_table(name, table, temp=True, overwrite=True)
        return ibis.memtable(table)

    def close(self) -> None:
        if self._cleanup:
            self._cleanup()


def _duckdb_backend(con: duckdb.DuckDBPyConnection) -> _Backend:
    return _Backend(ibis.duckdb.from_connection(con), temp_tables=True)


def spark_session():
    """A local Spark session in UTC with Arrow enabled (the `spark` engine's default)."""
    from pyspark.sql import SparkSession

    # Workers must run this interpreter (the one with distillguard installed).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (
        SparkSession.builder.master("local[2]")
        .appName("distillguard-scan")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )


def _spark_backend(
    con: duckdb.DuckDBPyConnection, until: datetime | None, progress: Progress | None
) -> tuple[_Backend, int]:
    """Export the store's rows to Parquet, annotate missing signals in Spark (`mapInArrow`),
    write the new signals back to the store, and expose all three tables to Ibis-on-Spark."""
    from pyspark.sql.pandas.types import from_arrow_schema

    tmp = tempfile.TemporaryDirectory(prefix="distillguard-spark-")
    root = Path(tmp.name)
    con.execute(
        f"COPY (SELECT * FROM exchanges e WHERE true {_until_sql(until)}) "
        f"TO '{root / 'exchanges.parquet'}' (FORMAT parquet)"
    )
    for name in ("signals", "accounts"):
        con.execute(f"COPY {name} TO '{root / (name + '.parquet')}' (FORMAT parquet)")
    spark = spark_session()
    ex = spark.read.parquet(str(root / "exchanges.parquet"))
    known = spark.read.parquet(str(root / "signals.parquet"))
    missing = ex.join(known.select("request_id"), "request_id", "left_anti")

    spark_signal_schema = pa.schema(
        [f.with_type(pa.timestamp("us", tz="UTC")) if f.type == contract.UTC_TS else f
         for f in contract.SIGNAL_SCHEMA]
    )

    def annotate_batches(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows:
                from distillguard.signals import annotate

                table = contract.conform(pa.Table.from_batches([batch]), contract.EXCHANGE_SCHEMA)
                out = contract.conform(annotate(table), contract.SIGNAL_SCHEMA)
                yield from out.cast(spark_signal_schema).to_batches()  # Spark wants µs

    new = missing.mapInArrow(annotate_batches, from_arrow_schema(contract.SIGNAL_SCHEMA))
    new_path = root / "new_signals.parquet"
    new.write.parquet(str(new_path))
    fresh = pq.read_table(new_path) if any(new_path.glob("*.parquet")) else None
    n_new = 0
    if fresh is not None and fresh.num_rows:
        fresh = contract.conform(fresh, contract.SIGNAL_SCHEMA)
        con.from_arrow(fresh).insert_into("signals")
        n_new = fresh.num_rows
    signals = known.unionByName(spark.read.parquet(str(new_path)))
    ex.createOrReplaceTempView("exchanges")
    signals.createOrReplaceTempView("signals")
    spark.read.parquet(str(root / "accounts.parquet")).createOrReplaceTempView("accounts")
    if progress:
        progress("signals", n_new, n_new)
    return _Backend(ibis.pyspark.connect(spark), tmp.cleanup), n_new


# ------------------------------------------------------------------------------------------
# scan
# ------------------------------------------------------------------------------------------
def scan(
    con: duckdb.DuckDBPyConnection,
    *,
    until: datetime | None = None,
    engine: str = "duckdb",
    out: str | Path | None = None,
    allow_accounts: Iterable[str] = (),
    allow_orgs: Iterable[str] = (),
    verdicts: Mapping[str, bool] | None = None,
    progress: Progress | None = None,
    config: ScanConfig | None = None,
) -> Findings:
    """Run every stage over the store and write the findings (store tables, and `out/`)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if until is not None and until.tzinfo is None:
        raise ValueError("until needs a time zone (e.g. 2026-01-05T00:00:00Z)")
    config = config or ScanConfig()
    try:
        with _memory_limit(con, config.duckdb_memory_limit):
            findings = _scan(con, until, engine, allow_accounts, allow_orgs, verdicts,
                             progress, config)
    except duckdb.IOException as exc:
        if "No space left on device" not in str(exc):
            raise
        raise DiskFullError(_disk_full_message(con)) from exc
    if out is not None:
        findings.write(out)
    return findings


class DiskFullError(OSError):
    """The disk DuckDB spills to filled up during a scan (its message says where and what is
    kept)."""


def _disk_full_message(con: duckdb.DuckDBPyConnection) -> str:
    try:
        temp = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    except duckdb.Error:
        temp = None
    where = Path(temp) if temp else Path.cwd()
    probe = where if where.exists() else where.parent
    free = shutil.disk_usage(probe).free / 2**30 if probe.exists() else float("nan")
    return (f"the disk filled up while DuckDB spilled to {where} ({free:.1f} GiB free now): "
            "no findings were written; the signals computed so far are kept in the store, "
            "so a rerun after freeing space starts from there")


@contextmanager
def _memory_limit(con: duckdb.DuckDBPyConnection, limit: str | None,
                  best_effort: bool = False) -> Iterator[None]:
    """DuckDB's memory_limit set to `limit` for the block, then restored. With `best_effort`,
    a limit DuckDB cannot meet (it cannot spill what it holds, e.g. without a temp directory)
    leaves the setting as it was."""
    if limit is None:
        yield
        return
    before = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    try:
        con.execute(f"SET memory_limit = '{limit}'")
    except duckdb.Error:
        if not best_effort:
            raise
        yield
        return
    try:
        yield
    finally:
        con.execute(f"SET memory_limit = '{before}'")


def _file_backed(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the connection's current database is a file (it spills beside it)."""
    row = con.execute("SELECT path FROM duckdb_databases() "
                      "WHERE database_name = current_database()").fetchone()
    return bool(row and row[0])


def _scan(con, until, engine, allow_accounts, allow_orgs, verdicts, progress, config) -> Findings:
    seconds: dict[str, float] = {}
    if engine == "duckdb":
        with _timed(seconds, "signals", progress):
            n_new = annotate_new(
                con, until=until, batch_rows=config.signal_batch_rows, progress=progress
            )
        backend = _duckdb_backend(con)
    else:
        with _timed(seconds, "signals", progress):
            backend, n_new = _spark_backend(con, until, progress)
    try:
        findings = _detect(con, backend, until, config, seconds, progress,
                           set(allow_accounts), set(allow_orgs), verdicts)
    finally:
        backend.close()
    findings.n_annotated = n_new
    _store_findings(con, findings)
    return findings


def replay(
    con: duckdb.DuckDBPyConnection,
    *,
    every: timedelta,
    until: datetime | None = None,
    start: datetime | None = None,
    progress: Progress | None = None,
    **scan_args,
) -> Findings:
    """Scan the log as it grew: `scan(until=t)` at every `every` from `start` (default: the
    first exchange's time) to `until` (default: the last exchange), so each flag carries the
    checkpoint that first saw it (the lab's day-by-day replay, in one call). A later `start`
    replays one window only (a release, a campaign's first day); flags it finds that earlier
    scans of the store did not make get a checkpoint inside the window, so times measured
    that way are upper bounds. Returns the last checkpoint's findings."""
    if every <= timedelta(0):
        raise ValueError("the replay step must be positive")
    first, last = con.execute("SELECT min(ts), max(ts) FROM exchanges").fetchone()
    if first is None:
        return scan(con, until=until, progress=progress, **scan_args)
    end = until or last
    t = max(first, start) + every if start is not None else first + every
    findings = None
    while True:
        t = min(t, end)
        findings = scan(con, until=t, progress=progress, **scan_args)
        if t >= end:
            return findings
        t += every


def _detect(con, backend, until, config, seconds, progress, allow_accounts, allow_orgs, verdicts):
    # every later stage reads the exchanges joined to their signals (fingerprints, evidence,
    # activity cells, attribution): join them once, in the backend, not once per aggregate;
    # the LSH bands, read by evidence and attribution only, come from the signals alone
    with _timed(seconds, "fingerprints", progress):
        view = exchange_view(backend.table("exchanges"), backend.table("signals"),
                             until=until).cache()
    bands = band_view(backend.table("signals"), until=until)
    try:
        return _detect_in(con, backend, view, bands, until, config, seconds, progress,
                          allow_accounts, allow_orgs, verdicts)
    finally:
        view.release()


def _detect_in(con, backend, view, bands, until, config, seconds, progress, allow_accounts,
               allow_orgs, verdicts):
    accounts_t = backend.table("accounts")
    with _timed(seconds, "fingerprints", progress):
        # one account order for every in-process stage (code-point order, as Python sorts)
        fp = _rounded(_arrow(account_fingerprints(view, accounts_t)).sort_by("account_id"))
        firsts = _arrow(model_first_seen(view))
    if fp.num_rows == 0:
        acc, cmp_, exc = camp.empty_findings()
        return Findings(acc, cmp_, exc, seconds, 0, until=until)
    n_exchanges = int(pc.sum(fp["n_exchanges"]).as_py())
    now = until or max(fp["last_ts"].to_pylist())
    with _timed(seconds, "evidence", progress):
        # only keys two accounts share leave the engine (most template and LSH keys are used
        # once); the hub discount still counts every key, so the per-account counts come along
        # in whatever order the engine returns them: every consumer numbers keys in sorted
        # order (`linking.encode_evidence`) or sorts what it reports
        cells = _arrow(activity_cells(view, bucket_minutes=config.sync_bucket_minutes))
        sync = sync_evidence(cells, min_cells=config.sync_min_cells)
        with evidence(view, accounts_t,
                      bands=bands if config.lsh_evidence else None).cache() as all_ev:
            shared = shared_evidence(all_ev).to_pyarrow_batches()
            ev = _dictionary_encoded(itertools.chain(shared, sync.to_batches()))
            counts = _arrow(key_counts(all_ev))
    names = fp["account_id"].to_pylist()
    # an in-memory store would spill to `.tmp` in the working directory: it keeps its memory
    graph_limit = config.duckdb_graph_memory_limit if _file_backed(con) else None
    with _memory_limit(con, graph_limit, best_effort=True):
        with _timed(seconds, "linking", progress):
            graph = config.linker.link(ev, names, counts)
        with _timed(seconds, "clustering", progress):
            label = leiden_clusters(graph, resolution=config.resolution,
                                    min_size=config.clusters.min_size)
            # dense blocks of *control* evidence: shared prompts, system prompts and synchrony
            # tie honest strangers by the thousand and would make one block of everyone
            block, _density = fraudar(_control_evidence(ev), names,
                                      max_df=config.linker.max_group)
    with _timed(seconds, "scoring", progress):
        scorer = BehaviourScorer()
        if verdicts:
            scorer.fit_supervised(fp, verdicts)
        behaviour = scorer.score(fp)
        members = _members(label)
        verdict_list = config.clusters.score(
            members, behaviour, _internal_weight(graph, label), _member_control(graph, label),
            block >= 0,
            # a core member's strongest control tie must lead to a member in the behavioural
            # tail itself (one of the operator's accounts), not to an ordinary neighbour
            member_max_control=_member_max_control(
                graph, label, behaviour.score > config.clusters.tail_threshold(behaviour)),
            signup_quantile=signup_quantiles(fp),
            member_owner=_member_control(graph, label, graph.owner_weight()),
        )
        verdict_list = _merge_flagged(
            verdict_list, label, _graph_ties(graph, _core_labels(verdict_list, len(names))),
            config.clusters.min_member_control)
        if config.merge_by_owned_keys:
            verdict_list = _merge_flagged(
                verdict_list, label,
                owned_key_ties(ev, names, _core_labels(verdict_list, len(names)), config.linker),
                config.clusters.min_member_control, note=_owned_keys_note)
        card_joined = _join_by_payment(verdict_list, ev, names, label)
    with _timed(seconds, "campaigns", progress):
        result = _campaigns(
            con, backend, view, bands, fp, ev, graph, label, block, behaviour, verdict_list, firsts,
            now, config, allow_accounts, allow_orgs, card_joined,
        )
    acc, cmp_, exc, allow_listed = result
    return Findings(acc, cmp_, exc, seconds, n_exchanges, allow_listed=allow_listed, until=until)


def _arrow(expr) -> pa.Table:
    """Materialise an Ibis expression as Arrow with timestamps normalised to ms UTC."""
    t = expr.to_pyarrow()
    cols = []
    for f in t.schema:
        col = t[f.name]
        if pa.types.is_timestamp(f.type):
            col = col.cast(contract.UTC_TS)
        cols.append(col)
    return pa.Table.from_arrays(cols, names=t.column_names)


def _dictionary_encoded(batches: Iterable[pa.RecordBatch]) -> pa.Table:
    """Evidence rows (EVIDENCE_SCHEMA) with every column dictionary-encoded, one dictionary per
    column, encoded as the batches arrive: the shared evidence of a 10M-exchange scan is 47M
    rows over 58K accounts and 3.2M keys, 2.3 GB as plain strings, and it stays in memory
    until the campaigns are written."""
    schema = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type))
                        for f in EVIDENCE_SCHEMA])
    parts = [pa.table({f.name: pc.dictionary_encode(b.cast(EVIDENCE_SCHEMA)[f.name])
                       for f in EVIDENCE_SCHEMA}, schema=schema) for b in batches]
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return pa.table({c: table[c].combine_chunks() for c in table.column_names}, schema=schema)


def _core_labels(verdicts: list[ClusterVerdict], n: int) -> np.ndarray:
    """Per vertex, the label of the flagged cluster whose core it is in (-1: none)."""
    core_label = np.full(n, -1, dtype=np.int64)
    for v in verdicts:
        if v.flagged:
            core_label[v.core] = v.label
    return core_label


def _graph_ties(graph: AccountGraph, core_label: np.ndarray) -> dict[tuple[int, int, int], float]:
    """Per (flagged cluster, other flagged cluster, core account of the first): the *control*
    weight of the account's graph edges into the other cluster's core. Shared prompts,
    templates, system prompts and synchrony (CONTENT_KINDS) do not count: two operators
    harvesting the same skill from the same public prompt sets share templates without sharing
    an owner."""
    a, b = core_label[graph.src], core_label[graph.dst]
    control = graph.control_weight()
    across = (a >= 0) & (b >= 0) & (a != b) & (control > 0)
    ties: dict[tuple[int, int, int], float] = {}
    for x, y, u, t, w in zip(a[across], b[across], graph.src[across], graph.dst[across],
                             control[across], strict=True):
        for account, own, other in ((int(u), x, y), (int(t), y, x)):
            ties[(own, other, account)] = ties.get((own, other, account), 0.0) + w
    return ties


def _merge_flagged(verdicts: list[ClusterVerdict], label: np.ndarray,
                   ties: Mapping[tuple[int, int, int], float], min_control: float,
                   min_fraction: float = 0.5,
                   note: Callable[[list[tuple[ClusterVerdict, int]]], str] | None = None,
                   ) -> list[ClusterVerdict]:
    """Merge flagged clusters when most of the smaller one's core (at least `min_fraction`) is
    tied to the larger one's core by at least `min_control` per account (`ties`: per (cluster,
    other cluster, core account of the first), `_graph_ties` or `linking.owned_key_ties`):
    modularity splits one operator's accounts along its payment instruments, the campaign is
    still one. Counted per account, not as the clusters' summed weight, because one operator's
    evidence is spread thin: a pool of addresses that every account rotates through leaves
    about one surviving graph edge per account between two of its card groups. Each cluster
    attaches only to its most strongly tied larger partner, so a small cluster tied to two
    campaigns cannot chain them together. `note([(joined cluster, its tied accounts), ...])`
    says why, once per merged campaign, in its reasons."""
    flagged = {v.label: v for v in verdicts if v.flagged}
    if len(flagged) < 2:
        return verdicts
    weight: dict[tuple[int, int], float] = {}
    tied_accounts: dict[tuple[int, int], int] = {}
    for (own, other, _), w in sorted(ties.items()):
        if own in flagged and other in flagged:
            weight[(own, other)] = weight.get((own, other), 0.0) + w
            if w >= min_control:
                tied_accounts[(own, other)] = tied_accounts.get((own, other), 0) + 1
    parent = {lab: lab for lab in flagged}

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    # each cluster attaches to the larger flagged cluster most of its core is tied to (the
    # largest share of tied accounts, then the most weight): a small cluster tied to two
    # campaigns joins one of them and never bridges the two into one
    size = {lab: (len(v.core), -lab) for lab, v in flagged.items()}
    best: dict[int, tuple[tuple[float, float], int]] = {}
    for (small, big), w in sorted(weight.items()):
        if size[small] >= size[big]:
            continue
        n_core = len(flagged[small].core)
        strength = (tied_accounts.get((small, big), 0) / n_core, w / n_core)
        if strength[0] >= min_fraction and strength > best.get(small, ((0.0, 0.0), -1))[0]:
            best[small] = (strength, big)
    for small, (_, big) in sorted(best.items()):
        parent[find(small)] = find(big)
    joined: dict[int, list[tuple[ClusterVerdict, int]]] = {}
    for small, ((share, _), _) in sorted(best.items()):
        joined.setdefault(find(small), []).append(
            (flagged[small], round(share * len(flagged[small].core))))
    groups: dict[int, list[ClusterVerdict]] = {}
    for lab, v in flagged.items():
        groups.setdefault(find(lab), []).append(v)
    merged = [v for v in verdicts if not v.flagged]
    for root, vs in groups.items():
        size_ = sum(len(v.members) for v in vs)
        merged.append(ClusterVerdict(
            root,
            np.concatenate([v.members for v in vs]),
            np.concatenate([v.core for v in vs]),
            max(v.score for v in vs),
            sum(v.cohesion * len(v.members) for v in vs) / size_,
            sum(v.control * len(v.members) for v in vs) / size_,
            sum(v.behaviour_percentile * len(v.members) for v in vs) / size_,
            True,
            min(v.cohort_p for v in vs),
            any(v.cohort for v in vs),
            [n for v in vs for n in v.notes]
            + ([note(joined[root])] if note is not None and root in joined else []),
        ))
        for v in vs:
            label[v.members] = root
    return merged


def _owned_keys_note(joined: list[tuple[ClusterVerdict, int]]) -> str:
    accounts = sum(len(v.core) for v, _ in joined)
    tied = sum(t for _, t in joined)
    groups = f"{len(joined)} group" + ("s" if len(joined) > 1 else "")
    return (f"joined {groups} of flagged accounts ({accounts} accounts): {tied} of "
            "them share addresses, prefixes, payment or sign-up details that flagged accounts "
            "own with the larger group each joined, spread too thin over pairs to make graph "
            "edges")


def _join_by_payment(verdicts: list[ClusterVerdict], ev: pa.Table, names: list[str],
                     label: np.ndarray) -> dict[int, str]:
    """Accounts paying with an instrument that mostly pays for one flagged campaign's core (at
    least half of the instrument's accounts) join that campaign: a shared card is the
    strongest evidence of common control there is, and modularity or a quiet account's
    ordinary behaviour should not leave part of an operator's fleet out. Returns, per joined
    vertex, the reason. Mutates the verdicts' members / core and `label` like `_merge_flagged`."""
    flagged = [v for v in verdicts if v.flagged]
    if not flagged:
        return {}
    pay = ev.filter(pc.equal(ev["kind"], "payment"))
    if pay.num_rows == 0:
        return {}
    index = {a: i for i, a in enumerate(names)}
    users: dict[str, list[int]] = {}
    for a, k in zip(pay["account_id"].to_pylist(), pay["key"].to_pylist(), strict=True):
        if a in index:
            users.setdefault(k, []).append(index[a])
    owner = {int(i): v for v in flagged for i in v.core}
    joined: dict[int, str] = {}
    extra: dict[int, list[int]] = {}
    for _key, idx in sorted(users.items()):
        idx = sorted(set(idx))
        by: dict[int, int] = {}
        for i in idx:
            if i in owner:
                by[owner[i].label] = by.get(owner[i].label, 0) + 1
        if not by:
            continue
        lab = max(sorted(by), key=lambda x: by[x])
        if 2 * by[lab] < len(idx):
            continue
        for i in idx:
            if i not in owner and i not in joined:
                joined[i] = (f"pays with the same payment instrument as {by[lab]} flagged "
                             f"accounts of its campaign (the instrument has {len(idx)} accounts)")
                extra.setdefault(lab, []).append(i)
    for v in flagged:
        add = np.array(sorted(extra.get(v.label, [])), dtype=np.int64)
        if add.size:
            v.members = np.union1d(v.members, add)
            v.core = np.union1d(v.core, add)
            label[add] = v.label
    return joined


def _rounded(table: pa.Table, digits: int = 6) -> pa.Table:
    """Round float columns so sums computed in a different order (Spark vs DuckDB) agree."""
    for i, f in enumerate(table.schema):
        if pa.types.is_floating(f.type):
            table = table.set_column(i, f.name, pc.round(table[f.name], digits))
    return table


def _members(label: np.ndarray) -> dict[int, np.ndarray]:
    out: dict[int, list[int]] = {}
    for i, lab in enumerate(label.tolist()):
        if lab >= 0:
            out.setdefault(lab, []).append(i)
    return {k: np.array(v) for k, v in out.items()}


def _internal_weight(graph: AccountGraph, label: np.ndarray) -> dict[int, float]:
    same = (label[graph.src] == label[graph.dst]) & (label[graph.src] >= 0)
    sums = np.bincount(label[graph.src][same], weights=graph.weight[same])
    return {i: float(w) for i, w in enumerate(sums)}


def _control_evidence(ev: pa.Table) -> pa.Table:
    """Evidence rows of control kinds only (not shared prompts, system prompts, synchrony)."""
    from distillguard.linking import CONTENT_KINDS

    return ev.filter(pc.invert(pc.is_in(ev["kind"], pa.array(sorted(CONTENT_KINDS)))))


def signup_quantiles(fp: pa.Table) -> np.ndarray:
    """Each account's sign-up time as a quantile of all accounts' sign-up times (average ranks,
    NaN when unknown): what `scoring.cohort_p_value` tests for batch creation."""
    if "created_at" not in fp.column_names:
        return np.full(fp.num_rows, np.nan)
    created = fp["created_at"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    known = ~pc.is_null(fp["created_at"]).to_numpy(zero_copy_only=False)
    out = np.full(fp.num_rows, np.nan)
    if known.any():
        from scipy.stats import rankdata

        out[known] = rankdata(created[known], method="average") / known.sum()
    return out


def _member_max_control(graph: AccountGraph, label: np.ndarray,
                        among: np.ndarray | None = None) -> np.ndarray:
    """Per vertex: its strongest control-evidence edge to a member of its own cluster (only to
    members with `among[j]` True when given: an honest user who shares a residential address
    with an ordinary neighbour is not tied to the campaign that neighbour's cluster holds)."""
    same = (label[graph.src] == label[graph.dst]) & (label[graph.src] >= 0)
    src, dst, w = graph.src[same], graph.dst[same], graph.control_weight()[same]
    out = np.zeros(len(graph.accounts))
    if among is None:
        np.maximum.at(out, src, w)
        np.maximum.at(out, dst, w)
    else:
        np.maximum.at(out, src, np.where(among[dst], w, 0.0))
        np.maximum.at(out, dst, np.where(among[src], w, 0.0))
    return out


def _member_control(graph: AccountGraph, label: np.ndarray,
                    weight: np.ndarray | None = None) -> np.ndarray:
    """Per vertex: control-evidence weight (or the given per-edge `weight`) of its edges to
    members of its own cluster."""
    same = (label[graph.src] == label[graph.dst]) & (label[graph.src] >= 0)
    w = (graph.control_weight() if weight is None else weight)[same]
    n = len(graph.accounts)
    return np.bincount(graph.src[same], weights=w, minlength=n) + np.bincount(
        graph.dst[same], weights=w, minlength=n
    )


def _prior(con: duckdb.DuckDBPyConnection) -> tuple[dict, dict, dict]:
    """Earlier findings in the store: account -> (first_flagged_at, campaign_id), campaign ->
    first_flagged_at, (campaign, model) -> pivot flagged_at."""
    accounts = {
        a: (f, c)
        for a, f, c in con.execute(
            "SELECT account_id, first_flagged_at, campaign_id FROM finding_accounts WHERE flagged"
        ).fetchall()
    }
    campaigns, pivots = {}, {}
    for cid, ffa, pv in con.execute(
        "SELECT campaign_id, first_flagged_at, pivots FROM finding_campaigns"
    ).fetchall():
        campaigns[cid] = ffa
        for p in pv or []:
            pivots[(cid, p["model"])] = p["flagged_at"]
    return accounts, campaigns, pivots


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _campaign_ids(
    verdicts: list[ClusterVerdict], names: list[str], prior_accounts: dict
) -> dict[int, str]:
    """Stable campaign ids: reuse the earlier id most of a cluster's accounts carried (larger
    clusters choose first), else a hash of its smallest member; never one id twice (a split
    campaign's smaller part may hold the member whose hash named the whole)."""
    ids: dict[int, str] = {}
    taken: set[str] = set()
    for v in sorted(verdicts, key=lambda v: -len(v.core)):
        if not v.flagged:
            continue
        votes: dict[str, int] = {}
        for i in v.core:
            prev = prior_accounts.get(names[i])
            if prev and prev[1]:
                votes[prev[1]] = votes.get(prev[1], 0) + 1
        best = max(sorted(votes), key=lambda c: votes[c], default=None)
        if best is None or best in taken:
            seed, attempt = min(names[i] for i in v.core), 0
            while best is None or best in taken:
                salted = seed if attempt == 0 else f"{seed}#{attempt}"
                best = "cmp-" + hashlib.sha1(salted.encode()).hexdigest()[:10]
                attempt += 1
        taken.add(best)
        ids[v.label] = best
    return ids


def _account_graph_reasons(
    graph: AccountGraph, label: np.ndarray, names: list[str]
) -> dict[int, list[str]]:
    """Per account: with how many same-cluster accounts it shares which evidence (counts)."""
    same = (label[graph.src] == label[graph.dst]) & (label[graph.src] >= 0)
    out: dict[int, list[str]] = {}
    if not same.any():
        return out
    src, dst = graph.src[same], graph.dst[same]
    from distillguard.linking import CONTENT_KINDS, KIND_LABELS

    n = len(names)
    peers = np.bincount(np.concatenate([src, dst]), minlength=n)
    per_kind = {
        k: np.bincount(np.concatenate([src, dst]), weights=np.concatenate([v[same], v[same]]),
                       minlength=n)
        for k, v in graph.shared.items()
    }
    for i in np.flatnonzero(peers):
        # control evidence (cards, addresses, sign-up) first: it is what ties an operator's
        # accounts; shared prompts come after, however many there are
        parts = [
            f"{int(per_kind[k][i])} {KIND_LABELS[k]}"
            for k in sorted(per_kind, key=lambda k: (k in CONTENT_KINDS, -per_kind[k][i], k))
            if per_kind[k][i] > 0
        ][:5]
        out[int(i)] = [
            f"linked to {int(peers[i])} accounts of its cluster by shared evidence "
            f"(shared-key counts summed over those links: {', '.join(parts)})"
        ]
    return out


def _campaigns(con, backend, view, bands, fp, ev, graph, label, block, behaviour: AccountScores,
               verdict_list, firsts, now, config, allow_accounts, allow_orgs, card_joined=None):
    names = fp["account_id"].to_pylist()
    orgs = fp["org_id"].to_pylist()
    allowed = np.array(
        [a in allow_accounts or (o is not None and o in allow_orgs) for a, o in
         zip(names, orgs, strict=True)]
    )
    prior_accounts, prior_campaigns, prior_pivots = _prior(con)
    ids = _campaign_ids(verdict_list, names, prior_accounts)
    by_label = {v.label: v for v in verdict_list}
    flagged = np.zeros(len(names), dtype=bool)
    campaign_of: dict[str, str] = {}
    for lab, cid in ids.items():
        for i in by_label[lab].core:
            if not allowed[i]:
                flagged[i] = True
                campaign_of[names[i]] = cid
    graph_reasons = _account_graph_reasons(graph, label, names)
    # account score: flagged accounts rank above all others; within each group, by cluster
    # evidence and behaviour (so the evaluator can compare at equal false-positive rates)
    cluster_score = np.zeros(len(names))
    for v in verdict_list:
        cluster_score[v.members] = v.score
    score = 0.5 * behaviour.percentile + 0.5 * cluster_score + flagged.astype(float)
    # per-exchange attribution
    ac = camp.owners_table(campaign_of)
    sigs = camp.campaign_signatures(ev, campaign_of)
    if ac.num_rows:
        attributed = _arrow(camp.attribute(view, backend.memtable(ac, "attribution_accounts"),
                                           backend.memtable(sigs, "attribution_signatures"),
                                           bands, dedicated_share=config.dedicated_share))
    else:
        attributed = pa.table({
            "request_id": pa.array([], pa.string()), "campaign_id": pa.array([], pa.string()),
            "account_id": pa.array([], pa.string()), "ts": pa.array([], contract.UTC_TS),
            "model": pa.array([], pa.string()), "capability": pa.array([], pa.string())})
    attributed = attributed.sort_by([("campaign_id", "ascending"), ("request_id", "ascending")])
    caps = camp.shares(attributed, "capability")
    models = camp.shares(attributed, "model")
    first_seen = {r["model"]: r["model_first_ts"] for r in firsts.to_pylist()}
    campaign_ffa = {cid: _earliest(prior_campaigns.get(cid), now) for cid in ids.values()}
    pivots = camp.pivots(attributed, first_seen, con=con)
    win = attributed.group_by("campaign_id").aggregate(
        [("ts", "min"), ("ts", "max"), ("request_id", "count")]
    )
    window = {r["campaign_id"]: r for r in win.to_pylist()}
    # account rows
    ffa_col, cid_col, reasons_col = [], [], []
    for i, a in enumerate(names):
        reasons = []
        cid = campaign_of.get(a)
        if flagged[i]:
            v = by_label[int(label[i])]
            reasons.append(
                f"member of campaign {cid}: {len(v.core)} accounts tied by rare shared "
                f"evidence (cohesion {v.cohesion:.1f}), median member behaviour at the "
                f"{100 * v.behaviour_percentile:.0f}th percentile of all accounts"
            )
            if card_joined and i in card_joined:
                reasons.append(card_joined[i])
            reasons += graph_reasons.get(i, [])
            if block[i] >= 0:
                reasons.append(f"in dense evidence block #{int(block[i])} (FRAUDAR)")
        if allowed[i]:
            reasons.append("allow-listed (licensed account or organisation): not flagged")
        reasons += behaviour.reasons(i)
        ffa_col.append(_earliest(prior_accounts.get(a, (None, None))[0], now) if flagged[i] else None)
        cid_col.append(cid)
        reasons_col.append(reasons)
    accounts_out = pa.table(
        {
            "account_id": names,
            "score": np.round(score, 6),
            "flagged": flagged,
            "first_flagged_at": pa.array(ffa_col, contract.UTC_TS),
            "campaign_id": pa.array(cid_col, pa.string()),
            "reasons": pa.array(reasons_col, pa.list_(pa.string())),
        },
        schema=contract.FINDING_ACCOUNT_SCHEMA,
    )
    # campaign rows
    campaign_indicators = camp.indicators(ev, campaign_of, con=con)
    rows = []
    for lab, cid in ids.items():
        v = by_label[lab]
        members = sorted(names[i] for i in v.core if not allowed[i])
        if not members:
            continue
        inds, infra_reasons = campaign_indicators[cid]
        w = window.get(cid, {})
        idx = np.array([i for i in v.core if not allowed[i]])
        rows.append({
            "campaign_id": cid,
            "score": round(v.score, 6),
            "accounts": members,
            "n_accounts": len(members),
            "n_exchanges": int(w.get("request_id_count", 0)),
            "first_seen": w.get("ts_min"),
            "last_seen": w.get("ts_max"),
            "first_flagged_at": campaign_ffa[cid],
            "capabilities": list(caps.get(cid, {}).items()),
            "models": list(models.get(cid, {}).items()),
            "pivots": [
                {"model": p["model"], "flagged_at": _earliest(prior_pivots.get((cid, p["model"])),
                                                              now)}
                for p in pivots.get(cid, [])
            ],
            "indicators": list(inds.items()),
            "reasons": _campaign_reasons(v, idx, behaviour, infra_reasons, allowed, v.core)
            + _cohort_reasons(v, fp, config.clusters.cohort_fraction)
            + [f"release pivot: {p['model']} reached {100 * p['share']:.0f}% of the campaign's "
               f"traffic in the 6 h window ending {p['reached_at']:%Y-%m-%d %H:%M} UTC"
               for p in pivots.get(cid, [])],
        })
    rows.sort(key=lambda r: (-r["n_accounts"], r["campaign_id"]))
    campaigns_out = pa.Table.from_pylist(rows, schema=contract.FINDING_CAMPAIGN_SCHEMA)
    exchanges_out = contract.conform(
        attributed.select(["request_id", "campaign_id"]), contract.FINDING_EXCHANGE_SCHEMA
    )
    allow_listed = sorted(names[i] for i in np.flatnonzero(allowed))
    return accounts_out, campaigns_out, exchanges_out, allow_listed


def _cohort_reasons(v: ClusterVerdict, fp: pa.Table, fraction: float) -> list[str]:
    """'sign-up cohort: k of its n accounts were created within H h (chance p = ...)'."""
    if not v.cohort or "created_at" not in fp.column_names:
        return []
    created = fp["created_at"].take(pa.array(v.core)).drop_null().cast(pa.int64())
    t = np.sort(created.to_numpy(zero_copy_only=False))
    k = max(3, int(np.ceil(fraction * t.size)))
    if t.size < k:
        return []
    hours = float(np.min(t[k - 1:] - t[: t.size - k + 1])) / 3.6e6
    return [f"sign-up cohort: {k} of its {t.size} accounts were created within {hours:.0f} h "
            f"of each other (chance p = {v.cohort_p:.1e} against the population's sign-ups)"]


def _campaign_reasons(v: ClusterVerdict, idx, behaviour: AccountScores, infra_reasons,
                      allowed, all_members) -> list[str]:
    reasons = [
        f"{len(idx)} accounts tied by rare shared evidence: mean evidence weight per account "
        f"{v.cohesion:.1f}; median member behaviour at the {100 * v.behaviour_percentile:.0f}th "
        "percentile of all accounts"
    ]
    from distillguard.scoring import BEHAVIOUR_FEATURES

    feats = []
    for name, _, _, text in BEHAVIOUR_FEATURES:
        contrib = float(np.median(behaviour.contributions[name][idx])) if idx.size else 0.0
        if contrib >= 0.5:
            med = float(np.median(behaviour.values[name][idx]))
            feats.append((contrib, f"{text}: campaign median {med:.3g} vs population "
                                   f"{behaviour.medians[name]:.3g}"))
    reasons += [t for _, t in sorted(feats, key=lambda x: -x[0])[:5]]
    reasons += infra_reasons[:6]
    reasons += v.notes
    n_allowed = int(allowed[all_members].sum())
    if n_allowed:
        reasons.append(f"{n_allowed} allow-listed accounts of this cluster were left out")
    return reasons


def _store_findings(con: duckdb.DuckDBPyConnection, findings: Findings) -> None:
    """Replace the store's finding tables with this scan's findings (one transaction)."""
    with transaction(con):
        for name, table in (
            ("finding_accounts", findings.accounts),
            ("finding_campaigns", findings.campaigns),
            ("finding_exchanges", findings.exchanges),
        ):
            con.register("_findings", table)
            con.execute(f"DELETE FROM {name}")
            con.execute(f"INSERT INTO {name} SELECT * FROM _findings")
            con.unregister("_findings")


def parse_until(text: str | None) -> datetime | None:
    """Parse an RFC 3339 timestamp (a trailing Z is accepted; no zone means UTC)."""
    if text is None:
        return None
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)
