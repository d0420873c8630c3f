"""The write-ahead log's batched fsync, as a child process of the gateway (`fsync: batch`).

Run as a script (`python -I wal_sync.py SOCKET_FD INTERVAL_S`, standard library only): the
gateway hands it the descriptor of each new segment over a Unix socket (SCM_RIGHTS), and it
fsyncs the newest one every INTERVAL_S while it grows. A thread in the gateway did this before;
waking 200 times a second, it took the GIL from the event loop each time, and whenever the
scheduler left it waiting for a CPU while it held the GIL, the loop waited with it
(docs/gateway.md, "The wal-sync thread"). A process has its own GIL.

It ignores SIGTERM/SIGINT (the gateway's process group gets them on shutdown) and exits when
the socket reaches EOF, that is when the gateway closes it or dies, after a last fsync.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys


def serve(sock: socket.socket, interval_s: float) -> None:
    """fsync the newest descriptor received every `interval_s` while its size changes."""
    current: int | None = None
    synced = -1
    while True:
        readable, _, _ = select.select([sock], [], [], interval_s)
        if readable:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 8)
            if not msg:
                break  # the gateway closed the socket or died
            for fd in fds:
                if current is not None:
                    os.fsync(current)
                    os.close(current)
                current, synced = fd, -1
        if current is not None:
            size = os.fstat(current).st_size
            if size != synced:
                os.fsync(current)
                synced = size
    if current is not None:
        os.fsync(current)
        os.close(current)


def main() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=int(sys.argv[1])) as sock:
        serve(sock, float(sys.argv[2]))


if __name__ == "__main__":
    main()
