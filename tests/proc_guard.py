"""Start the test suites' server subprocesses, wait until they are ready, and always reap them.

The rules the fixtures keep (a loaded 2-core CI machine made each of them matter):
- a child writes to a file, never to a pipe nobody reads (a full pipe blocks the child);
- readiness is polled against one generous deadline on a monotonic clock, and a child that has
  already exited fails the wait at once, with the tail of its output in the message;
- a child that did not become ready is terminated, then killed, and waited for, whatever
  raised (timeout, exception, KeyboardInterrupt), so it does not live on holding its port;
- every child started here is remembered until reaped; whatever a test left running is reaped
  when the interpreter exits (`atexit`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

TAIL_BYTES = 4000
_LIVE: dict[int, tuple[subprocess.Popen, bool]] = {}  # pid -> (process, own process group)
_LOCK = threading.Lock()


class StartError(RuntimeError):
    """A server subprocess exited or timed out before it was ready (it has been reaped)."""


def spawn(argv: Sequence[str], log: BinaryIO, *, env: dict | None = None,
          cwd: Path | str | None = None, new_session: bool = False) -> subprocess.Popen:
    """Popen with stdout and stderr into `log` (an open binary file), stdin from /dev/null."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=new_session)
    with _LOCK:
        _LIVE[proc.pid] = (proc, new_session)
    return proc


def live_pids() -> set[int]:
    """Pids started here that have not been reaped yet."""
    with _LOCK:
        return set(_LIVE)


def forget(proc: subprocess.Popen) -> None:
    """Drop a process that has been waited for elsewhere (e.g. after SIGKILL + wait)."""
    if proc.returncode is not None:
        with _LOCK:
            _LIVE.pop(proc.pid, None)


def _signal(proc: subprocess.Popen, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)  # the child is its group's leader (start_new_session)
        else:
            proc.send_signal(sig)


def reap(proc: subprocess.Popen | None, term_timeout: float = 30.0,
         sig: int = signal.SIGTERM) -> int | None:
    """Stop `proc`: `sig`, wait up to `term_timeout` s, then SIGKILL and wait. Idempotent.

    If the process leads its own group, what is left of the group once the leader is gone
    (a child that would outlive it) gets SIGKILL too. Returns the exit code."""
    if proc is None:
        return None
    with _LOCK:
        group = _LIVE.get(proc.pid, (proc, False))[1]
    try:
        if proc.poll() is None:
            _signal(proc, sig, group=False)
            try:
                proc.wait(term_timeout)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL, group)
                proc.wait(30)
        if group:
            # The group id stays reserved while any member lives, so this cannot hit a
            # stranger; an empty group is ESRCH (ignored).
            _signal(proc, signal.SIGKILL, group=True)
    finally:
        forget(proc)
    return proc.returncode


def log_tail(path: Path | str, start: int = 0, limit: int = TAIL_BYTES) -> str:
    """The last `limit` bytes of the file at `path`, from offset `start` on, as text."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - limit))
            data = f.read()
    except OSError as exc:
        return f"(no output: {exc})"
    text = data.decode("utf-8", "replace").rstrip()
    return text or "(no output)"


def lost_port_race(path: Path | str, start: int = 0) -> bool:
    """Whether the log (from offset `start`) says the child could not bind its port: the
    free port picked for it was taken before it bound (uvicorn and redis-server words)."""
    text = log_tail(path, start).lower()
    return "address already in use" in text or "errno 98" in text


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], *, what: str,
               log_path: Path | str, log_start: int = 0, timeout: float = 60.0,
               interval: float = 0.1, term_timeout: float = 5.0) -> float:
    """Poll `ready()` until it is true (returns the seconds waited), the process exits, or
    `timeout` s pass. `ready` must return False (not raise) while the server is coming up.

    On any failure (including an exception from `ready` or an interrupt) the process is
    reaped (SIGTERM, SIGKILL after `term_timeout` s) and StartError (or the exception) is
    raised; StartError quotes the tail of the log."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        while True:
            code = proc.poll()
            if code is not None:
                raise StartError(f"{what} (pid {proc.pid}) exited with code {code} before it "
                                 f"was ready; its output ends:\n"
                                 f"{log_tail(log_path, log_start)}")
            if ready():
                return time.monotonic() - t0
            if time.monotonic() >= deadline:
                raise StartError(f"{what} (pid {proc.pid}) not ready after {timeout:.1f} s "
                                 f"(killed); its output ends:\n"
                                 f"{log_tail(log_path, log_start)}")
            time.sleep(interval)
    except BaseException:
        reap(proc, term_timeout=term_timeout)
        raise


@atexit.register
def reap_all() -> None:
    """Reap every child still running (a test that raised before its own cleanup)."""
    with _LOCK:
        procs = [p for p, _ in _LIVE.values()]
    for proc in procs:
        with contextlib.suppress(Exception):
            reap(proc, term_timeout=10.0)
