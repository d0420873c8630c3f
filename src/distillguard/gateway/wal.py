"""Write-ahead log of exchanges, and the store worker that moves it into DuckDB.

Durability guarantee (docs/gateway.md, "Durability"): every exchange record is appended to the
current segment with one `write()` on an O_APPEND descriptor BEFORE the response to the client
completes. Once `write()` returns the bytes are in the kernel's page cache, so a killed gateway
(`kill -9`, OOM kill, crash) loses nothing. With `fsync: batch` (default) a child process
(`wal_sync.py`) fsyncs the open segment every `fsync_interval_ms`, so a power loss or kernel
crash can lose at most that window (a thread did it before; its 200 wake-ups a second took the
event loop's GIL, and the background thread now does it only while that process is not
running); `fsync: always` fsyncs each record before the response (slow); `off` never does.

Segments: `<dir>/seg-<time>-<pid>-<n>.open` while written (held under an exclusive flock), renamed
to `.jsonl` when rotated. The store worker (a separate process, so ingest CPU never competes with
the event loop's GIL) ingests sealed segments, and any `.open` segment whose flock it can take
(its writer died): segments of clean gateway records through `fast_ingest` (checked in Python,
appended as Arrow), any other through `distillguard.ingest.ingest_paths` — both idempotent on
request_id, which is what makes replay after a crash exactly-once. It opens the store only for
the length of a flush, so `distillguard scan` can take the DuckDB writer lock between flushes.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import orjson

log = logging.getLogger("distillguard.gateway")

SNAPSHOT_NAME = "enforcement.json"
FINAL_FLUSH_PATIENCE_S = 20.0  # StoreWorker.stop waits 30 s
#: How often the background thread looks at rotation and at the fsync process when that
#: process does the fsyncs (otherwise it wakes every `fsync_interval_ms`).
IDLE_CHECK_S = 0.25


class SyncProcess:
    """The child process that fsyncs the open segment (`wal_sync.py`), fed descriptors."""

    def __init__(self, interval_s: float):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).with_name("wal_sync.py")),
                 str(theirs.fileno()), repr(interval_s)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        ours.setblocking(False)  # never wait on the event loop: a full socket = process lost
        self.sock = ours
        self.failed = False

    def alive(self) -> bool:
        return not self.failed and self.process.poll() is None

    def watch(self, fd: int) -> None:
        """Hand over the segment now written to (from now on `alive()` is False if that
        failed, and the log's own thread fsyncs)."""
        if self.failed:
            return
        try:
            socket.send_fds(self.sock, [b"w"], [fd])
        except OSError:
            self.failed = True
            log.error("wal fsync process lost; the gateway fsyncs segments itself from now on")

    def close(self, timeout_s: float = 10.0) -> None:
        """EOF makes it fsync once more and exit; wait for that."""
        self.sock.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WriteAheadLog:
    """Append-only JSONL segments; `append` is one write() syscall on the caller's thread."""

    def __init__(self, directory: Path, *, fsync: str = "batch", fsync_interval_ms: float = 5.0,
                 segment_max_records: int = 5000, segment_max_age_s: float = 2.0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.interval = fsync_interval_ms / 1000.0
        self.max_records = segment_max_records
        self.max_age = segment_max_age_s
        self.records = 0  # total appended by this process
        self.bytes = 0
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._fd: int | None = None
        self._path: Path | None = None
        self._seg_records = 0
        self._seg_opened = 0.0
        self._dirty = False
        self._closed = False
        self._retired: list[int] = []  # sealed segments' descriptors awaiting fsync + close
        self._wake = threading.Event()
        self._sync: SyncProcess | None = None
        if fsync == "batch":
            try:
                self._sync = SyncProcess(self.interval)
            except OSError:
                log.exception("cannot start the wal fsync process; fsyncing in a thread")
        self._open_segment()
        self._thread = threading.Thread(target=self._background, name="wal-sync", daemon=True)
        self._thread.start()

    def _create_segment(self) -> tuple[int, Path]:
        """A new `.open` segment under our flock (no lock needed: nothing writes to it yet)."""
        name = f"seg-{time.time_ns()}-{os.getpid()}-{next(self._seq):06d}.open"
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, path

    def _open_segment(self, segment: tuple[int, Path] | None = None) -> None:
        self._fd, self._path = segment or self._create_segment()
        self._seg_records, self._seg_opened = 0, time.monotonic()
        if self._sync is not None:
            self._sync.watch(self._fd)

    def _seal(self) -> None:
        """Mark the current segment ready for the store worker (call with the lock held).

        Only a rename happens here; the descriptor is fsynced and closed by the background
        thread, so a request never waits for a disk flush it did not ask for.
        """
        if self._fd is None:
            return
        fd, path = self._fd, self._path
        self._fd = None
        if self._seg_records:
            os.rename(path, path.with_suffix(".jsonl"))
        else:
            os.unlink(path)
        self._retired.append(fd)

    def append(self, record: dict) -> None:
        """Write one exchange record; returns once it is in the OS (see module docstring)."""
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            if self._closed:
                raise RuntimeError("write-ahead log is closed")
            os.write(self._fd, line)
            if self.fsync == "always":
                os.fsync(self._fd)
            else:
                self._dirty = True
            self._seg_records += 1
            self.records += 1
            self.bytes += len(line)
            if self._seg_records >= self.max_records:
                self._seal()
                self._open_segment()

    def _sync_and_close(self, to_sync: list[int], to_close: list[int]) -> None:
        for fd in to_sync:
            if self.fsync != "off":
                os.fsync(fd)
        for fd in to_close:
            os.close(fd)  # releases the flock of a retired segment

    def _background(self) -> None:
        """Age-based rotation off the request path and outside the lock, and the batched
        fsync when the fsync process is not running."""
        while not self._closed:
            sync_here = self.fsync == "batch" and (self._sync is None or not self._sync.alive())
            if sync_here:
                pause = self.interval
            elif not self._seg_records:  # nothing to rotate yet
                pause = min(IDLE_CHECK_S, self.max_age)
            else:
                age = time.monotonic() - self._seg_opened
                pause = min(IDLE_CHECK_S, max(self.max_age - age, self.interval))
            self._wake.wait(pause)
            dup = None
            with self._lock:
                if self._closed or self._fd is None:
                    continue
                if self._dirty and sync_here:
                    dup = os.dup(self._fd)  # fsync a duplicate: rotation may close the original
                    self._dirty = False
                rotate = bool(self._seg_records) and \
                    time.monotonic() - self._seg_opened >= self.max_age
                retired, self._retired = self._retired, []
            extra = [dup] if dup is not None else []
            self._sync_and_close(extra + retired, extra + retired)
            if rotate:
                self._rotate()

    def _rotate(self) -> None:
        """Age-based rotation with the file-system work outside the lock: the new segment is
        created first and only swapped in under it, so `append` (the event loop) never waits
        for an open, flock or rename while the disk is busy (a store flush, fsyncs)."""
        segment = self._create_segment()
        old, records = segment, 0  # closed meanwhile: the new one goes again
        with self._lock:
            if not self._closed and self._fd is not None:
                old, records = (self._fd, self._path), self._seg_records
                self._open_segment(segment)
        fd, path = old
        if not records:
            os.unlink(path)
        else:
            os.rename(path, path.with_suffix(".jsonl"))
        self._sync_and_close([fd], [fd])

    def close(self) -> None:
        """Seal the open segment and flush everything to disk (graceful shutdown)."""
        with self._lock:
            if self._closed:
                return
            self._seal()
            self._closed = True
            retired, self._retired = self._retired, []
        self._wake.set()
        self._thread.join(timeout=1.0)
        self._sync_and_close(retired, retired)
        if self._sync is not None:
            self._sync.close()

    def pending_segments(self) -> int:
        return sum(1 for p in self.dir.iterdir() if p.suffix in (".open", ".jsonl"))


def claim_segments(directory: Path) -> list[Path]:
    """Ready segments plus abandoned open ones (writer died: its flock is free), oldest first."""
    claimed = []
    for path in sorted(Path(directory).glob("seg-*")):
        if path.suffix == ".jsonl":
            claimed.append(path)
        elif path.suffix == ".open":
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            finally:
                os.close(fd)
            ready = path.with_suffix(".jsonl")
            try:
                os.rename(path, ready)
            except FileNotFoundError:
                continue
            log.warning("replaying segment %s left by a stopped gateway", path.name)
            claimed.append(ready)
    return claimed


#: Rows of clean segments appended in one transaction at most (memory bound on a backlog).
FAST_GROUP_ROWS = 50_000


def flush_once(directory: Path, db_path: Path, *, export_snapshot: bool = True,
               threads: int | None = None) -> int:
    """Ingest every claimable segment into the store; returns the number of rows stored.

    Segments whose records are all clean gateway records take the fast path
    (`fast_ingest`: parsed and checked in Python, appended as Arrow); any other segment, and
    any group of segments with a request id stored already or repeated, goes through
    `distillguard.ingest.ingest_paths`. Segments are stored in order either way.
    A segment is deleted only once ingest read it completely; one it could not read stays on
    disk for the next pass. Raises duckdb.IOException when another process holds the store's
    writer lock (the caller retries later; segments stay on disk meanwhile).
    """
    from distillguard import store

    segments = claim_segments(directory)
    if not segments and not export_snapshot:
        return 0
    con = store.connect(db_path)
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        report = _ingest_segments(con, segments) if segments else None
        if export_snapshot:
            write_snapshot(con, Path(directory) / SNAPSHOT_NAME)
    finally:
        con.close()
    if report is None:
        return 0
    failed = {f.path for f in report.files if f.error}
    for message in report.errors:
        log.error("segment kept for retry: %s", message)
    for path in segments:
        if str(path) not in failed:
            path.unlink(missing_ok=True)
    log.info("flushed %d segment(s): %d stored, %d replayed, %d quarantined %s",
             len(segments) - len(failed), report.stored, report.duplicates,
             report.quarantined_total, report.quarantined or "")
    return report.stored


def _ingest_segments(con, segments: list[Path]):
    """Ingest `segments` in order: runs of clean ones in one transaction each, the others
    (and a run that repeats a stored request id) through the validating path."""
    from distillguard.gateway.fast_ingest import clean_table, store_clean
    from distillguard.ingest import FileReport, IngestReport, ingest_paths

    report = IngestReport(kind="exchanges")
    group: list[tuple[Path, object]] = []

    def validating(paths: list[Path]) -> None:
        sub = ingest_paths(con, [str(p) for p in paths], kind="exchanges", format="jsonl")
        for file_report in sub.files:
            report.add(file_report)
        report.errors.extend(e for e in sub.errors
                             if e not in {f.error for f in sub.files})

    def flush_group() -> None:
        if not group:
            return
        paths = [p for p, _ in group]
        if store_clean(con, [t for _, t in group]):
            for path, table in group:
                report.add(FileReport(path=str(path), format="jsonl", read=table.num_rows,
                                      stored=table.num_rows))
        else:
            validating(paths)
        group.clear()

    for path in segments:
        table = clean_table(path)
        if table is None:
            flush_group()
            validating([path])
            continue
        if table.num_rows == 0:
            report.add(FileReport(path=str(path), format="jsonl", note="empty file"))
            continue
        group.append((path, table))
        if sum(t.num_rows for _, t in group) >= FAST_GROUP_ROWS:
            flush_group()
    flush_group()
    return report


def write_snapshot(con, path: Path) -> None:
    """Export the enforcement list (scan findings) for the gateway process, atomically."""
    accounts = con.execute(
        "SELECT account_id, score, flagged, campaign_id FROM finding_accounts"
    ).fetchall()
    campaigns = con.execute(
        "SELECT campaign_id, score, coalesce(n_accounts, len(accounts)) FROM finding_campaigns"
    ).fetchall()
    data = orjson.dumps({"accounts": accounts, "campaigns": campaigns})
    try:
        if path.read_bytes() == data:
            return  # unchanged: keep the mtime, so the gateway does not re-parse it
    except OSError:
        pass
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_store_worker(directory: str, db_path: str, interval_s: float, parent_pid: int,
                     stop: Connection, snapshot_every_s: float, own_session: bool = True) -> None:
    """Store worker loop (own process). Exits when told to or when its gateway is gone.

    `stop` is the read end of a pipe whose write end only the gateway holds: it becomes
    readable (EOF) when the gateway closes it (`StoreWorker.stop`) or dies. SIGTERM/SIGINT
    sent to the whole process group (a service manager, Ctrl-C) are ignored, so the gateway's
    graceful shutdown still gets its final flush. (An `mp.Event` was used before: a worker that
    died or timed out at the wrong moment left `Event.set()` blocked forever, hanging the
    gateway's shutdown.)"""
    import signal

    import duckdb
    import pyarrow

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if own_session:
        # With autogroup scheduling (sched_autogroup_enabled, no cgroup CPU controller) the
        # kernel shares the CPU between sessions first: in the gateway's session, each flush
        # (~1 s of CPU at 500 req/s) was charged to the event loop's share and showed up as
        # its p99 stalls. In a session of its own it competes as a peer of the gateway.
        with contextlib.suppress(OSError):
            os.setsid()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s worker %(message)s")
    # Ingest costs CPU (~0.05 ms per exchange on the fast path, ~0.6 ms through the validating
    # one, plus ~0.1 s per flush on the development machine) and only has to keep up on average, while the gateway's event loop must answer
    # within a millisecond: one thread, lower CPU priority (nice 10). Under sustained overload the
    # worker falls behind and segments wait on disk (`pending_segments` in /admin/state).
    with contextlib.suppress(OSError):
        os.nice(10)
    if own_session:
        # its own session is its own autogroup, where niceness only ranks its own threads:
        # the group's niceness is what the kernel weighs against the gateway's session
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text("19\n")
    pyarrow.set_cpu_count(1)
    pyarrow.set_io_thread_count(1)
    last_snapshot = 0.0
    final_deadline = None
    while True:
        stopping = stop.poll(0) or os.getppid() != parent_pid
        now = time.monotonic()
        export = now - last_snapshot >= snapshot_every_s
        busy = False
        try:
            flush_once(Path(directory), Path(db_path), export_snapshot=export, threads=1)
            if export:
                last_snapshot = now
        except duckdb.IOException as exc:
            busy = True
            log.warning("store busy (%s); segments stay on disk, retrying", str(exc)[:120])
        except Exception:
            log.exception("store flush failed; segments stay on disk, retrying")
        if stopping:
            # The final flush waits out a writer lock held for a while (another gateway's
            # worker, a scan) rather than leave this run's segments for the next start.
            final_deadline = final_deadline or now + FINAL_FLUSH_PATIENCE_S
            if not busy or now >= final_deadline:
                return
            time.sleep(0.25)
            continue
        stop.poll(interval_s)


class StoreWorker:
    """Owns the store worker process for one gateway."""

    def __init__(self, directory: Path, db_path: Path, interval_s: float,
                 snapshot_every_s: float, *, own_session: bool = True):
        ctx = mp.get_context("spawn")
        self._stop_r, self._stop_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=run_store_worker,
            args=(str(directory), str(db_path), interval_s, os.getpid(), self._stop_r,
                  snapshot_every_s, own_session),
            name="distillguard-store-worker",
            daemon=False,
        )

    def start(self) -> None:
        self.process.start()
        self._stop_r.close()  # the worker has its own copy; EOF must reach it when we close

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask for a final flush and wait for it (closing the pipe cannot block)."""
        self._stop_w.close()
        self.process.join(timeout_s)
        if self.process.is_alive():
            log.error("store worker did not finish its final flush in %.0fs", timeout_s)
            self.process.terminate()
