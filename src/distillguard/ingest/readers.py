"""Readers: paths -> files -> format -> Arrow batches ready for the vectorised validator.

JSON Lines (plain, gzip, zstd; compression found by magic bytes, not by name) are read
straight into one buffer per batch and split into lines in bulk with numpy; the lines become an
Arrow string array over that buffer (zero copy). UTF-8 is checked for the whole chunk at once by
Arrow; only a chunk that contains bad bytes is re-checked line by line. Parquet is read with
pyarrow, one record batch at a time.
"""

from __future__ import annotations

import glob
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

from distillguard import contract
from distillguard.ingest import adapters

FORMATS = ("auto", "jsonl", "parquet", "openai", "anthropic")
JSON_FORMATS = ("jsonl", "openai", "anthropic")
#: File names picked up when a directory is given.
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".gz", ".zst", ".zstd")
CHUNK_BYTES = 16 << 20  # read size
#: Batch size: DuckDB's row group size in rows, or this many bytes, whichever comes first.
BATCH_ROWS = 122_880
BATCH_BYTES = 256 << 20
SNIFF_BYTES = 64 << 10
#: What a damaged compressed stream raises while being read.
READ_ERRORS = (OSError, EOFError, zstandard.ZstdError)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"

BATCH_SCHEMA = pa.schema(
    [
        ("row_number", pa.int64()),
        ("line", pa.large_string()),  # the text to validate (adapted for pair formats)
        ("raw", pa.large_string()),  # original text when it differs from `line` / rejected
        ("raw_length", pa.int64()),
        ("pre_reason", pa.string()),  # bad_utf8 / oversize, decided here
        ("pre_detail", pa.string()),
    ]
)


class IngestFileError(Exception):
    """A whole file cannot be read as claimed; the message is one line naming the problem."""


@dataclass
class Batch:
    """One Arrow batch of a file and how far through the file (compressed bytes) it reaches."""

    table: pa.Table
    done_bytes: int
    blank: int = 0  # blank lines skipped in this batch
    may_exceed: bool = True  # could a text field be over TEXT_FIELD_CAP_BYTES?


def expand_paths(paths: list[str | Path] | tuple[str | Path, ...]) -> tuple[list[Path], list[str]]:
    """Files named by `paths` (files, directories, globs), deduplicated, spelled as given;
    plus one error line per path that matches nothing."""
    files: list[Path] = []
    errors: list[str] = []
    for raw in paths:
        text = str(raw)
        if any(ch in text for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True)) if Path(m).is_file()]
            if not matches:
                errors.append(f"{text}: no file matches this pattern")
            files.extend(matches)
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.name.lower().endswith(SUFFIXES)
            )
            if not found:
                errors.append(f"{path}: directory holds no .jsonl/.parquet files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{path}: no such file or directory")
    seen: set[Path] = set()
    unique = []
    for path in files:  # the first spelling of each file wins
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique, errors


def _open_raw(path: Path) -> tuple[BinaryIO, BinaryIO, str]:
    """(decompressed stream, underlying file, compression name) chosen by magic bytes."""
    fh = open(path, "rb")  # noqa: SIM115 (closed by the caller through the stream)
    magic = fh.read(4)
    fh.seek(0)
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=fh), fh, "gzip"
    if magic.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True), fh, "zstd"
    return fh, fh, "plain"


