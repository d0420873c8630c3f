"""`distillguard gateway` commands: run the proxy / decision API, replay a write-ahead log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from distillguard.cli import app
from distillguard.cli.common import DbOption, console, fail


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: what log shippers and `jq` expect from a service."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _setup_logging(level: str, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if json_logs else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@app.command("gateway")
def gateway(
    upstream: Annotated[str | None, typer.Option(
        help="Base URL of the OpenAI-compatible model server (overrides the config).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Gateway YAML (see examples/gateway.yaml).", exists=True,
        dir_okay=False)] = None,
    db: DbOption = None,  # type: ignore[assignment]
    policy: Annotated[Path | None, typer.Option(
        help="Policy YAML (overrides the config; hot-reloaded).", exists=True,
        dir_okay=False)] = None,
    state: Annotated[str | None, typer.Option(
        help="Live state: memory (default) or redis://host:port/db.")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    wal_dir: Annotated[Path | None, typer.Option(help="Write-ahead log directory.")] = None,
    spool: Annotated[bool, typer.Option(
        help="Leave WAL segments for `distillguard ingest` instead of writing the store.")]
    = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    json_logs: Annotated[bool, typer.Option(help="Structured (JSON) log lines.")] = True,
    check: Annotated[bool, typer.Option(
        "--check", help="Validate config and policy, print the effective settings, exit.")]
    = False,
) -> None:
    """Run the real-time gateway: a reverse proxy in front of an OpenAI-compatible server.

    Serves /v1/chat/completions, /v1/completions, /v1/messages and /v1/models; scores every request, enforces the policy, logs every exchange into the store; also serves the decision API (POST /v1/decide), /metrics, /healthz, /readyz and /admin/*. Reference: docs/gateway.md.

    Example:

        distillguard gateway --upstream http://127.0.0.1:8000 -c examples/gateway.yaml --db dg.duckdb
    """
    from distillguard.gateway.config import ConfigError, load_config
    from distillguard.gateway.policy import PolicyError, PolicyHolder

    _setup_logging(log_level, json_logs)
    try:
        cfg = load_config(config)
        if upstream:
            cfg.upstream = upstream.rstrip("/")
        if db is not None:
            cfg.store = db
        if policy is not None:
            cfg.policy = policy
        if state:
            cfg.state.url = state
        if host:
            cfg.host = host
        if port is not None:
            cfg.port = port
        if wal_dir is not None:
            cfg.wal.dir = wal_dir
        if spool:
            cfg.wal.mode = "spool"
        holder = PolicyHolder(cfg.policy)
    except (ConfigError, PolicyError) as exc:
        raise fail(str(exc)) from exc
    if check:
        p = holder.policy
        console.print(f"upstream   {cfg.upstream}\nlisten     {cfg.host}:{cfg.port}\n"
                      f"store      {cfg.store} (wal {cfg.wal.dir}, mode {cfg.wal.mode}, "
                      f"fsync {cfg.wal.fsync})\nstate      {cfg.state.url} "
                      f"(fail-{cfg.state.on_failure})\nkeys       {len(cfg.keys)}\n"
                      f"policy     {p.source}: mode {p.mode}, {len(p.rules)} rules, "
                      f"{len(p.limits)} limits\nsignals    {cfg.signals} ("
                      f"{'child process' if cfg.signals_process else 'in-process'}; decided "
                      f"{'during' if cfg.decide_during_call else 'before'} the upstream call "
                      f"for accounts in good standing)\nadmin      "
                      f"{'token set' if cfg.admin_token else 'NO TOKEN: admin API disabled'}")
        return
    import uvicorn

    from distillguard.gateway.app import create_app, fast_path

    try:
        application = fast_path(create_app(cfg))
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    uvicorn.run(application, host=cfg.host, port=cfg.port, loop="uvloop", http="httptools",
                access_log=False, log_config=None, timeout_graceful_shutdown=30,
                backlog=4096, server_header=False, date_header=False,
                proxy_headers=False)  # X-Forwarded-For is judged by trusted_proxies


@app.command("gateway-flush")
def gateway_flush(
    wal_dir: Annotated[Path, typer.Argument(help="The gateway's write-ahead log directory.")],
    db: DbOption = Path("distillguard.duckdb"),
) -> None:
    """Ingest a gateway's write-ahead log segments into the store (after a crash, or in spool mode).

    Segments still held by a running gateway are left alone; ingest is idempotent on request_id.

    Example:

        distillguard gateway-flush gateway-wal --db dg.duckdb
    """
    import duckdb

    from distillguard.gateway.wal import flush_once

    if not wal_dir.is_dir():
        raise fail(f"{wal_dir}: not a directory")
    try:
        n = flush_once(wal_dir, db, export_snapshot=True)
    except duckdb.IOException as exc:
        raise fail(f"{db}: store is locked by another process ({exc})") from exc
    console.print(f"ingested {n} new exchange(s) from {wal_dir} into {db}")
