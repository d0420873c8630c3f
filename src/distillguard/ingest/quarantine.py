"""Reading the quarantine: what was rejected, where it came from and why."""

from __future__ import annotations

from typing import Any

import duckdb

from distillguard import contract


def list_quarantine(
    con: duckdb.DuckDBPyConnection,
    *,
    reason: str | None = None,
    source: str | None = None,
    kind: str | None = None,
    limit: int | None = 50,
) -> list[dict[str, Any]]:
    """Quarantined rows, newest ingest first, then by file and row.

    `source` matches the source file path as a substring; `reason` must be one of
    `contract.QUARANTINE_REASONS`.
    """
    if reason is not None and reason not in contract.QUARANTINE_REASONS:
        raise ValueError(
            f"unknown reason {reason!r}; choose one of {', '.join(contract.QUARANTINE_REASONS)}"
        )
    where, params = [], []
    if reason:
        where.append("reason = ?")
        params.append(reason)
    if source:
        where.append("contains(source_file, ?)")
        params.append(source)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    sql = "SELECT * FROM quarantine"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ingested_at DESC, source_file, row_number"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    cursor = con.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def quarantine_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Quarantined rows per reason code."""
    rows = con.execute("SELECT reason, count(*) FROM quarantine GROUP BY 1 ORDER BY 2 DESC").fetchall()
    return {r: int(n) for r, n in rows}
