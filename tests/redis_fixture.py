"""A real, private redis-server for tests: random free port on 127.0.0.1, no persistence."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import proc_guard
from upstream_stub import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """Start/stop Debian's redis-server; `restart` keeps the port (clients reconnect).

    Its output goes to a log file (quoted when a start fails). A failed `start` leaves no
    process behind. The first start moves to another free port if the one picked in
    `__init__` was taken in the meantime (read `port`/`url` after it); later starts keep the
    port and retry until the deadline while it is still busy."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (scripts/system-deps.sh installs it)")
        self._dir = tempfile.TemporaryDirectory(prefix="dg-redis-")
        self.log_path = Path(self._dir.name) / "redis.log"
        self.proc: subprocess.Popen | None = None
        self._ever_started = False
        self._use_port(free_port())

    def _use_port(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> int:
        with open(self.log_path, "ab") as log:
            start = log.tell()
            self.proc = proc_guard.spawn(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--protected-mode", "yes", "--dir", self._dir.name,
                 "--logfile", ""], log)
        return start

    def start(self, timeout: float = 60.0) -> RedisServer:
        deadline = time.monotonic() + timeout
        while True:
            log_start = self._spawn()
            # One try per poll (redis-py retries with backoff by default: a probe stuck on
            # a port someone else listens on would outlast the server's exit).
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                                 socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))

            def ready(client=client) -> bool:
                try:
                    return bool(client.ping())
                except redis.RedisError:
                    return False

            try:
                proc_guard.wait_ready(self.proc, ready, what=f"redis-server :{self.port}",
                                      log_path=self.log_path, log_start=log_start,
                                      timeout=max(deadline - time.monotonic(), 0.5),
                                      interval=0.05)
            except proc_guard.StartError:
                busy = proc_guard.lost_port_race(self.log_path, log_start)
                if not busy or time.monotonic() >= deadline:
                    raise
                if self._ever_started:
                    time.sleep(0.2)  # a restart must keep its port: wait for it
                else:
                    self._use_port(free_port())
                continue
            finally:
                client.close()
            self._ever_started = True
            return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; always waits for the process."""
        proc_guard.reap(self.proc, term_timeout=timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
