"""A real, private redis-server for tests: random free port on 127.0.0.1, no persistence."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from upstream_stub import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """Start/stop Debian's redis-server; `restart` keeps the port (clients reconnect)."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (scripts/system-deps.sh installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1)
