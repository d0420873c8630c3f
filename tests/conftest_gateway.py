"""Helpers shared by the gateway test modules (imported explicitly; not a pytest conftest)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import yaml

import proc_guard
from distillguard.gateway.app import create_app, fast_path
from distillguard.gateway.config import config_from_dict, hash_key
from upstream_stub import ThreadedServer, free_port

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ADMIN = "admin-token-for-tests"
DECIDE = "decide-token-for-tests"
KEYS = {f"key-{i}": f"acct-{i}" for i in range(60)}


def keys_config(orgs: dict[str, str] | None = None) -> list[dict]:
    orgs = orgs or {}
    return [{"key_sha256": hash_key(k), "account_id": a, "org_id": orgs.get(a)}
            for k, a in KEYS.items()]


def controlled_signals(exchange: dict) -> dict:
    """Deterministic request signals from marker words, so each decision path is reachable
    on purpose. The real `distillguard.signals.annotate_request` is exercised separately."""
    text = " ".join(m["content"] for m in exchange["messages"])
    params = exchange.get("params") or {}
    return {
        "cot": "step by step" in text,
        "rubric": "grade this" in text,
        "template_sig": "tpl-" + hashlib.sha1(text.split(":")[0].encode()).hexdigest()[:8],
        "extraction_params": bool(params.get("logprobs")) or (params.get("n") or 1) > 1,
        "rule_hits": ["cot.step_by_step"] if "step by step" in text else [],
        "capability": "reasoning_math",
        "distill_score": 0.9 if "step by step" in text else 0.1,
    }


def slow_controlled_signals(exchange: dict) -> dict:
    """`controlled_signals` taking 50 ms, like a slow prompt: run in the signals process, the
    gateway has forwarded the request long before the decision lands."""
    time.sleep(0.05)
    return controlled_signals(exchange)


def write_policy(path: Path, policy: dict) -> Path:
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def write_snapshot(wal_dir: Path, accounts: list, campaigns: list) -> None:
    """Put an enforcement snapshot where the gateway reads it (what the store worker writes)."""
    wal_dir.mkdir(parents=True, exist_ok=True)
    (wal_dir / "enforcement.json").write_bytes(
        orjson.dumps({"accounts": accounts, "campaigns": campaigns}))


@contextlib.contextmanager
def running_gateway(tmp: Path, upstream: str, policy: dict | None = None, *,
                    annotate=controlled_signals, **cfg_extra) -> Iterator[ThreadedServer]:
    """A gateway on a free loopback port in this process (spool mode: no store worker)."""
    tmp.mkdir(parents=True, exist_ok=True)
    policy_path = write_policy(tmp / "policy.yaml", policy or {})
    raw = {"upstream": upstream, "policy": str(policy_path),
           "wal": {"dir": str(tmp / "wal"), "mode": "spool", "segment_max_age_s": 0.2},
           "keys": keys_config(cfg_extra.pop("orgs", None)), **cfg_extra}
    cfg = config_from_dict(raw, tmp)
    cfg.admin_token, cfg.decide_token = ADMIN, DECIDE
    with ThreadedServer(fast_path(create_app(cfg, annotate=annotate, start_worker=False)),
                        server_header=False, date_header=False, proxy_headers=False) as server:
        yield server


def client(server: ThreadedServer, key: str = "key-0", **kw) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"},
                        timeout=30, **kw)


def chat(model: str = "stub-model", text: str = "hello", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def wal_records(wal_dir: Path) -> list[dict]:
    """Every record in the WAL segments, in order. A segment can be sealed (renamed) between
    listing and reading it; then the listing is simply taken again."""
    for _ in range(20):
        records = []
        try:
            for path in sorted(wal_dir.glob("seg-*")):
                records.extend(orjson.loads(x) for x in path.read_bytes().splitlines() if x)
        except FileNotFoundError:
            continue
        return records
    raise AssertionError(f"{wal_dir}: segments kept moving while being read")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class GatewayProcess:
    """`distillguard gateway` as a real subprocess (durability and multi-replica tests).

    Output goes to `log_path`. A failed `start` leaves no process behind; `stop` (also the
    context manager's exit) always terminates and reaps it. If the free port picked in
    `__init__` is taken by someone else before the gateway binds it, `start` retries on
    another one, so read `port`/`url` after `start`."""

    START_ATTEMPTS = 3

    def __init__(self, config: dict, tmp: Path, name: str = "gw"):
        self.config = config
        self.config_path = tmp / f"{name}.yaml"
        self.log_path = tmp / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._ever_ready = False
        self.ready_after_s: float | None = None  # how long the last start took
        self._use_port(free_port())

    def _use_port(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path.write_text(yaml.safe_dump(
            {**self.config, "listen": {"host": "127.0.0.1", "port": self.port},
             "auth": {"admin_token_env": "DG_TEST_ADMIN", "decide_token_env": "DG_TEST_DECIDE",
                      **self.config.get("auth", {})}}))

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 120.0, *, new_session: bool = False) -> GatewayProcess:
        """Start and wait (up to `timeout` s in all) for /readyz; `new_session` puts it (and
        its children) in a process group of its own, to signal the whole group like a
        service manager. The wait returns as soon as it is ready: ~12 s at load average 2.7
        on the 2-core machine, ~40 s at 4 (a CPU hog and a scan), hence the 120 s default."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"gateway {self.url} is already running (pid {self.proc.pid})")
        env = {**os.environ, "DG_TEST_ADMIN": ADMIN, "DG_TEST_DECIDE": DECIDE,
               "PYTHONPATH": str(REPO / "tests")}
        deadline = time.monotonic() + timeout
        for attempt in range(1, self.START_ATTEMPTS + 1):
            with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
                log_start = log.tell()
                self.proc = proc_guard.spawn(
                    [str(Path(PYTHON).parent / "distillguard"), "gateway", "-c",
                     str(self.config_path), "--log-level", "info"],
                    log, env=env, cwd=REPO, new_session=new_session)
            try:
                self.ready_after_s = proc_guard.wait_ready(
                    self.proc, self._ready, what=f"gateway {self.url}", log_path=self.log_path,
                    log_start=log_start, timeout=max(deadline - time.monotonic(), 0.1),
                    term_timeout=15.0)
            except proc_guard.StartError:
                # Lost the race for the port (picked free, taken before the bind): next one.
                if (attempt < self.START_ATTEMPTS and not self._ever_ready
                        and proc_guard.lost_port_race(self.log_path, log_start)
                        and time.monotonic() < deadline):
                    self._use_port(free_port())
                    continue
                raise
            self._ever_ready = True
            return self
        raise AssertionError("unreachable")

    def __enter__(self) -> GatewayProcess:
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        proc_guard.forget(self.proc)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the graceful drain and final flush), wait up to `timeout` s, then
        SIGKILL; always waits for the process."""
        proc_guard.reap(self.proc, term_timeout=timeout)

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path,
                             headers={"authorization": f"Bearer {ADMIN}"}, timeout=10, **kw)