def detect_format(path: Path, claimed: str, kind: str) -> str:
    """The format to read `path` with; raises IngestFileError if it is not what was claimed."""
    if claimed not in FORMATS:
        raise ValueError(f"unknown format {claimed!r}; choose one of {', '.join(FORMATS)}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == PARQUET_MAGIC:
        if claimed in ("auto", "parquet"):
            return "parquet"
        raise IngestFileError(f"{path}: is a Parquet file, not {claimed} (use --format auto)")
    if claimed == "parquet":
        raise IngestFileError(f"{path}: not a Parquet file (no PAR1 magic bytes)")
    stream, fh, compression = _open_raw(path)
    try:
        head = stream.read(SNIFF_BYTES)
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise IngestFileError(f"{path}: corrupt {compression} data ({exc})") from None
    finally:
        stream.close()
        fh.close()
    if b"\x00" in head:
        raise IngestFileError(f"{path}: binary data, not JSON Lines")
    if claimed in ("openai", "anthropic") and kind != "exchanges":
        raise IngestFileError(f"{path}: {claimed} pairs hold exchanges, not {kind}")
    if claimed != "auto":
        return claimed
    if kind == "exchanges":
        first = next((ln for ln in head.split(b"\n") if ln.strip()), b"")
        try:
            shape = adapters.sniff(orjson.loads(first))
        except orjson.JSONDecodeError:
            shape = None
        if shape:
            return shape
    return "jsonl"


# --------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------
def _utf8_lines(data: np.ndarray, offsets: np.ndarray, drop: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Lines as UTF-8 text over `data` without copying; lines in `drop` and lines that are not
    valid UTF-8 become null. Returns (text, bad-UTF-8 mask)."""
    n = len(offsets) - 1
    text = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    bad = np.zeros(n, dtype=bool)
    try:
        text.validate(full=True)  # whole-chunk UTF-8 check (SIMD)
    except pa.ArrowInvalid:
        for i in range(n):  # only chunks that hold bad bytes are checked line by line
            try:
                data[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    nulls = drop | bad
    if nulls.any():
        binary = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
        )
        cleaned = pc.if_else(pa.array(nulls), pa.scalar(None, pa.large_binary()), binary)
        text = cleaned.cast(pa.large_string())
    return text, bad


def _line_ends(data: np.ndarray, start: int = 0) -> np.ndarray:
    """Offsets just past each newline of `data`, shifted by `start`."""
    return np.flatnonzero(data == 10) + (start + 1)


def _lines_batch(data: bytes, first_row: int, fmt: str, final: bool) -> tuple[pa.Table, int]:
    """Split `data` (whole lines; with `final`, the last may lack its newline) into a batch."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = _line_ends(buf)
    if final and len(data) and (len(ends) == 0 or ends[-1] != len(data)):
        ends = np.append(ends, len(data))
    return _lines_table(buf, ends, first_row, fmt)


def _lines_table(buf: np.ndarray, ends: np.ndarray, first_row: int, fmt: str) -> tuple[pa.Table, int]:
    """Lines of `buf` ending at `ends` (past the newline) -> a batch table (no copy of the
    text); returns (table, blank lines skipped)."""
    offsets = np.concatenate(([0], ends)).astype(np.int64)
    n = len(ends)
    length = np.diff(offsets)
    has_nl = buf[ends - 1] == 10 if n else np.zeros(0, dtype=bool)
    length = length - has_nl
    has_cr = np.zeros(n, dtype=bool)
    nonempty = length > 0
    has_cr[nonempty] = buf[offsets[:-1][nonempty] + length[nonempty] - 1] == 13
    length = length - has_cr
    rows = first_row + np.arange(1, n + 1, dtype=np.int64)
    oversize = length > contract.LINE_CAP_BYTES
    text, bad_utf8 = _utf8_lines(buf, offsets, oversize)
    rejected = oversize | bad_utf8
    keep = (length > 0) | rejected
    blank = int(n - keep.sum())
    pre_reason = pre_detail = raw = None
    if rejected.any():
        reasons, details, raws = [None] * n, [None] * n, [None] * n
        for i in np.flatnonzero(rejected):
            cut = offsets[i] + min(length[i], contract.QUARANTINE_RAW_CAP_BYTES)
            raws[i] = buf[offsets[i] : cut].tobytes().decode("utf-8", errors="replace")
            if oversize[i]:
                reasons[i] = "oversize"
                details[i] = f"line of {length[i]} bytes exceeds {contract.LINE_CAP_BYTES} bytes"
            else:
                reasons[i] = "bad_utf8"
                details[i] = "line is not valid UTF-8"
        pre_reason, pre_detail = pa.array(reasons, pa.string()), pa.array(details, pa.string())
        raw = pa.array(raws, pa.large_string())
    line = text
    if fmt in adapters.ADAPTERS:
        raw, line = _adapt(line, raw, adapters.ADAPTERS[fmt])
    table = pa.Table.from_arrays(
        [
            pa.array(rows),
            line,
            raw if raw is not None else pa.nulls(n, pa.large_string()),
            pa.array(length.astype(np.int64)),
            pre_reason if pre_reason is not None else pa.nulls(n, pa.string()),
            pre_detail if pre_detail is not None else pa.nulls(n, pa.string()),
        ],
        schema=BATCH_SCHEMA,
    )
    if blank:
        table = table.filter(pa.array(keep))
    return table, blank


def _adapt(line: pa.Array, raw: pa.Array | None, adapt) -> tuple[pa.Array, pa.Array]:
    """Pair lines -> native JSON text; the original line is kept as `raw` for the quarantine.
    Lines that are not JSON objects pass through unchanged (validation quarantines them)."""
    originals = line.to_pylist()
    adapted = []
    for text in originals:
        if text is None:
            adapted.append(None)
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            adapted.append(text)
            continue
        adapted.append(orjson.dumps(adapt(obj)).decode() if isinstance(obj, dict) else text)
    raw_list = raw.to_pylist() if raw is not None else [None] * len(originals)
    merged_raw = [r if r is not None else o for r, o in zip(raw_list, originals, strict=True)]
    return pa.array(merged_raw, pa.large_string()), pa.array(adapted, pa.large_string())


def _split_batches(table: pa.Table, rows: int = 16_384) -> pa.Table:
    """Several record batches so DuckDB scans the batch on every core."""
    return pa.Table.from_batches(table.to_batches(max_chunksize=rows), schema=table.schema)


def read_json_lines(path: Path, fmt: str) -> Iterator[Batch]:
    """Yield batches of whole lines from a (possibly compressed) JSON Lines file.

    The file is read straight into one buffer per batch (no joining of pieces); newlines
    are found once per read with numpy. Lines are gathered until a batch holds BATCH_ROWS
    lines or BATCH_BYTES bytes: large batches let DuckDB write whole row groups instead of
    re-compressing partial ones. A line longer than LINE_CAP_BYTES is not buffered whole:
    its head is kept for the quarantine and the rest is skipped up to the next newline.
    """
    stream, fh, compression = _open_raw(path)
    chunk_bytes = CHUNK_BYTES
    # Before a read the buffer holds under BATCH_BYTES, or after a flush one open line.
    capacity = max(BATCH_BYTES, contract.LINE_CAP_BYTES) + chunk_bytes
    row = 0
    buf = np.empty(capacity, dtype=np.uint8)
    filled = whole = lines = 0  # bytes held; bytes up to the last newline; newlines held
    ends: list[np.ndarray] = []

    def damaged(exc: Exception) -> IngestFileError:
        return IngestFileError(f"{path}: corrupt {compression} data after line {row} ({exc})")

    def take(data: np.ndarray, start: int) -> None:
        """Account for `data` just placed at buf[start:]."""
        nonlocal filled, whole, lines
        found = _line_ends(data, start)
        if len(found):
            ends.append(found)
            lines += len(found)
            whole = int(found[-1])
        filled = start + len(data)

    def flush(final: bool, whole_groups: bool = False) -> Iterator[Batch]:
        """Yield the whole lines held (with `final`, the unterminated last one too) and move
        the rest to a fresh buffer (the yielded batches keep pointing into the old one).
        A batch holds at most BATCH_ROWS lines; with `whole_groups`, only full batches are
        yielded and the lines after them wait, so clean batches fill whole row groups."""
        nonlocal buf, filled, whole, lines, ends, row
        line_ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        end = filled if final else whole
        if end > whole:
            line_ends = np.append(line_ends, end)
        if whole_groups and len(line_ends) >= BATCH_ROWS:
            line_ends = line_ends[: len(line_ends) - len(line_ends) % BATCH_ROWS]
            end = int(line_ends[-1])
        start = 0
        for first in range(0, len(line_ends), BATCH_ROWS):
            group = line_ends[first : first + BATCH_ROWS]
            table, blank = _lines_table(buf[start:], group - start, row, fmt)
            row += len(table) + blank
            start = int(group[-1])
            yield Batch(_split_batches(table), fh.tell(), blank)
        rest = buf[end:filled]
        buf = np.empty(capacity, dtype=np.uint8)
        buf[: len(rest)] = rest
        filled, whole, lines, ends = 0, 0, 0, []
        take(buf[: len(rest)], 0)

    try:
        while True:
            try:
                got = stream.readinto(memoryview(buf)[filled : filled + chunk_bytes])
            except READ_ERRORS as exc:
                yield from flush(False)  # keep the whole lines read before the damage
                raise damaged(exc) from None
            if not got:
                yield from flush(True)
                return
            take(buf[filled : filled + got], filled)
            if filled - whole > contract.LINE_CAP_BYTES:  # skip the rest of an oversize line
                head = buf[whole : whole + contract.QUARANTINE_RAW_CAP_BYTES].tobytes()
                length, filled = filled - whole, whole
                yield from flush(False)
                rest = None
                while rest is None:
                    try:
                        chunk = stream.read(chunk_bytes)
                    except READ_ERRORS as exc:
                        raise damaged(exc) from None
                    cut = chunk.find(b"\n")
                    if cut < 0 and chunk:
                        length += len(chunk)
                        continue
                    length += max(cut, 0)
                    rest = chunk[cut + 1 :] if cut >= 0 else b""
                row += 1
                yield Batch(_oversize_row(row, head, length), fh.tell())
                if not chunk:
                    return
                take(np.frombuffer(rest, dtype=np.uint8), 0)
                buf[: len(rest)] = np.frombuffer(rest, dtype=np.uint8)
            if lines >= BATCH_ROWS:
                yield from flush(False, whole_groups=True)
            elif filled >= BATCH_BYTES:
                yield from flush(False)
    finally:
        stream.close()
        fh.close()


def _oversize_row(row: int, head: bytes, length: int) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "row_number": row,
                "line": None,
                "raw": head.decode("utf-8", errors="replace"),
                "raw_length": length,
                "pre_reason": "oversize",
                "pre_detail": f"line of {length} bytes exceeds {contract.LINE_CAP_BYTES} bytes",
            }
        ],
        schema=BATCH_SCHEMA,
    )


