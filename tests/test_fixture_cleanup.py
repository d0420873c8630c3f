"""The subprocess fixtures leave nothing running when a start fails: a child that exits early
fails the wait at once with its output, one that is not ready in time (or whose probe raises)
is terminated, killed if it ignores SIGTERM, and reaped; its port is free again."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import proc_guard
from conftest_gateway import GatewayProcess, keys_config
from upstream_stub import ThreadedServer, free_port

pytestmark = pytest.mark.timeout(60)


def _spawn_python(tmp_path: Path, code: str) -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / "child.log"
    with open(log_path, "ab") as log:
        return proc_guard.spawn([sys.executable, "-c", code], log), log_path


def _gone(proc: subprocess.Popen) -> bool:
    """Exited and waited for (no zombie), and no longer on the live list."""
    return (proc.returncode is not None and proc.pid not in proc_guard.live_pids()
            and not Path(f"/proc/{proc.pid}").exists())


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_child_that_exits_fails_the_wait_at_once_with_its_output(tmp_path):
    proc, log = _spawn_python(tmp_path, "import sys; print('boom: no config'); sys.exit(3)")
    t0 = time.monotonic()
    with pytest.raises(proc_guard.StartError, match=r"(?s)exited with code 3.*boom: no config"):
        proc_guard.wait_ready(proc, lambda: False, what="child", log_path=log, timeout=30)
    assert time.monotonic() - t0 < 10  # not the 30 s deadline
    assert _gone(proc)


def test_child_not_ready_in_time_is_killed_even_if_it_ignores_sigterm(tmp_path):
    proc, log = _spawn_python(tmp_path, (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM', flush=True)\n"
        "time.sleep(120)\n"))
    ignoring = lambda: b"ignoring SIGTERM" in log.read_bytes()  # noqa: E731
    proc_guard.wait_ready(proc, ignoring, what="child", log_path=log, timeout=30)
    with pytest.raises(proc_guard.StartError, match=r"(?s)not ready after.*ignoring SIGTERM"):
        proc_guard.wait_ready(proc, lambda: False, what="child", log_path=log, timeout=0.3,
                              term_timeout=0.3)
    assert _gone(proc) and proc.returncode == -signal.SIGKILL


def test_probe_that_raises_still_reaps_the_child(tmp_path):
    proc, log = _spawn_python(tmp_path, "import time; time.sleep(120)")

    def probe() -> bool:
        raise KeyError("probe bug")

    with pytest.raises(KeyError, match="probe bug"):
        proc_guard.wait_ready(proc, probe, what="child", log_path=log, timeout=30)
    assert _gone(proc) and proc.returncode == -signal.SIGTERM


def test_gateway_that_is_not_ready_in_time_leaves_no_process(tmp_path):
    (tmp_path / "policy.yaml").write_text("rules: []\n")
    gw = GatewayProcess({"upstream": "http://127.0.0.1:9", "policy": str(tmp_path / "policy.yaml"),
                         "wal": {"dir": str(tmp_path / "wal"), "mode": "spool"},
                         "keys": keys_config()}, tmp_path)
    with pytest.raises(proc_guard.StartError, match="not ready after"):
        gw.start(timeout=0.2)  # it is still importing
    assert _gone(gw.proc)
    assert _pids_mentioning(str(gw.config_path)) == []
    with socket.socket() as s:  # its port is free
        s.bind(("127.0.0.1", gw.port))


def test_redis_restart_on_a_busy_port_fails_cleanly(tmp_path):
    from redis_fixture import RedisServer

    server = RedisServer().start()
    first = server.proc
    server.stop()
    assert _gone(first)
    with socket.socket() as squatter:  # someone took the port while it was down
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        with pytest.raises(proc_guard.StartError, match=r"(?i)address already in use"):
            server.start(timeout=1.0)
        assert _gone(server.proc)
    client = server.start().client()  # the same port again, once it is free
    assert client.ping()
    client.close()
    server.stop()
    assert _gone(server.proc)


def test_redis_first_start_moves_off_a_port_taken_meanwhile():
    from redis_fixture import RedisServer

    server = RedisServer()
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with server:
            assert server.port != taken and server.client().ping()
    assert _gone(server.proc)


def test_threaded_server_that_fails_to_start_frees_its_port():
    async def broken(scope, receive, send):
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "broken on purpose"})

    server = ThreadedServer(broken)
    with pytest.raises(RuntimeError, match="exited during start-up"), server:
        pass
    assert not server.thread.is_alive()
    with socket.socket() as s:
        s.bind(("127.0.0.1", server.port))


def test_free_port_does_not_hand_out_a_port_twice():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(0 < p < 65536 for p in ports)
