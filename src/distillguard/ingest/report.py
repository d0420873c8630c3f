"""What an ingest did (per file and in total) and what the store holds (`stats`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import duckdb

#: A timestamp this far ahead of the ingest clock is counted as clock skew (not rejected).
FUTURE_SKEW = timedelta(minutes=5)
#: Timestamps before this are counted as implausibly old (e.g. epoch seconds sent as ms).
PAST_LIMIT = "2020-01-01 00:00:00+00"


@dataclass
class FileReport:
    """Counts for one input file. Invariant: read == stored + duplicates + sum(quarantined)."""

    path: str
    format: str = ""
    read: int = 0
    stored: int = 0
    duplicates: int = 0  # already stored (or repeated) with identical content: a harmless replay
    quarantined: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # stored rows with at least one field cut at TEXT_FIELD_CAP_BYTES
    blank: int = 0  # blank lines skipped
    isolated: int = 0  # rows quarantined because DuckDB itself failed on them
    error: str | None = None  # one line when the file could not be (fully) read
    note: str | None = None  # e.g. "empty file"

    def add_counts(self, read: int, stored: int, duplicates: int, truncated: int,
                   quarantined: dict[str, int]) -> None:
        self.read += read
        self.stored += stored
        self.duplicates += duplicates
        self.truncated += truncated
        for reason, count in quarantined.items():
            self.quarantined[reason] = self.quarantined.get(reason, 0) + count


@dataclass
class IngestReport:
    """The result of one `ingest_paths` call: totals plus one FileReport per file."""

    kind: str = "exchanges"
    files: list[FileReport] = field(default_factory=list)
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, report: FileReport) -> None:
        self.files.append(report)
        self.read += report.read
        self.stored += report.stored
        self.duplicates += report.duplicates
        self.truncated += report.truncated
        self.quarantined = dict(Counter(self.quarantined) + Counter(report.quarantined))
        if report.error:
            self.errors.append(report.error)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def ok(self) -> bool:
        """True when every file was read (rows may still have been quarantined)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> Any:
    return con.execute(sql, params or []).fetchone()[0]


def _counts(con: duckdb.DuckDBPyConnection, sql: str, limit: int | None = None) -> dict[str, int]:
    rows = con.execute(sql + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
    return {str(k): int(v) for k, v in rows}


def stats(con: duckdb.DuckDBPyConnection, top: int = 10) -> dict[str, Any]:
    """Counts, date range, accounts, models, endpoints and sanity checks of the store.

    Sanity checks never reject data; they point at problems worth a look: clock skew
    (timestamps in the future or implausibly old), traffic from accounts missing from the
    accounts table, error responses, truncated fields.
    """
    exchanges = _one(con, "SELECT count(*) FROM exchanges")
    first, last = con.execute("SELECT min(ts), max(ts) FROM exchanges").fetchone()
    accounts_table = _one(con, "SELECT count(*) FROM accounts")
    result: dict[str, Any] = {
        "exchanges": exchanges,
        "first_ts": first.isoformat() if first else None,
        "last_ts": last.isoformat() if last else None,
        "accounts_with_traffic": _one(con, "SELECT count(DISTINCT account_id) FROM exchanges"),
        "accounts": accounts_table,
        "api_keys": _one(con, "SELECT count(DISTINCT api_key_id) FROM exchanges"),
        "models": _counts(
            con, "SELECT model, count(*) n FROM exchanges GROUP BY 1 ORDER BY n DESC, 1", top
        ),
        "endpoints": _counts(
            con,
            "SELECT coalesce(endpoint, '(none)'), count(*) n FROM exchanges GROUP BY 1 "
            "ORDER BY n DESC, 1",
        ),
        "quarantine": _counts(
            con, "SELECT reason, count(*) n FROM quarantine GROUP BY 1 ORDER BY n DESC, 1"
        ),
    }
    skew = f"INTERVAL {int(FUTURE_SKEW.total_seconds())} SECOND"
    sanity = {
        "future_ts": _one(con, f"SELECT count(*) FROM exchanges WHERE ts > now() + {skew}"),
        "ancient_ts": _one(
            con, f"SELECT count(*) FROM exchanges WHERE ts < TIMESTAMPTZ '{PAST_LIMIT}'"
        ),
        "truncated_exchanges": _one(
            con, "SELECT count(*) FROM exchanges WHERE len(truncated_fields) > 0"
        ),
        "error_responses": _one(
            con, "SELECT count(*) FROM exchanges WHERE status >= 400 OR error IS NOT NULL"
        ),
        "exchanges_without_account_record": 0,
        "exchanges_before_account_created": 0,
        "accounts_without_traffic": 0,
    }
    if accounts_table:
        sanity["exchanges_without_account_record"] = _one(
            con,
            "SELECT count(*) FROM exchanges e ANTI JOIN accounts a USING (account_id)",
        )
        sanity["exchanges_before_account_created"] = _one(
            con,
            "SELECT count(*) FROM exchanges e JOIN accounts a USING (account_id) "
            "WHERE e.ts < a.created_at",
        )
        sanity["accounts_without_traffic"] = _one(
            con,
            "SELECT count(*) FROM accounts a ANTI JOIN "
            "(SELECT DISTINCT account_id FROM exchanges) e USING (account_id)",
        )
    result["sanity"] = sanity
    return result
