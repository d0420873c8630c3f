"""The store's on-disk format: compressed text, input order kept, contract types unchanged."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from distillguard import contract, store
from distillguard.ingest import ingest_paths


def _compressions(con, table: str, column: str) -> set[str]:
    rows = con.execute(
        "SELECT DISTINCT compression FROM pragma_storage_info(?) "
        "WHERE column_name = ? AND segment_type = 'VARCHAR'",
        [table, column],
    ).fetchall()
    return {r[0] for r in rows}


def _sessions(n: int) -> list[dict]:
    """Multi-turn traffic: every exchange repeats its session's earlier turns."""
    rows = []
    for i in range(n):
        session, turn = divmod(i, 8)
        history = []
        for t in range(turn + 1):
            history.append({"role": "user", "content": f"session {session} question {t} " * 20})
            if t < turn:
                history.append({"role": "assistant", "content": f"answer {session}.{t} " * 40})
        rows.append({
            "request_id": f"r-{i:06d}", "ts": 1767607200000 + i * 1000,
            "account_id": f"acct-{session % 50}", "model": "m", "messages": history,
            "response_text": f"answer {session}.{turn} " * 40,
        })
    return rows


def test_new_store_uses_the_compressing_storage_version(db_path):
    con = store.connect(db_path)
    tags = con.execute(
        "SELECT tags FROM duckdb_databases() WHERE path = ?", [str(db_path)]
    ).fetchone()[0]
    con.close()
    assert tags["storage_version"].startswith(store.STORAGE_VERSION)
    # Reopened without our setting (any DuckDB client), the file keeps its version.
    raw = duckdb.connect(str(db_path), read_only=True)
    assert raw.execute(
        "SELECT tags FROM duckdb_databases() WHERE path = ?", [str(db_path)]
    ).fetchone()[0] == tags
    raw.close()


def test_tables_keep_the_contract_types(con):
    for name, schema in store.TABLES.items():
        got = con.execute(f'DESCRIBE "{name}"').fetchall()
        empty = contract.empty_table(schema)  # noqa: F841
        want = con.execute("DESCRIBE SELECT * FROM empty").fetchall()
        assert [r[:2] for r in got] == [r[:2] for r in want], name


def test_text_is_compressed_and_rows_keep_input_order(con, tmp_path):
    rows = _sessions(6000)
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = ingest_paths(con, path, kind="exchanges")
    assert report.stored == len(rows)
    con.execute("CHECKPOINT")
    # Input order, so a session's repeated turns sit in the same dictionary segments.
    stored = [r[0] for r in con.execute("SELECT request_id FROM exchanges").fetchall()]
    assert stored == [r["request_id"] for r in rows]
    assert "Uncompressed" not in _compressions(con, "exchanges", "messages")
    assert _compressions(con, "exchanges", "response_text") == {"ZSTD"}
    used = con.execute("SELECT used_blocks * block_size FROM pragma_database_size()").fetchone()[0]
    raw = sum(len(json.dumps(r["messages"])) + len(r["response_text"]) for r in rows)
    assert used < raw / 10


def test_duplicates_still_skipped_with_input_order(con, tmp_path):
    rows = _sessions(40)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows + rows[:5]), path)
    report = ingest_paths(con, path, kind="exchanges")
    assert (report.stored, report.duplicates) == (40, 5)
    stored = [r[0] for r in con.execute("SELECT request_id FROM exchanges").fetchall()]
    assert stored == [r["request_id"] for r in rows]


def test_a_stale_signals_table_is_recreated_and_the_exchanges_kept(tmp_path):
    """Signals are a cache of what a scan recomputes: a store whose signals table an older
    version wrote (a column fewer) gets a fresh one, and the next scan fills it."""
    db = tmp_path / "old.duckdb"
    con = store.connect(db)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(_sessions(2)), path)
    ingest_paths(con, path, kind="exchanges")
    con.execute("DROP TABLE signals")
    con.execute("CREATE TABLE signals (request_id VARCHAR, account_id VARCHAR)")
    con.execute("INSERT INTO signals VALUES ('r-000000', 'acct-0')")
    con.close()
    con = store.connect(db)
    columns = [r[0] for r in con.execute("DESCRIBE signals").fetchall()]
    assert columns == contract.SIGNAL_SCHEMA.names
    assert con.execute("SELECT count(*) FROM signals").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM exchanges").fetchone() == (2,)
    con.close()
