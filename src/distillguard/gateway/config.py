"""Gateway configuration: one YAML file (examples/gateway.yaml), secrets only by env reference.

Why a key map: the gateway authenticates clients itself, so the API key (never stored, only its
SHA-256) is what ties a request to an account, an org and, through `distillguard scan` findings,
to a campaign cluster.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The gateway configuration is invalid; the message names the offending key."""


@dataclass(frozen=True)
class KeyInfo:
    """Who an API key belongs to."""

    account_id: str
    api_key_id: str | None = None
    org_id: str | None = None


@dataclass
class WalConfig:
    dir: Path = Path("gateway-wal")
    #: "batch": write()+flush per record before the response completes (survives kill -9),
    #: fsync every `fsync_interval_ms`; "always": fsync per record; "off": never fsync.
    fsync: str = "batch"
    fsync_interval_ms: float = 5.0
    segment_max_records: int = 5000
    segment_max_age_s: float = 2.0
    #: "store": a worker process ingests segments into the DuckDB store;
    #: "spool": segments stay in `dir/ready/` for `distillguard ingest` to pick up.
    mode: str = "store"
    #: Each flush costs ~0.2 s of CPU on top of ~0.6 ms per exchange: rarer flushes, less CPU.
    flush_interval_s: float = 5.0
    #: "own": the store worker starts a session of its own, so with autogroup scheduling its
    #: ingest CPU is not charged to the gateway's session; "gateway": it stays in it.
    worker_session: str = "own"


@dataclass
class StateConfig:
    url: str = "memory"  # or redis://host:port/db
    on_failure: str = "open"  # "open": serve on local state; "closed": refuse (503)
    redis_timeout_s: float = 0.05
    enforcement_refresh_s: float = 10.0


