"""The JSON Lines reader: whole lines with their 1-based numbers, whatever the read size and
batch size, across reads, with CRLF, blank lines and no final newline."""

from __future__ import annotations

import gzip

import pytest

from distillguard.ingest import readers

TEXT = (
    '{"a": 1}\n\n{"b": "two"}\r\n   \n{"c": "é€😀"}\n' + '{"d": "' + "x" * 300 + '"}\n'
    + "\n".join(f'{{"n": {i}}}' for i in range(40)) + "\r\n\r\n" + '{"last": true}'
)


def expected() -> list[tuple[int, str]]:
    out = []
    for number, line in enumerate(TEXT.split("\n"), start=1):
        line = line[:-1] if line.endswith("\r") else line
        if line:
            out.append((number, line))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("batch_rows", [1, 5, 1000])
@pytest.mark.parametrize("compressed", [False, True])
def test_lines_and_numbers_do_not_depend_on_read_or_batch_size(
        tmp_path, monkeypatch, chunk, batch_rows, compressed):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(readers, "BATCH_ROWS", batch_rows)
    monkeypatch.setattr(readers, "BATCH_BYTES", 200)
    path = tmp_path / "lines.jsonl"
    data = TEXT.encode()
    path.write_bytes(gzip.compress(data) if compressed else data)
    got, blank = [], 0
    for batch in readers.read_json_lines(path, "jsonl"):
        table = batch.table
        blank += batch.blank
        # the text keeps its line end (the validator ignores it); raw_length does not count it
        lines = [line.removesuffix("\n").removesuffix("\r") for line in table["line"].to_pylist()]
        got += list(zip(table["row_number"].to_pylist(), lines, strict=True))
        assert table["raw_length"].to_pylist() == [len(line.encode()) for line in lines]
    assert got == expected()
    assert blank == TEXT.count("\n") + 1 - len(expected())


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_batches_hold_whole_groups_of_batch_rows_lines(tmp_path, monkeypatch, chunk):
    """Every batch but the last holds exactly BATCH_ROWS lines, whatever the read size, so
    the store receives whole row groups (partial ones made the store ~40% larger)."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(readers, "BATCH_ROWS", 5)
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(f'{{"n": {i}}}\n' for i in range(23)))
    batches = list(readers.read_json_lines(path, "jsonl"))
    assert [b.table.num_rows for b in batches] == [5, 5, 5, 5, 3]
    numbers = [n for b in batches for n in b.table["row_number"].to_pylist()]
    assert numbers == list(range(1, 24))


def test_prefetch_keeps_order_raises_reader_errors_after_the_batches_before_them():
    from distillguard.ingest import load

    def batches():
        yield from (readers.Batch(table=None, done_bytes=i) for i in range(3))
        raise readers.IngestFileError("damaged")

    got = []
    with pytest.raises(readers.IngestFileError, match="damaged"):
        for batch in load._prefetch(batches()):
            got.append(batch.done_bytes)
    assert got == [0, 1, 2]


def test_prefetch_closes_the_reader_when_the_consumer_stops_early():
    from distillguard.ingest import load

    closed = []

    def batches():
        try:
            yield from (readers.Batch(table=None, done_bytes=i) for i in range(100))
        finally:
            closed.append(True)

    stream = load._prefetch(batches())
    assert next(stream).done_bytes == 0
    stream.close()
    assert closed == [True]
