"""`ingest_paths`: files -> validated batches -> the store, idempotently, with quarantine.

Per batch, inside one transaction:
1. one SQL statement validates every row (`validate.validation_sql`);
2. duplicates of the key (request_id / account_id) are found with a window over the batch and
   a join against the stored keys: the same key with the same identity (ts, account, model for
   exchanges) is a harmless replay and only counted; the same key with different content is
   quarantined as `duplicate`; the first row always wins;
3. good rows are appended, bad rows go to the quarantine (once per file and row, so
   re-ingesting a file does not grow the quarantine).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from distillguard import store
from distillguard.ingest import readers, validate
from distillguard.ingest.readers import Batch, IngestFileError
from distillguard.ingest.report import FileReport, IngestReport
from distillguard.ingest.validate import KindSpec, ident, sql_str

#: progress(path, done_bytes, total_bytes): called after every batch and at the end of a file.
Progress = Callable[[str, int, int], None]
KINDS = tuple(validate.SPECS)


def ingest_paths(
    con: duckdb.DuckDBPyConnection,
    paths: Iterable[str | Path] | str | Path,
    kind: str = "exchanges",
    format: str = "auto",
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest files, directories or globs of `kind` records into the store behind `con`.

    Bad rows are quarantined, never raised; a file that cannot be read at all becomes one
    line in `report.errors` and the other files are still ingested.
    """
    if kind not in validate.SPECS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if format not in readers.FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(readers.FORMATS)}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    spec = validate.SPECS[kind]
    validate.install_macros(con)
    types = validate.duck_types(con, spec.kind)
    files, missing = readers.expand_paths(list(paths))
    report = IngestReport(kind=kind)
    report.errors.extend(missing)
    ingested_at = datetime.now(UTC)
    for path in files:
        report.add(_ingest_file(con, spec, types, path, format, ingested_at, progress))
    return report


