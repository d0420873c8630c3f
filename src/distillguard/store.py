"""The embedded store: one DuckDB file holding exchanges, accounts, quarantine and findings.

Tables are created from the Arrow schemas in `contract`, so the store can never drift from the
log contract.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from distillguard import contract

log = logging.getLogger(__name__)

DEFAULT_DB = Path("distillguard.duckdb")

#: On-disk format of a store this package creates. DuckDB's own default (v0.10.2, for old
#: readers) has no DICT_FSST / ZSTD string compression, which stores prompt and answer text
#: about 5x larger (docs/log-contract.md, "Store size"). A file keeps the version it was
#: created with, so this applies to new stores; DuckDB >= 1.4 reads and writes them.
STORAGE_VERSION = "v1.4.0"

#: Long free-text columns stored with ZSTD rather than DuckDB's automatic choice (DICT_FSST):
#: answers are long natural-language text that a general-purpose compressor shrinks further
#: (about 20% smaller on the lab's traffic); nothing in a scan reads them. (Only top-level
#: columns can be pinned, so `messages` stays automatic.)
ZSTD_COLUMNS: dict[str, tuple[str, ...]] = {"exchanges": ("response_text", "reasoning_text")}

#: table name -> Arrow schema of the rows it holds
TABLES: dict[str, pa.Schema] = {
    "exchanges": contract.EXCHANGE_SCHEMA,
    "accounts": contract.ACCOUNT_SCHEMA,
    "quarantine": contract.QUARANTINE_SCHEMA,
    "signals": contract.SIGNAL_SCHEMA,
    "finding_accounts": contract.FINDING_ACCOUNT_SCHEMA,
    "finding_campaigns": contract.FINDING_CAMPAIGN_SCHEMA,
    "finding_exchanges": contract.FINDING_EXCHANGE_SCHEMA,
}


def connect(path: str | Path = DEFAULT_DB, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) the store at `path` with every contract table present."""
    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"{path}: no store here (run `distillguard ingest` first)")
    con = duckdb.connect(str(path), read_only=read_only,
                         config={"storage_compatibility_version": STORAGE_VERSION})
    if not read_only:
        ensure_tables(con)
    return con


#: Tables that only cache what a scan recomputes: one whose columns no longer match its schema
#: (a store written by an older version) is emptied and created again rather than migrated.
DERIVED_TABLES = frozenset({"signals"})


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create any missing contract table, typed from its Arrow schema; recreate a stale
    DERIVED_TABLES table."""
    existing = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    for name in sorted(DERIVED_TABLES & existing):
        columns = [row[0] for row in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
            "AND database_name = current_database() "
            "ORDER BY column_index", [name]).fetchall()]
        if columns != TABLES[name].names:
            log.warning("table %s was written by another version of distillguard (columns "
                        "differ): emptied, the next scan computes it again", name)
            con.execute(f'DROP TABLE "{name}"')
            existing.discard(name)
    for name, schema in TABLES.items():
        if name not in existing:
            con.execute(create_table_sql(con, name, schema))


def create_table_sql(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema) -> str:
    """CREATE TABLE for `schema` (DuckDB's types for its Arrow types), with the compression of
    ZSTD_COLUMNS pinned."""
    empty = con.from_arrow(contract.empty_table(schema))
    zstd = ZSTD_COLUMNS.get(name, ())
    columns = ", ".join(
        f'"{column}" {type_}' + (" USING COMPRESSION zstd" if column in zstd else "")
        for column, type_ in zip(empty.columns, empty.types, strict=True)
    )
    return f'CREATE TABLE "{name}" ({columns})'


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Everything written inside is committed together, or rolled back on any exception."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
