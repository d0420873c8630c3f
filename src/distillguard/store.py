"""The embedded store: one DuckDB file holding exchanges, accounts, quarantine and findings.

Tables are created from the Arrow schemas in `contract`, so the store can never drift from the
log contract.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from distillguard import contract

DEFAULT_DB = Path("distillguard.duckdb")

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
    con = duckdb.connect(str(path), read_only=read_only)
    if not read_only:
        ensure_tables(con)
    return con


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create any missing contract table, typed from its Arrow schema."""
    existing = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    for name, schema in TABLES.items():
        if name not in existing:
            empty = contract.empty_table(schema)  # noqa: F841  (read by DuckDB's replacement scan)
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM empty')