def _ingest_file(
    con: duckdb.DuckDBPyConnection,
    spec: KindSpec,
    types: dict[str, str],
    path: Path,
    claimed: str,
    ingested_at: datetime,
    progress: Progress | None,
) -> FileReport:
    report = FileReport(path=str(path))  # as the caller spelled it
    source = str(path.resolve())  # what the quarantine records
    total = readers.file_size(path)
    try:
        report.format = readers.detect_format(path, claimed, spec.kind)
        if report.format == "parquet":
            batches = readers.read_parquet(path)
        else:
            batches = readers.read_json_lines(path, report.format)
        for batch in _prefetch(batches):
            report.blank += batch.blank
            if batch.table.num_rows:
                _load_batch(con, spec, types, batch, source, report, ingested_at)
            if progress:
                progress(str(path), batch.done_bytes, total)
    except IngestFileError as exc:
        report.error = str(exc)
    except (OSError, duckdb.Error, pa.ArrowException, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        report.error = f"{path}: {first}"
    if report.read == 0 and report.error is None:
        report.note = "empty file" if total == 0 or report.blank == 0 else "only blank lines"
    if progress:
        progress(str(path), total, total)
    return report


_END = object()


def _prefetch(batches: Iterator[Batch]) -> Iterator[Batch]:
    """`batches`, with the next one read in a thread while this one is validated and written
    (DuckDB, file reads, decompression and numpy release the GIL). An error of the reader is
    raised here, after the batches read before it."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            batches.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=work, name="distillguard-read", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


#: DuckDB errors caused by the data itself (not by the store or the machine).
DATA_ERRORS = (duckdb.InvalidInputException, duckdb.ConversionException,
               duckdb.OutOfRangeException)
#: More rows than this failing inside DuckDB means a systemic problem: stop the file.
MAX_ISOLATED_ROWS = 100


def _load_batch(
    con: duckdb.DuckDBPyConnection,
    spec: KindSpec,
    types: dict[str, str],
    batch: Batch,
    source: str,
    report: FileReport,
    ingested_at: datetime,
) -> None:
    """Validate and write one batch. Should a value trip DuckDB itself (a case the
    validator does not foresee), the batch is split in halves until the offending row is
    alone; that row is quarantined and every other row is still loaded."""
    try:
        counts = _load_table(con, spec, types, batch, source, ingested_at)
    except DATA_ERRORS as exc:
        table = batch.table
        if table.num_rows > 1:
            half = table.num_rows // 2
            for part in (table.slice(0, half), table.slice(half)):
                sub = Batch(part, batch.done_bytes, may_exceed=batch.may_exceed)
                _load_batch(con, spec, types, sub, source, report, ingested_at)
            return
        report.isolated += 1
        if report.isolated > MAX_ISOLATED_ROWS:
            first = (str(exc).strip().splitlines() or ["?"])[0]
            raise IngestFileError(
                f"{report.path}: DuckDB rejected more than {MAX_ISOLATED_ROWS} rows ({first}); "
                "stopped"
            ) from None
        counts = _quarantine_unreadable(con, spec, batch, source, ingested_at, exc)
    report.add_counts(**counts)


def _raw_sql(is_parquet: bool) -> tuple[str, str]:
    """(SQL for a batch row's raw text, the batch's row-number column)."""
    if is_parquet:
        return "json_merge_patch(to_json(b), '{\"_dg_row\": null}')::VARCHAR", "_dg_row"
    return "coalesce(b.raw, b.line)", "row_number"


def _load_table(
    con: duckdb.DuckDBPyConnection,
    spec: KindSpec,
    types: dict[str, str],
    batch: Batch,
    source: str,
    ingested_at: datetime,
) -> dict:
    is_parquet = "_dg_row" in batch.table.column_names
    con.register("_dg_batch", batch.table)
    try:
        if is_parquet:
            source_types = {
                r[0]: r[1] for r in con.execute("DESCRIBE SELECT * FROM _dg_batch").fetchall()
            }
            stage = validate.parquet_stage(
                spec, types, "_dg_batch", source_types, may_exceed=batch.may_exceed
            )
        else:
            stage = validate.json_stage(spec, types, "_dg_batch")
        sql = validate.validation_sql(spec, stage, from_json=not is_parquet)
        raw_expr, row_col = _raw_sql(is_parquet)
        with store.transaction(con):
            counts = _write(con, spec, sql, source, raw_expr, row_col, ingested_at)
    finally:
        con.unregister("_dg_batch")
        con.execute("DROP TABLE IF EXISTS _dg_valid; DROP TABLE IF EXISTS _dg_dups")
    return counts


def _quarantine_unreadable(
    con: duckdb.DuckDBPyConnection,
    spec: KindSpec,
    batch: Batch,
    source: str,
    ingested_at: datetime,
    exc: Exception,
) -> dict:
    """Quarantine the single row of `batch` that DuckDB could not process."""
    is_parquet = "_dg_row" in batch.table.column_names
    raw_expr, row_col = _raw_sql(is_parquet)
    reason = "bad_type" if is_parquet else "bad_json"
    detail = "could not be read: " + (str(exc).strip().splitlines() or ["?"])[0][:300]
    con.register("_dg_batch", batch.table)
    try:
        con.execute(
            f"""
            INSERT INTO quarantine
            SELECT ?, b.{row_col}, ?, ?, ?, dg_cap({raw_expr}, {validate.RAW_CAP}),
                   strlen({raw_expr}), ?::TIMESTAMPTZ
            FROM _dg_batch b
            WHERE NOT EXISTS (
                SELECT 1 FROM quarantine e WHERE e.source_file = ? AND e.kind = ?
                  AND e.row_number = b.{row_col})
            """,
            [source, spec.kind, reason, detail, ingested_at, source, spec.kind],
        )
    finally:
        con.unregister("_dg_batch")
    return {"read": 1, "stored": 0, "duplicates": 0, "truncated": 0,
            "quarantined": {reason: 1}}


def _write(
    con: duckdb.DuckDBPyConnection,
    spec: KindSpec,
    validation: str,
    source_file: str,
    raw_expr: str,
    row_col: str,
    ingested_at: datetime,
) -> dict:
    """Validate, dedupe and write one registered batch; returns its counts."""
    key = ident(spec.key)
    table = ident(spec.kind)
    identity = ", ".join(ident(c) for c in spec.identity)
    stored_identity = ", ".join(f"s.{ident(c)}" for c in spec.identity)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _dg_valid AS {validation}")
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _dg_dups AS
        WITH good AS (
            SELECT row_number, {key} AS k, hash({identity}) AS h,
                   row_number() OVER w AS rank,
                   first_value(row_number) OVER w AS first_row,
                   first_value(hash({identity})) OVER w AS first_h
            FROM _dg_valid WHERE reason IS NULL
            WINDOW w AS (PARTITION BY {key} ORDER BY row_number)
        ), stored AS (
            SELECT g.row_number, hash({stored_identity}) AS h
            FROM good g JOIN {table} s ON s.{key} = g.k
            WHERE g.rank = 1
        )
        SELECT g.row_number,
            CASE WHEN g.rank > 1 THEN g.h = g.first_h ELSE s.h = g.h END AS replay,
            CASE WHEN g.rank > 1
                 THEN '{spec.key} repeats row ' || g.first_row || ' with different content'
                 ELSE '{spec.key} already stored with different content' END AS detail
        FROM good g LEFT JOIN stored s USING (row_number)
        WHERE g.rank > 1 OR s.row_number IS NOT NULL
        """
    )
    columns = ", ".join(ident(f.name) for f in spec.schema)
    # Rows go in in input order (a parallel anti-join would interleave them): neighbouring
    # exchanges share prompt history and answers, so DuckDB's per-segment dictionaries
    # store the messages about 2.5x smaller (docs/log-contract.md, "Store size").
    has_dups = con.execute("SELECT count(*) FROM _dg_dups").fetchone()[0] > 0
    skip_dups = ("AND NOT EXISTS (SELECT 1 FROM _dg_dups d WHERE d.row_number = v.row_number)"
                 if has_dups else "")
    con.execute(
        f"""
        INSERT INTO {table} ({columns})
        SELECT {columns} FROM _dg_valid v
        WHERE reason IS NULL {skip_dups}
        ORDER BY row_number
        """
    )
    con.execute(
        f"""
        INSERT INTO quarantine
        WITH q AS (
            SELECT row_number, reason, detail, raw, raw_length FROM _dg_valid
            WHERE reason IS NOT NULL
            UNION ALL
            SELECT row_number, 'duplicate', detail, NULL, NULL FROM _dg_dups WHERE NOT replay
        )
        SELECT {sql_str(source_file)}, q.row_number, {sql_str(spec.kind)}, q.reason, q.detail,
               coalesce(q.raw, dg_cap(rtrim({raw_expr}, chr(13) || chr(10)),
                                      {validate.RAW_CAP})),
               coalesce(q.raw_length, strlen({raw_expr})),
               ?::TIMESTAMPTZ
        FROM q JOIN _dg_batch b ON b.{row_col} = q.row_number
        WHERE NOT EXISTS (
            SELECT 1 FROM quarantine e
            WHERE e.source_file = {sql_str(source_file)} AND e.row_number = q.row_number
              AND e.kind = {sql_str(spec.kind)})
        """,
        [ingested_at],
    )
    truncated = "0"
    if "truncated_fields" in spec.known_keys:
        truncated = "count(*) FILTER (WHERE reason IS NULL AND len(truncated_fields) > 0 AND d.row_number IS NULL)"
    read, valid, dup_replay, dup_conflict, trunc = con.execute(
        f"""
        SELECT count(*), count(*) FILTER (WHERE reason IS NULL),
               count(*) FILTER (WHERE d.replay), count(*) FILTER (WHERE NOT d.replay),
               {truncated}
        FROM _dg_valid v LEFT JOIN _dg_dups d USING (row_number)
        """
    ).fetchone()
    quarantined = dict(
        con.execute(
            "SELECT reason, count(*) FROM _dg_valid WHERE reason IS NOT NULL GROUP BY 1"
        ).fetchall()
    )
    if dup_conflict:
        quarantined["duplicate"] = quarantined.get("duplicate", 0) + dup_conflict
    return {
        "read": read,
        "stored": valid - dup_replay - dup_conflict,
        "duplicates": dup_replay,
        "truncated": trunc,
        "quarantined": quarantined,
    }