@dataclass
class GatewayConfig:
    upstream: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8080
    upstream_timeout_s: float = 600.0
    upstream_connect_timeout_s: float = 5.0
    max_body_bytes: int = 4 << 20
    store: Path = Path("distillguard.duckdb")
    policy: Path | None = None
    wal: WalConfig = field(default_factory=WalConfig)
    state: StateConfig = field(default_factory=StateConfig)
    keys: dict[str, KeyInfo] = field(default_factory=dict)  # sha256(key) hex -> owner
    #: "reject": unknown keys get 401; "hash": the account id is derived from the key, for
    #: deployments where an outer gateway already authenticated the caller.
    unknown_keys: str = "reject"
    #: If set, the gateway sends this key upstream instead of the client's.
    upstream_api_key: str | None = None
    admin_token: str | None = None
    decide_token: str | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Accounts without a campaign from `scan` share a cluster budget per org when true.
    cluster_by_org: bool = False
    appeal_url: str = "https://example.invalid/distillguard/appeal"
    #: "module:function" computing request signals; the batch engine's by default.
    signals: str = "distillguard.signals:annotate_request"
    #: Compute request signals in a child process (off the event loop) instead of inline.
    signals_process: bool = True
    #: Forward while deciding, for accounts not on the enforcement list and not recently
    #: rejected/degraded/throttled; the response is held until the decision allows it.
    decide_during_call: bool = True
    #: "needed": a decision waits for the request's signals only if a limit or rule could
    #: match or not depending on them; "always": every decision waits (one state update).
    signals_wait: str = "needed"

    def lookup_key(self, api_key: str) -> KeyInfo | None:
        """The owner of `api_key`, or None if unknown (and `unknown_keys` is "reject")."""
        digest = hash_key(api_key)
        info = self.keys.get(digest)
        if info is None and self.unknown_keys == "hash":
            info = KeyInfo(account_id=f"key-{digest[:16]}", api_key_id=digest[:16])
        return info

    def is_trusted_proxy(self, address: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def _env(name: str | None, what: str, *, required: bool = False) -> str | None:
    if not name:
        return None
    value = os.environ.get(name)
    if required and not value:
        raise ConfigError(f"{what}: environment variable {name} is not set")
    return value or None


def _parse_keys(entries: Any) -> dict[str, KeyInfo]:
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise ConfigError("keys: expected a list of {key_env|key_sha256, account_id, ...}")
    keys: dict[str, KeyInfo] = {}
    for i, entry in enumerate(entries):
        where = f"keys[{i}]"
        if not isinstance(entry, dict) or not entry.get("account_id"):
            raise ConfigError(f"{where}: needs account_id")
        if "key" in entry:
            raise ConfigError(f"{where}: plaintext keys are not accepted; use key_env or key_sha256")
        if entry.get("key_env"):
            digest = hash_key(_env(entry["key_env"], where, required=True) or "")
        elif entry.get("key_sha256"):
            digest = str(entry["key_sha256"]).lower()
            if len(digest) != 64:
                raise ConfigError(f"{where}: key_sha256 must be 64 hex characters")
        else:
            raise ConfigError(f"{where}: needs key_env or key_sha256")
        keys[digest] = KeyInfo(
            account_id=str(entry["account_id"]),
            api_key_id=str(entry["api_key_id"]) if entry.get("api_key_id") else digest[:16],
            org_id=str(entry["org_id"]) if entry.get("org_id") else None,
        )
    return keys


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping")
    return value


def _choice(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return value


def config_from_dict(raw: dict, base_dir: Path | None = None) -> GatewayConfig:
    """Build a config from parsed YAML; relative paths are resolved against `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError("the gateway config must be a YAML mapping")
    base = base_dir or Path.cwd()

    def path(value: Any) -> Path:
        p = Path(str(value))
        return p if p.is_absolute() else base / p

    cfg = GatewayConfig()
    if "upstream" in raw:
        cfg.upstream = str(raw["upstream"]).rstrip("/")
    listen = _section(raw, "listen")
    cfg.host = str(listen.get("host", cfg.host))
    cfg.port = int(listen.get("port", cfg.port))
    cfg.upstream_timeout_s = float(raw.get("upstream_timeout_s", cfg.upstream_timeout_s))
    cfg.max_body_bytes = int(raw.get("max_body_bytes", cfg.max_body_bytes))
    if raw.get("store"):
        cfg.store = path(raw["store"])
    if raw.get("policy"):
        cfg.policy = path(raw["policy"])
    wal = _section(raw, "wal")
    cfg.wal = WalConfig(
        dir=path(wal.get("dir", "gateway-wal")),
        fsync=_choice(str(wal.get("fsync", "batch")), ("batch", "always", "off"), "wal.fsync"),
        fsync_interval_ms=float(wal.get("fsync_interval_ms", 5.0)),
        segment_max_records=int(wal.get("segment_max_records", 5000)),
        segment_max_age_s=float(wal.get("segment_max_age_s", 2.0)),
        mode=_choice(str(wal.get("mode", "store")), ("store", "spool"), "wal.mode"),
        flush_interval_s=float(wal.get("flush_interval_s", 5.0)),
        worker_session=_choice(str(wal.get("worker_session", "own")), ("own", "gateway"),
                               "wal.worker_session"),
    )
    state = _section(raw, "state")
    cfg.state = StateConfig(
        url=str(state.get("url", "memory")),
        on_failure=_choice(
            str(state.get("on_failure", "open")), ("open", "closed"), "state.on_failure"
        ),
        redis_timeout_s=float(state.get("redis_timeout_s", 0.05)),
        enforcement_refresh_s=float(state.get("enforcement_refresh_s", 10.0)),
    )
    auth = _section(raw, "auth")
    cfg.admin_token = _env(auth.get("admin_token_env"), "auth.admin_token_env")
    cfg.decide_token = _env(auth.get("decide_token_env"), "auth.decide_token_env")
    cfg.upstream_api_key = _env(auth.get("upstream_key_env"), "auth.upstream_key_env")
    cfg.unknown_keys = _choice(
        str(auth.get("unknown_keys", "reject")), ("reject", "hash"), "auth.unknown_keys"
    )
    cfg.keys = _parse_keys(raw.get("keys"))
    proxies = raw.get("trusted_proxies") or []
    try:
        cfg.trusted_proxies = tuple(ipaddress.ip_network(str(p), strict=False) for p in proxies)
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from exc
    cfg.cluster_by_org = bool(raw.get("cluster_by_org", False))
    cfg.appeal_url = str(raw.get("appeal_url", cfg.appeal_url))
    cfg.signals = str(raw.get("signals", cfg.signals))
    if ":" not in cfg.signals:
        raise ConfigError("signals: expected module:function")
    cfg.signals_process = bool(raw.get("signals_process", True))
    cfg.decide_during_call = bool(raw.get("decide_during_call", True))
    cfg.signals_wait = _choice(str(raw.get("signals_wait", cfg.signals_wait)),
                               ("needed", "always"), "signals_wait")
    return cfg


def load_config(path: str | Path | None) -> GatewayConfig:
    """Load `path` (YAML); None gives the defaults. Raises ConfigError with a clear message."""
    if path is None:
        return GatewayConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return config_from_dict(raw, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