# --------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------
def read_parquet(path: Path) -> Iterator[Batch]:
    """Yield record batches of a Parquet file, each with a 1-based `_dg_row` column."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise IngestFileError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    row = 0
    total = path.stat().st_size
    rows_total = max(pf.metadata.num_rows, 1)
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            n = batch.num_rows
            table = pa.Table.from_batches([batch]).append_column(
                "_dg_row", pa.array(np.arange(row + 1, row + n + 1, dtype=np.int64))
            )
            row += n
            yield Batch(
                _split_batches(table),
                int(total * min(row / rows_total, 1.0)),
                may_exceed=_longest_text(table) > contract.TEXT_FIELD_CAP_BYTES,
            )
    except (pa.ArrowException, OSError) as exc:
        raise IngestFileError(
            f"{path}: corrupt Parquet data after row {row} ({_first_line(exc)})"
        ) from None


def _longest_text(data: pa.Table | pa.Array | pa.ChunkedArray) -> int:
    """Bytes of the longest string anywhere in `data` (nested lists and structs included)."""
    if isinstance(data, pa.Table):
        return max((_longest_text(col) for col in data.columns), default=0)
    if isinstance(data, pa.ChunkedArray):
        return max((_longest_text(chunk) for chunk in data.chunks), default=0)
    dtype = data.type
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        longest = pc.max(pc.binary_length(data)).as_py()
        return longest or 0
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _longest_text(data.flatten())
    if pa.types.is_struct(dtype):
        return max((_longest_text(data.field(i)) for i in range(dtype.num_fields)), default=0)
    return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = [
    "FORMATS",
    "Batch",
    "IngestFileError",
    "detect_format",
    "expand_paths",
    "file_size",
    "read_json_lines",
    "read_parquet",
]
