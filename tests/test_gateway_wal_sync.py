"""The write-ahead log's batched fsync in a child process (`gateway/wal_sync.py`), and the
thread that takes over when that process is gone."""

from __future__ import annotations

import os
import socket
import threading
import time

import orjson

from distillguard.gateway import wal_sync
from distillguard.gateway.wal import WriteAheadLog


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def _recording_fsync(monkeypatch) -> list[tuple[int, str]]:
    """os.fsync, recording (inode, thread name) of every call."""
    calls: list[tuple[int, str]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append((os.fstat(fd).st_ino, threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_sync_process_fsyncs_the_newest_segment_and_the_last_one_at_eof(tmp_path, monkeypatch):
    calls = _recording_fsync(monkeypatch)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = threading.Thread(target=wal_sync.serve, args=(theirs, 0.001), name="sync")
    server.start()
    a = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    b = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    ino_a, ino_b = os.fstat(a).st_ino, os.fstat(b).st_ino
    try:
        socket.send_fds(ours, [b"w"], [a])
        os.write(a, b"one\n")
        assert _wait_for(lambda: (ino_a, "sync") in calls)
        socket.send_fds(ours, [b"w"], [b])  # the writer moved on: b is fsynced from now on
        os.write(b, b"two\n")
        assert _wait_for(lambda: (ino_b, "sync") in calls)
        synced_b = calls.count((ino_b, "sync"))
        os.write(b, b"three\n")
        ours.close()  # EOF: one last fsync, then it returns
        server.join(10)
        assert not server.is_alive()
        assert calls.count((ino_b, "sync")) > synced_b
        assert all(ino in (ino_a, ino_b) for ino, _ in calls)
    finally:
        os.close(a)
        os.close(b)
        theirs.close()


def test_wal_fsyncs_in_its_thread_once_the_sync_process_is_gone(tmp_path, monkeypatch):
    wal = WriteAheadLog(tmp_path, fsync_interval_ms=1)
    calls = _recording_fsync(monkeypatch)
    assert wal._sync.alive()
    wal._sync.process.kill()
    wal._sync.process.wait()
    wal.append({"request_id": "r0"})
    current = os.fstat(wal._fd).st_ino
    assert _wait_for(lambda: (current, "wal-sync") in calls)
    wal.append({"request_id": "r1"})
    wal.close()
    lines = [orjson.loads(x)["request_id"] for p in sorted(tmp_path.glob("*.jsonl"))
             for x in p.read_bytes().splitlines()]
    assert lines == ["r0", "r1"]


def test_wal_sync_process_ends_with_the_log(tmp_path):
    wal = WriteAheadLog(tmp_path)
    assert wal._sync.alive()
    wal.append({"request_id": "r0"})
    wal.close()
    assert wal._sync.process.returncode == 0
    unsynced = WriteAheadLog(tmp_path / "off", fsync="off")
    assert unsynced._sync is None
    unsynced.close()
