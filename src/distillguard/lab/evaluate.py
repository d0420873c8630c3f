"""Score any detector's findings against the traffic lab's ground truth.

The evaluator is the measuring stick for every detector, so it is deliberately strict about
its inputs (a malformed findings file is a clear error, never a silent zero) and computes every
metric from one code path: the detector's findings and the baselines' findings
(`distillguard.lab.baselines`) go through the same `score_findings`. The metric definitions
are pinned down in `docs/findings-format.md`; keep the two in step.

All heavy lifting (joins of millions of exchanges with the labels) runs in DuckDB over the
Parquet files; Python only sees per-account and per-campaign aggregates.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from sklearn.metrics import adjusted_rand_score, average_precision_score, roc_auc_score

from distillguard import contract

MS_PER_HOUR = 3_600_000

#: Label given to an attacking account that has no found campaign (unflagged, or flagged
#: without a campaign id): each such account is its own singleton cluster in the ARI.
_SINGLETON = "\x00singleton:"


class EvalInputError(ValueError):
    """Truth, findings or logs are missing or malformed; the message names the file and why."""


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Findings:
    """What a detector found, typed by the contract's FINDING_* schemas.

    `exchanges` is the optional per-exchange attribution; without it every exchange of a
    flagged account counts as attributed to that account's campaign.
    """

    accounts: pa.Table
    campaigns: pa.Table
    exchanges: pa.Table | None = None
    source: str = ""

    @classmethod
    def from_accounts(cls, accounts: pa.Table, source: str = "") -> Findings:
        """Findings with accounts only (no campaigns): what a non-clustering detector writes."""
        campaigns = contract.empty_table(contract.FINDING_CAMPAIGN_SCHEMA)
        return _validated({"accounts": accounts, "campaigns": campaigns}, source or "findings")


_FINDING_PARTS: dict[str, tuple[pa.Schema, bool]] = {
    # name -> (schema, required)
    "accounts": (contract.FINDING_ACCOUNT_SCHEMA, True),
    "campaigns": (contract.FINDING_CAMPAIGN_SCHEMA, True),
    "exchanges": (contract.FINDING_EXCHANGE_SCHEMA, False),
}


def _conform(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    """`contract.conform`, but every failure names the file and the column.

    Timestamps are cast unsafely (ns -> ms truncation is expected, not an error).
    """
    columns = {}
    for fld in schema:
        if fld.name not in table.column_names:
            if not fld.nullable:
                raise EvalInputError(f"{source}: required column {fld.name!r} is missing")
            continue
        column = table[fld.name]
        try:
            safe = not pa.types.is_timestamp(fld.type)
            column = column.cast(fld.type, safe=safe)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise EvalInputError(
                f"{source}: column {fld.name!r} has type {table[fld.name].type}, "
                f"expected {fld.type} ({exc})"
            ) from exc
        if not fld.nullable and column.null_count:
            raise EvalInputError(f"{source}: column {fld.name!r} has {column.null_count} nulls")
        columns[fld.name] = column
    return contract.conform(pa.table(columns) if columns else pa.table({}), schema)


def _check_unique(table: pa.Table, key: str, source: str) -> None:
    distinct = pc.count_distinct(table[key]).as_py()
    if distinct != table.num_rows:
        raise EvalInputError(
            f"{source}: {table.num_rows - distinct} duplicate {key} values (each must appear once)"
        )


def _validated(parts: dict[str, pa.Table | None], source: str) -> Findings:
    tables: dict[str, pa.Table | None] = {}
    for name, (schema, required) in _FINDING_PARTS.items():
        table = parts.get(name)
        if table is None:
            if required:
                raise EvalInputError(f"{source}: no {name} (the findings format requires it)")
            tables[name] = None
            continue
        tables[name] = _conform(table, schema, f"{source}: {name}")
    _check_unique(tables["accounts"], "account_id", f"{source}: accounts")
    _check_unique(tables["campaigns"], "campaign_id", f"{source}: campaigns")
    if tables["exchanges"] is not None and tables["exchanges"].num_rows == 0:
        # No attribution listed: fall back to per-account attribution, so flagging an account
        # without attributing its exchanges cannot hide its honest traffic.
        tables["exchanges"] = None
    if tables["exchanges"] is not None:
        _check_unique(tables["exchanges"], "request_id", f"{source}: exchanges")
    return Findings(tables["accounts"], tables["campaigns"], tables["exchanges"], source)


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EvalInputError(f"{path}: not a readable Parquet file ({exc})") from exc


def _rows_from_json(rows: Any, schema: pa.Schema, source: str) -> pa.Table:
    """JSON rows -> Arrow: ISO 8601 timestamps parsed, objects accepted for map fields."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalInputError(f"{source}: expected a list of objects")
    timestamp_fields = {f.name for f in schema if pa.types.is_timestamp(f.type)}
    map_fields = {f.name for f in schema if pa.types.is_map(f.type)}
    pivots = "pivots" if "pivots" in schema.names else None
    cleaned = []
    for number, row in enumerate(rows, 1):
        try:
            out = {}
            for key, value in row.items():
                if key in timestamp_fields and isinstance(value, str):
                    value = datetime.fromisoformat(value)
                elif key in map_fields and isinstance(value, dict):
                    value = list(value.items())
                elif key == pivots and isinstance(value, list):
                    value = [
                        {**p, "flagged_at": datetime.fromisoformat(p["flagged_at"])}
                        if isinstance(p, dict) and isinstance(p.get("flagged_at"), str)
                        else p
                        for p in value
                    ]
                out[key] = value
            cleaned.append(out)
        except (ValueError, TypeError) as exc:
            raise EvalInputError(f"{source}: row {number}: bad timestamp ({exc})") from exc
    if not cleaned:
        return contract.empty_table(schema)
    nullable_schema = pa.schema([f.with_nullable(True) for f in schema])
    try:
        return pa.Table.from_pylist(cleaned, schema=nullable_schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise EvalInputError(f"{source}: {exc}") from exc


def load_findings(path: str | Path) -> Findings:
    """Read a findings directory (Parquet, the primary format) or a single JSON file.

    Raises EvalInputError with the file and the reason when anything is missing or malformed.
    """
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: findings not found")
    if path.is_dir():
        parts: dict[str, pa.Table | None] = {}
        for name in _FINDING_PARTS:
            file = path / f"{name}.parquet"
            parts[name] = _read_parquet(file) if file.exists() else None
        return _validated(parts, str(path))
    try:
        document = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise EvalInputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise EvalInputError(f"{path}: expected a JSON object with accounts/campaigns")
    parts = {
        name: _rows_from_json(document[name], schema, f"{path}: {name}")
        if name in document
        else None
        for name, (schema, _) in _FINDING_PARTS.items()
    }
    return _validated(parts, str(path))


def load_findings_from_store(db_path: str | Path) -> Findings:
    """Read the findings a scan left in the store's finding_* tables."""
    from distillguard import store  # the store is only needed for this entry point

    try:
        con = store.connect(db_path, read_only=True)
    except (FileNotFoundError, duckdb.Error) as exc:
        raise EvalInputError(f"{db_path}: cannot open the store ({exc})") from exc
    try:
        parts = {
            name: con.execute(f"SELECT * FROM finding_{name}").arrow().read_all()
            for name in _FINDING_PARTS
        }
    except duckdb.Error as exc:
        raise EvalInputError(f"{db_path}: no findings tables ({exc})") from exc
    finally:
        con.close()
    return _validated(parts, f"{db_path} (store)")


def write_findings(findings: Findings, out_dir: str | Path) -> Path:
    """Write `findings` as a findings directory (the format `load_findings` reads)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(findings.accounts, out_dir / "accounts.parquet")
    pq.write_table(findings.campaigns, out_dir / "campaigns.parquet")
    if findings.exchanges is not None:
        pq.write_table(findings.exchanges, out_dir / "exchanges.parquet")
    return out_dir


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB whose day boundaries and timestamp output are UTC."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    return con


@dataclass
class Truth:
    """The lab's labels, loaded once and shared by every detector scored on the run."""

    dir: Path
    accounts: pa.Table
    campaigns: pa.Table
    exchanges_path: Path
    #: per (account_id, campaign_id) exchange counts: all implicit attribution needs
    account_exchanges: pa.Table
    con: duckdb.DuckDBPyConnection = field(repr=False)

    @property
    def honest_account_ids(self) -> pa.Array:
        mask = pc.invert(self.accounts["is_attack"])
        return self.accounts.filter(mask)["account_id"].combine_chunks()


def load_truth(truth_dir: str | Path) -> Truth:
    """Read `truth/` as the simulator writes it (schemas in contract.TRUTH_*)."""
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise EvalInputError(f"{truth_dir}: truth directory not found")
    tables = {}
    for name, schema in (
        ("accounts", contract.TRUTH_ACCOUNT_SCHEMA),
        ("campaigns", contract.TRUTH_CAMPAIGN_SCHEMA),
        ("exchanges", contract.TRUTH_EXCHANGE_SCHEMA),
    ):
        file = truth_dir / f"{name}.parquet"
        if not file.exists():
            raise EvalInputError(f"{file}: missing (is {truth_dir} a lab truth/ directory?)")
        if name == "exchanges":  # possibly tens of millions of rows: only its schema is read
            found = pq.read_schema(file)
            missing = [f.name for f in schema if f.name not in found.names]
            if missing:
                raise EvalInputError(f"{file}: missing columns {missing}")
            continue
        tables[name] = _conform(_read_parquet(file), schema, str(file))
    _check_unique(tables["accounts"], "account_id", str(truth_dir / "accounts.parquet"))
    con = duckdb_connection()
    exchanges_path = truth_dir / "exchanges.parquet"
    account_exchanges = con.execute(
        "SELECT account_id, campaign_id, count(*)::BIGINT AS n FROM read_parquet(?) GROUP BY ALL",
        [str(exchanges_path)],
    ).arrow().read_all()
    return Truth(
        dir=truth_dir,
        accounts=tables["accounts"],
        campaigns=tables["campaigns"],
        exchanges_path=exchanges_path,
        account_exchanges=account_exchanges,
        con=con,
    )


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass
class AccountMetrics:
    """Account-level confusion counts and rates; an account is positive if truth is_attack."""

    n_accounts: int
    n_attack: int
    n_honest: int
    n_flagged: int
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float | None  # None when nothing is flagged
    recall: float | None  # None when there is no attacking account
    f1: float | None
    fpr: float | None
    roc_auc: float | None  # of the account scores (unlisted accounts score lowest)
    average_precision: float | None


@dataclass
class PopulationMetrics:
    """False positives within one population (attacking accounts of a mixed population apart)."""

    population: str
    n_honest: int
    flagged_honest: int
    fpr: float | None
    n_attack: int
    flagged_attack: int


@dataclass
class CampaignMetrics:
    """One true campaign: how much of it was found, attributed, and how fast."""

    campaign_id: str
    kind: str
    n_accounts: int
    flagged_accounts: int
    recall: float | None
    n_exchanges: int
    exchanges_flagged: int  # attributed to any found campaign / on a flagged account
    exchanges_attributed: int  # attributed to a found campaign mapped to this campaign
    attributed_share: float | None
    found_campaigns: list[str]  # found campaign ids mapped to this campaign
    hours_to_first: float | None  # None: none of its accounts was ever flagged
    hours_to_50pct: float | None  # None: 50 % of its accounts were never flagged
    hours_to_90pct: float | None
    pivot_model: str | None
    hours_to_pivot: float | None  # None: no pivot, or the pivot was never flagged


@dataclass
class ExchangeMetrics:
    """Exchange-level attribution; `mode` says whether per-exchange attribution was given."""

    mode: str  # "per-exchange" or "per-account"
    n_attack: int
    n_honest: int
    attack_flagged: int
    attack_attributed: int
    honest_flagged: int
    attack_flagged_share: float | None
    attack_attributed_share: float | None  # the headline: right campaign
    honest_wrong_share: float | None


@dataclass
class ClusterMetrics:
    """Found campaigns against true campaigns (see docs/findings-format.md for the rules)."""

    ari: float | None  # all attacking accounts; unfound ones are singletons
    ari_flagged: float | None  # attacking accounts flagged with a campaign id only
    n_found_campaigns: int
    n_mapped: int  # found campaigns whose attack exchanges map to a true campaign
    n_unmapped: int  # found campaigns with no attack exchange at all
    true_campaigns_found: int  # true campaigns with at least one found campaign mapped
    mapping: dict[str, str | None]


@dataclass
class DetectorScore:
    """Every metric for one detector at one operating point."""

    name: str
    operating_point: str
    threshold: float | None
    account: AccountMetrics
    populations: list[PopulationMetrics]
    campaigns: list[CampaignMetrics]
    exchange: ExchangeMetrics
    cluster: ClusterMetrics
    note: str = ""


def _hours(ms: int | None, start_ms: int) -> float | None:
    return None if ms is None else max(0, ms - start_ms) / MS_PER_HOUR


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[tuple]:
    return con.execute(sql, params or []).fetchall()


def score_findings(
    truth: Truth,
    findings: Findings,
    name: str,
    operating_point: str = "as written",
    threshold: float | None = None,
    warnings: list[str] | None = None,
) -> DetectorScore:
    """Every metric of `findings` against `truth` (definitions: docs/findings-format.md)."""
    warnings = warnings if warnings is not None else []
    con = truth.con
    con.register("t_accounts", truth.accounts)
    con.register("t_campaigns", truth.campaigns)
    con.register("t_account_ex", truth.account_exchanges)
    con.register("f_accounts", findings.accounts)
    con.register("f_campaigns", findings.campaigns)
    try:
        unknown = _fetch(
            con,
            "SELECT count(*) FROM f_accounts WHERE account_id NOT IN "
            "(SELECT account_id FROM t_accounts)",
        )[0][0]
        if unknown:
            warnings.append(f"{name}: {unknown} finding accounts are not in the truth (ignored)")
        con.execute(
            """CREATE OR REPLACE TEMP TABLE joined AS
            SELECT t.account_id, t.population, t.is_attack, t.campaign_id AS true_c,
                   coalesce(f.flagged, false) AS flagged, f.score,
                   epoch_ms(f.first_flagged_at) AS flagged_ms,
                   CASE WHEN f.flagged THEN f.campaign_id END AS found_c
            FROM t_accounts t LEFT JOIN f_accounts f USING (account_id)"""
        )
        undated = _fetch(
            con, "SELECT count(*) FROM joined WHERE flagged AND flagged_ms IS NULL"
        )[0][0]
        if undated:
            warnings.append(
                f"{name}: {undated} flagged accounts have no first_flagged_at "
                "(they count as flagged, but not towards time to detection)"
            )
        undescribed = _fetch(
            con,
            """SELECT count(DISTINCT found_c) FROM joined WHERE found_c IS NOT NULL
               AND found_c NOT IN (SELECT campaign_id FROM f_campaigns)""",
        )[0][0]
        if undescribed:
            warnings.append(
                f"{name}: {undescribed} campaign ids of flagged accounts have no row in "
                "campaigns (scored from the accounts; no pivots)"
            )
        account = _account_metrics(con)
        populations = _population_metrics(con)
        contingency, unknown_requests = _contingency(con, truth, findings)
        if unknown_requests:
            warnings.append(
                f"{name}: {unknown_requests} attributed request ids are not in the truth (ignored)"
            )
        mapping = _map_found_campaigns(contingency, con)
        exchange = _exchange_metrics(contingency, mapping, findings)
        cluster = _cluster_metrics(con, mapping)
        campaigns = _campaign_metrics(con, contingency, mapping)
    finally:
        for view in ("t_accounts", "t_campaigns", "t_account_ex", "f_accounts", "f_campaigns"):
            con.unregister(view)
        con.execute("DROP TABLE IF EXISTS joined")
    return DetectorScore(
        name, operating_point, threshold, account, populations, campaigns, exchange, cluster
    )


def _account_metrics(con: duckdb.DuckDBPyConnection) -> AccountMetrics:
    tp, fp, fn, tn = _fetch(
        con,
        """SELECT count(*) FILTER (is_attack AND flagged), count(*) FILTER (NOT is_attack AND flagged),
                  count(*) FILTER (is_attack AND NOT flagged),
                  count(*) FILTER (NOT is_attack AND NOT flagged) FROM joined""",
    )[0]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    columns = con.execute(
        "SELECT is_attack, score IS NOT NULL AS listed, coalesce(score, 0) AS score FROM joined"
    ).fetchnumpy()
    labels = np.asarray(columns["is_attack"], dtype=bool)
    listed = np.asarray(columns["listed"], dtype=bool)
    scores = np.asarray(columns["score"], dtype=float)
    # Accounts the detector did not list score below every listed one.
    floor = scores[listed].min() - 1 if listed.any() else 0.0
    scores = np.where(listed, scores, floor)
    both_classes = 0 < labels.sum() < len(labels)
    return AccountMetrics(
        n_accounts=tp + fp + fn + tn,
        n_attack=tp + fn,
        n_honest=fp + tn,
        n_flagged=tp + fp,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        precision=precision,
        recall=recall,
        f1=f1,
        fpr=_ratio(fp, fp + tn),
        roc_auc=float(roc_auc_score(labels, scores)) if both_classes else None,
        average_precision=float(average_precision_score(labels, scores))
        if both_classes
        else None,
    )


def _population_metrics(con: duckdb.DuckDBPyConnection) -> list[PopulationMetrics]:
    rows = _fetch(
        con,
        """SELECT population, count(*) FILTER (NOT is_attack),
                  count(*) FILTER (NOT is_attack AND flagged),
                  count(*) FILTER (is_attack), count(*) FILTER (is_attack AND flagged)
           FROM joined GROUP BY population ORDER BY population""",
    )
    return [
        PopulationMetrics(pop, n_h, f_h, _ratio(f_h, n_h), n_a, f_a)
        for pop, n_h, f_h, n_a, f_a in rows
    ]


Contingency = list[tuple[str | None, bool, str | None, int]]


def _contingency(
    con: duckdb.DuckDBPyConnection, truth: Truth, findings: Findings
) -> tuple[Contingency, int]:
    """Exchange counts by (true campaign, attributed?, found campaign): every exchange metric
    and the found -> true campaign mapping are read off this small table. Also returns how
    many attributed request ids are unknown to the truth."""
    if findings.exchanges is not None:
        con.register("f_exchanges", findings.exchanges)
        try:
            unknown = _fetch(
                con,
                "SELECT count(*) FROM f_exchanges e ANTI JOIN read_parquet(?) t USING (request_id)",
                [str(truth.exchanges_path)],
            )[0][0]
            rows = _fetch(
                con,
                """SELECT t.campaign_id, e.request_id IS NOT NULL, e.campaign_id, count(*)
                   FROM read_parquet(?) t LEFT JOIN f_exchanges e USING (request_id)
                   GROUP BY ALL""",
                [str(truth.exchanges_path)],
            )
        finally:
            con.unregister("f_exchanges")
        return rows, unknown
    rows = _fetch(
        con,
        """SELECT c.campaign_id, j.flagged, j.found_c, sum(c.n)::BIGINT
           FROM t_account_ex c JOIN joined j USING (account_id) GROUP BY ALL""",
    )
    return rows, 0


def _map_found_campaigns(
    contingency: Contingency, con: duckdb.DuckDBPyConnection
) -> dict[str, str | None]:
    """Found campaign -> the true campaign holding most of its attributed attack exchanges
    (ties: smallest id), or None when it holds no attack exchange."""
    overlap: dict[str, dict[str, int]] = defaultdict(dict)
    found_ids = {
        row[0]
        for row in _fetch(
            con,
            """SELECT campaign_id FROM f_campaigns UNION
               SELECT found_c FROM joined WHERE found_c IS NOT NULL""",
        )
    }
    for true_c, attributed, found_c, n in contingency:
        if not attributed or found_c is None:
            continue
        found_ids.add(found_c)
        if true_c is not None:
            overlap[found_c][true_c] = overlap[found_c].get(true_c, 0) + n
    return {
        found: min(overlap[found].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        if overlap.get(found)
        else None
        for found in sorted(found_ids)
    }


def _exchange_metrics(
    contingency: Contingency, mapping: dict[str, str | None], findings: Findings
) -> ExchangeMetrics:
    n_attack = n_honest = attack_flagged = attack_attributed = honest_flagged = 0
    for true_c, attributed, found_c, n in contingency:
        if true_c is None:
            n_honest += n
            honest_flagged += n if attributed else 0
        else:
            n_attack += n
            attack_flagged += n if attributed else 0
            right = attributed and found_c is not None and mapping.get(found_c) == true_c
            attack_attributed += n if right else 0
    return ExchangeMetrics(
        mode="per-exchange" if findings.exchanges is not None else "per-account",
        n_attack=n_attack,
        n_honest=n_honest,
        attack_flagged=attack_flagged,
        attack_attributed=attack_attributed,
        honest_flagged=honest_flagged,
        attack_flagged_share=_ratio(attack_flagged, n_attack),
        attack_attributed_share=_ratio(attack_attributed, n_attack),
        honest_wrong_share=_ratio(honest_flagged, n_honest),
    )


def _cluster_metrics(
    con: duckdb.DuckDBPyConnection, mapping: dict[str, str | None]
) -> ClusterMetrics:
    rows = _fetch(
        con,
        "SELECT account_id, true_c, found_c FROM joined WHERE is_attack ORDER BY account_id",
    )
    ari = ari_flagged = None
    if rows:
        true_labels = [r[1] or f"{_SINGLETON}{r[0]}" for r in rows]
        found_labels = [r[2] if r[2] is not None else f"{_SINGLETON}{r[0]}" for r in rows]
        ari = float(adjusted_rand_score(true_labels, found_labels))
        kept = [i for i, r in enumerate(rows) if r[2] is not None]
        if kept:
            ari_flagged = float(
                adjusted_rand_score([true_labels[i] for i in kept], [found_labels[i] for i in kept])
            )
    mapped = [t for t in mapping.values() if t is not None]
    return ClusterMetrics(
        ari=ari,
        ari_flagged=ari_flagged,
        n_found_campaigns=len(mapping),
        n_mapped=len(mapped),
        n_unmapped=len(mapping) - len(mapped),
        true_campaigns_found=len(set(mapped)),
        mapping=mapping,
    )


def _kth_hours(times: list[int], n: int, share: float, start_ms: int) -> float | None:
    k = math.ceil(share * n)
    return _hours(times[k - 1], start_ms) if n and len(times) >= k else None


def _campaign_metrics(
    con: duckdb.DuckDBPyConnection, contingency: Contingency, mapping: dict[str, str | None]
) -> list[CampaignMetrics]:
    members = {
        c: (n, flagged, times or [])
        for c, n, flagged, times in _fetch(
            con,
            """SELECT true_c, count(*), count(*) FILTER (flagged),
                      list(flagged_ms ORDER BY flagged_ms) FILTER (flagged AND flagged_ms IS NOT NULL)
               FROM joined WHERE is_attack AND true_c IS NOT NULL GROUP BY true_c""",
        )
    }
    exchanges: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for true_c, attributed, found_c, n in contingency:
        if true_c is None:
            continue
        counts = exchanges[true_c]
        counts[0] += n
        counts[1] += n if attributed else 0
        counts[2] += n if attributed and found_c is not None and mapping.get(found_c) == true_c else 0
    pivots: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for found_c, model, flagged_ms in _fetch(
        con,
        """SELECT campaign_id, p.model, epoch_ms(p.flagged_at)
           FROM (SELECT campaign_id, unnest(pivots) AS p FROM f_campaigns)
           WHERE p.flagged_at IS NOT NULL""",
    ):
        if mapping.get(found_c) is not None:
            pivots[mapping[found_c]].append((model, flagged_ms))
    out = []
    for c, kind, start_ms, pivot_model, pivot_ms in _fetch(
        con,
        """SELECT campaign_id, kind, epoch_ms(start), pivot_model, epoch_ms(pivot_start)
           FROM t_campaigns ORDER BY start, campaign_id""",
    ):
        n, flagged, times = members.get(c, (0, 0, []))
        n_ex, ex_flagged, ex_attributed = exchanges.get(c, (0, 0, 0))
        hours_to_pivot = None
        if pivot_model is not None and pivot_ms is not None:
            hits = [ms for model, ms in pivots.get(c, []) if model == pivot_model]
            hours_to_pivot = _hours(min(hits), pivot_ms) if hits else None
        out.append(
            CampaignMetrics(
                campaign_id=c,
                kind=kind,
                n_accounts=n,
                flagged_accounts=flagged,
                recall=_ratio(flagged, n),
                n_exchanges=n_ex,
                exchanges_flagged=ex_flagged,
                exchanges_attributed=ex_attributed,
                attributed_share=_ratio(ex_attributed, n_ex),
                found_campaigns=sorted(f for f, t in mapping.items() if t == c),
                hours_to_first=_hours(times[0], start_ms) if times else None,
                hours_to_50pct=_kth_hours(times, n, 0.5, start_ms),
                hours_to_90pct=_kth_hours(times, n, 0.9, start_ms),
                pivot_model=pivot_model,
                hours_to_pivot=hours_to_pivot,
            )
        )
    return out


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """The detector's scores, the baselines' scores on the same run, and any warnings."""

    truth_dir: str
    findings: str | None
    detector: DetectorScore | None
    baselines: list[DetectorScore]
    warnings: list[str] = field(default_factory=list)
    generated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def scores(self) -> list[DetectorScore]:
        return ([self.detector] if self.detector else []) + self.baselines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def evaluate(
    truth_dir: str | Path,
    findings_dir: str | Path | Findings | None,
    logs_dir: str | Path | None = None,
    baselines: bool = True,
    *,
    seed: int = 0,
    baseline_findings_dir: str | Path | None = None,
    baseline_fprs: Sequence[float] = (),
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Score `findings_dir` (a findings directory, JSON file or loaded `Findings`; None:
    baselines only) against
    the labels in `truth_dir`, with the two baselines computed from the logs beside it
    (`logs_dir`, default the parent of `truth_dir`) at their natural operating point and,
    when a detector is given, re-thresholded to the detector's false-positive rate.

    `baseline_findings_dir`, if given, receives each baseline's natural-point findings as a
    findings directory (`DIR/<baseline name>/`), so they can be inspected or re-scored.
    `baseline_fprs` adds operating points: each baseline re-thresholded to each of these FPRs.
    """
    step = progress or (lambda _message: None)
    warnings: list[str] = []
    step("reading truth")
    truth = load_truth(truth_dir)
    try:
        detector = None
        if findings_dir is not None:
            step("scoring findings")
            findings = (
                findings_dir if isinstance(findings_dir, Findings) else load_findings(findings_dir)
            )
            detector = score_findings(truth, findings, "detector", warnings=warnings)
        baseline_scores = (
            _score_baselines(
                truth,
                Path(logs_dir) if logs_dir is not None else Path(truth_dir).resolve().parent,
                ([("matched FPR", detector.account.fpr)] if detector else [])
                + [(f"FPR {fpr:.2%}", fpr) for fpr in baseline_fprs],
                seed,
                baseline_findings_dir,
                step,
                warnings,
            )
            if baselines
            else []
        )
    finally:
        truth.con.close()
    return EvalReport(
        truth_dir=str(truth_dir),
        findings=None
        if findings_dir is None
        else findings_dir.source
        if isinstance(findings_dir, Findings)
        else str(findings_dir),
        detector=detector,
        baselines=baseline_scores,
        warnings=warnings,
    )


def _score_baselines(
    truth: Truth,
    logs: Path,
    targets: list[tuple[str, float | None]],
    seed: int,
    findings_dir: str | Path | None,
    step: Callable[[str], None],
    warnings: list[str],
) -> list[DetectorScore]:
    """Both baselines at their natural threshold and re-thresholded to each (name, FPR) target
    (the detector's FPR first, when there is a detector)."""
    from distillguard.lab import baselines  # it imports Findings from this module

    makers = {
        "volume threshold": lambda: baselines.volume_threshold_baseline(
            logs, truth.honest_account_ids
        ),
        "isolation forest": lambda: baselines.isolation_forest_baseline(logs, seed=seed),
    }
    scores = []
    for label, make in makers.items():
        step(f"baseline: {label}")
        result = make()
        natural = result.findings_at()
        if findings_dir is not None:
            write_findings(natural, Path(findings_dir) / result.name)
        score = score_findings(truth, natural, result.name, "natural", result.threshold, warnings)
        score.note = result.description
        scores.append(score)
        for point, target_fpr in targets:
            if target_fpr is None:  # a detector on a run without honest accounts
                continue
            threshold = result.threshold_for_fpr(truth.honest_account_ids, target_fpr)
            matched = score_findings(
                truth, result.findings_at(threshold), result.name, point, threshold, warnings
            )
            matched.note = f"re-thresholded to the honest FPR nearest {target_fpr:.5f}"
            scores.append(matched)
    return scores


def _pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "—" if value is None else format(value, fmt)


def _hours_text(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} h"


def _label(score: DetectorScore) -> str:
    return score.name if score.operating_point == "as written" else (
        f"{score.name} ({score.operating_point})"
    )


def render_report(report: EvalReport, console: Console | None = None) -> None:
    """Print side by side, for the detector and every baseline operating point: the summary,
    FPR per honest population, and per campaign recall, attribution and time to detection."""
    console = console or Console()
    scores = report.scores
    if not scores:
        console.print("nothing to score (no findings and baselines disabled)")
        return
    summary = Table(title="Detector vs baselines (account level, exchange level, clusters)")
    for column in (
        "detector", "threshold", "flagged", "precision", "recall", "F1", "FPR", "ROC AUC",
        "attack exch. flagged", "attack exch. right campaign", "honest exch. flagged", "ARI",
        "campaigns 50% flagged",
    ):
        summary.add_column(column, justify="left" if column == "detector" else "right")
    for s in scores:
        a = s.account
        summary.add_row(
            _label(s), _num(s.threshold, ".4g"), f"{a.n_flagged:,}", _pct(a.precision),
            _pct(a.recall), _num(a.f1), _pct(a.fpr, 3), _num(a.roc_auc),
            _pct(s.exchange.attack_flagged_share), _pct(s.exchange.attack_attributed_share),
            _pct(s.exchange.honest_wrong_share, 3),
            _num(s.cluster.ari),
            f"{sum(c.hours_to_50pct is not None for c in s.campaigns)}/{len(s.campaigns)}",
        )
    console.print(summary)

    populations = Table(title="False-positive rate per population (honest accounts)")
    populations.add_column("population")
    populations.add_column("honest accounts", justify="right")
    for s in scores:
        populations.add_column(_label(s), justify="right")
    for i, pop in enumerate(scores[0].populations):
        if not pop.n_honest:
            continue
        cells = [
            f"{s.populations[i].flagged_honest:,} · {_pct(s.populations[i].fpr, 3)}"
            for s in scores
        ]
        populations.add_row(pop.population, f"{pop.n_honest:,}", *cells)
    console.print(populations)

    per_campaign: list[tuple[str, Callable[[CampaignMetrics], str]]] = [
        ("Recall per campaign (accounts flagged)", lambda c: _pct(c.recall)),
        (
            "Campaign exchanges attributed to the right campaign",
            lambda c: f"{_pct(c.attributed_share)} · {len(c.found_campaigns)} found",
        ),
        (
            "Hours from campaign start until its first / 50 % / 90 % of accounts were flagged",
            lambda c: f"{_hours_text(c.hours_to_first)} / {_hours_text(c.hours_to_50pct)} / "
                      f"{_hours_text(c.hours_to_90pct)}",
        ),
    ]
    if any(c.pivot_model for c in scores[0].campaigns):
        per_campaign.append(
            (
                "Hours from the release pivot's start until it was flagged",
                lambda c: _hours_text(c.hours_to_pivot) if c.pivot_model else "—",
            )
        )
    for title, cell in per_campaign:
        table = Table(title=title)
        table.add_column("campaign")
        table.add_column("kind")
        table.add_column("accounts", justify="right")
        for s in scores:
            table.add_column(_label(s), justify="right")
        for i, c in enumerate(scores[0].campaigns):
            table.add_row(
                c.campaign_id, c.kind, f"{c.n_accounts:,}", *[cell(s.campaigns[i]) for s in scores]
            )
        console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
