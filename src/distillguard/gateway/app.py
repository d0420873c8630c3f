"""The gateway ASGI app: reverse proxy for OpenAI-compatible servers + decision API + admin.

Hot path per proxied request: authenticate (hash lookup) -> parse body once -> decide (signals,
one state update, policy) -> forward on a keep-alive connection of `upstream.UpstreamPool` ->
pass the response through (SSE chunk by chunk, unbuffered) -> write the exchange ahead to disk
before the response completes. Everything slower (DuckDB ingest, findings refresh, policy
reload, Redis recovery) runs in background tasks or in the store worker process.

The proxied endpoints are plain ASGI (`ProxyHandler`): no Starlette request, response or
router objects on the path every request takes; FastAPI serves everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from distillguard.gateway.config import GatewayConfig, KeyInfo
from distillguard.gateway.decide import Annotate, Decider, Decision, load_annotate
from distillguard.gateway.degrade import StreamDegrader, degrade_request, degrade_response
from distillguard.gateway.exchange import (
    ENDPOINT_BY_PATH,
    ResponseAccumulator,
    iso,
    iter_sse_data,
    request_fields,
)
from distillguard.gateway.metrics import GatewayMetrics
from distillguard.gateway.policy import PolicyError, PolicyHolder
from distillguard.gateway.signals_proc import SignalsProcess
from distillguard.gateway.state import (
    MANUAL_ACTIONS,
    EnforcementList,
    LocalState,
    RedisState,
    StateUnavailable,
    load_snapshot,
    make_state,
    refresh_loop,
)
from distillguard.gateway.upstream import (
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from distillguard.gateway.wal import SNAPSHOT_NAME, StoreWorker, WriteAheadLog, claim_segments

log = logging.getLogger("distillguard.gateway")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
})
UPSTREAM_AUTH = frozenset({b"authorization", b"x-api-key"})
REJECT_STATUS = {"block": 403, "challenge": 403, "throttle": 429}
STREAM_END_MARKERS = (b"data: [DONE]", b"message_stop")
WARMUP_EXCHANGE = {"request_id": "warmup", "ts": "2026-01-01T00:00:00+00:00",
                   "account_id": "warmup", "model": "warmup", "endpoint": "chat.completions",
                   "messages": [{"role": "user", "content": "warm up"}], "params": {}}


class Gateway:
    """Everything one gateway process holds; routes call into it."""

    def __init__(self, cfg: GatewayConfig, *, annotate: Annotate | None = None,
                 start_worker: bool = True):
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        self.policy = PolicyHolder(cfg.policy)
        self.metrics.policy_version.set(self.policy.version)
        self.state = make_state(cfg.state.url, timeout_s=cfg.state.redis_timeout_s,
                                fail_closed=cfg.state.on_failure == "closed")
        if isinstance(self.state, RedisState):
            self.state.on_health_change.append(self.metrics.state_health_changed)
        self.enforcement = EnforcementList()
        self.decider = Decider(self.policy, self.state, self.enforcement,
                               annotate=annotate or load_annotate(cfg.signals),
                               cluster_by_org=cfg.cluster_by_org,
                               signals_wait=cfg.signals_wait)
        #: Signals in a child process unless the caller passed its own function (tests).
        self.signals_process = (SignalsProcess(cfg.signals, WARMUP_EXCHANGE)
                                if cfg.signals_process and annotate is None else None)
        self.start_worker = start_worker and cfg.wal.mode == "store"
        self.client: UpstreamPool | None = None
        self.wal: WriteAheadLog | None = None
        self.worker: StoreWorker | None = None
        self._tasks: list[asyncio.Task] = []
        self._snapshot_stamp: float | None = None
        self._id_prefix = os.urandom(8).hex()  # per process: ids stay unique across replicas
        self._id_seq = itertools.count()
        self._decide_first: dict[str, float] = {}  # account -> until when
        self.ready = False

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        self.client = UpstreamPool(cfg.upstream, timeout_s=cfg.upstream_timeout_s,
                                   connect_timeout_s=cfg.upstream_connect_timeout_s)
        if cfg.wal.mode == "spool":
            claim_segments(cfg.wal.dir)  # seal segments a crashed run left open
        self.wal = WriteAheadLog(cfg.wal.dir, fsync=cfg.wal.fsync,
                                 fsync_interval_ms=cfg.wal.fsync_interval_ms,
                                 segment_max_records=cfg.wal.segment_max_records,
                                 segment_max_age_s=cfg.wal.segment_max_age_s)
        if self.start_worker:
            self.worker = StoreWorker(cfg.wal.dir, cfg.store, cfg.wal.flush_interval_s,
                                      cfg.state.enforcement_refresh_s,
                                      own_session=cfg.wal.worker_session == "own")
            self.worker.start()  # its first pass replays segments a crashed run left behind
        self._load_snapshot()
        # Build the signal annotator (rule packs, classifier) before taking traffic.
        if self.signals_process is not None:
            await self.signals_process.start()
            self.decider.signals_process = self.signals_process
        else:
            await asyncio.to_thread(self.decider.annotate, WARMUP_EXCHANGE)
        # Everything built so far (config, rule packs, classifier tables, imported modules)
        # lives as long as the process: move it out of the collector's generations so a full
        # collection does not walk ~170k long-lived objects while requests wait.
        gc.collect()
        gc.freeze()
        self._gc_callback = self.metrics.gc_callback()
        gc.callbacks.append(self._gc_callback)
        window = self.policy.policy.window_s
        self._tasks = [
            asyncio.create_task(refresh_loop(1.0, self._reload_policy)),
            asyncio.create_task(refresh_loop(1.0, self._refresh_enforcement)),
            asyncio.create_task(refresh_loop(max(1.0, window), self._prune)),
        ]
        if self.signals_process is not None:
            self._tasks.append(asyncio.create_task(
                refresh_loop(1.0, self.signals_process.ensure_running)))
        self.ready = True
        log.info("gateway ready: upstream=%s state=%s wal=%s policy=%s", cfg.upstream,
                 self.state.backend, cfg.wal.dir, cfg.policy)

    async def stop(self) -> None:
        """Graceful: called after the server stopped taking requests and drained them."""
        self.ready = False
        with contextlib.suppress(AttributeError, ValueError):
            gc.callbacks.remove(self._gc_callback)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.client:
            await self.client.close()
        if self.signals_process is not None:
            await self.signals_process.close()
        if self.wal:
            self.wal.close()
        if self.worker:
            await asyncio.to_thread(self.worker.stop)
        await self.state.close()
        log.info("gateway stopped")

    async def _reload_policy(self) -> None:
        before = self.policy.last_error
        if self.policy.reload():
            self.metrics.policy_version.set(self.policy.version)
        elif self.policy.last_error and self.policy.last_error != before:
            self.metrics.policy_reload_errors.inc()

    def _load_snapshot(self) -> None:
        path = self.cfg.wal.dir / SNAPSHOT_NAME
        try:
            stamp = path.stat().st_mtime
        except OSError:
            return
        if stamp == self._snapshot_stamp:
            return
        snapshot = load_snapshot(path)
        if snapshot is not None:
            self.enforcement.replace_findings(snapshot)
            self._snapshot_stamp = stamp
            self.metrics.enforcement_accounts.set(len(self.enforcement.accounts))

    async def _refresh_enforcement(self) -> None:
        self._load_snapshot()
        if isinstance(self.state, RedisState):
            await self.state.try_recover(self.policy.policy.window_s)
            self.enforcement.manual = dict(await self.state.refresh_manual())
        elif isinstance(self.state, LocalState):
            self.enforcement.manual = self.state.manual

    async def _prune(self) -> None:
        local = self.state if isinstance(self.state, LocalState) else self.state.fallback
        now = time.time()
        local.prune(now, self.policy.policy.window_s)
        self.client.prune()
        expired = [a for a, until in self._decide_first.items() if until <= now]
        for account_id in expired:
            del self._decide_first[account_id]

    # ---- helpers -------------------------------------------------------------------------
    def client_ip(self, scope: dict, headers: dict[bytes, bytes]) -> str | None:
        """The peer address, or the first untrusted hop of X-Forwarded-For behind trusted
        proxies (right to left, so a client cannot spoof it by sending its own header)."""
        client = scope.get("client")
        peer = client[0] if client else None
        if peer is None or not self.cfg.is_trusted_proxy(peer):
            return peer
        forwarded = headers.get(b"x-forwarded-for")
        if not forwarded:
            return peer
        hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.cfg.is_trusted_proxy(hop):
                return hop
        return hops[0] if hops else peer

    def authenticate(self, headers: dict[bytes, bytes]) -> KeyInfo | None:
        auth = headers.get(b"authorization")
        key = None
        if auth and auth[:7].lower() == b"bearer ":
            key = auth[7:].strip().decode("latin-1")
        if not key:
            key = headers.get(b"x-api-key", b"").decode("latin-1")
        return self.cfg.lookup_key(key) if key else None

    def log_exchange(self, record: dict) -> None:
        try:
            self.wal.append(record)
            self.metrics.wal_records.inc()
        except Exception:
            self.metrics.wal_errors.inc()
            log.exception("could not write exchange %s ahead", record.get("request_id"))
            raise

    def upstream_headers(self, raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The client's headers minus hop-by-hop ones (and its key, if we hold our own)."""
        if self.cfg.upstream_api_key:
            drop = HOP_BY_HOP | UPSTREAM_AUTH
            return [*((k, v) for k, v in raw if k not in drop),
                    (b"authorization", f"Bearer {self.cfg.upstream_api_key}".encode("latin-1"))]
        return [(k, v) for k, v in raw if k not in HOP_BY_HOP]

    def may_overlap(self, account_id: str, now: float) -> bool:
        """True when this account's request may be decided during its upstream call: it is
        not on the enforcement list and had no non-allow decision within the last window."""
        if self.enforcement.standing(account_id) is not None:
            return False
        until = self._decide_first.get(account_id)
        return until is None or until <= now

    def decide_first(self, account_id: str, now: float) -> None:
        """Decide this account's requests before forwarding them for one policy window."""
        self._decide_first[account_id] = now + self.policy.policy.window_s

    def new_request_id(self) -> str:
        """`gw-` + 32 hex digits: a random per-process prefix and a counter (a uuid4 costs
        a getrandom syscall per request)."""
        return f"gw-{self._id_prefix}{next(self._id_seq):016x}"


def _headers(scope: dict) -> dict[bytes, bytes]:
    """The request's headers by (lower-case, per ASGI) name; the first value wins."""
    return {k: v for k, v in reversed(scope["headers"])}


def _target(scope: dict) -> str:
    """Path and query of the request, to append to the upstream base URL."""
    query = scope.get("query_string")
    return f"{scope['path']}?{query.decode('latin-1')}" if query else scope["path"]


def _error(status: int, code: str, message: str, *, endpoint: str | None = None,
           extra: dict | None = None, headers: dict | None = None) -> Response:
    """An OpenAI-style (or Anthropic-style on /v1/messages) JSON error with a reason code."""
    if endpoint == "messages":
        body: dict[str, Any] = {"type": "error", "error": {"type": code, "message": message}}
    else:
        body = {"error": {"message": message, "type": code, "code": code, "param": None}}
    if extra:
        body["distillguard"] = extra
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


async def _read_body(receive: Any, declared: bytes | str | None, limit: int) -> bytes | None:
    """The request body from ASGI `receive`, or None if it exceeds `limit` bytes (checked
    against Content-Length first, then while reading)."""
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        if not message.get("more_body"):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _decode(raw: bytes, encoding: bytes | None) -> bytes | None:
    if not encoding or encoding == b"identity":
        return raw
    if encoding in (b"gzip", b"x-gzip"):
        return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
    if encoding == b"deflate":
        return zlib.decompress(raw)
    return None


def _response_headers(resp: UpstreamResponse, *, drop_encoding: bool = False) -> list:
    drop = HOP_BY_HOP | ({b"content-encoding"} if drop_encoding else frozenset())
    out = []
    for k, v in resp.headers:
        k = k.lower()
        if k not in drop:
            out.append((k, v))
    return out


def _abandon(task: asyncio.Task) -> None:
    """Cancel a speculative upstream call. Cancelling closes its connection, which is how
    OpenAI-compatible servers learn to stop generating; a response that already arrived is
    closed unread, so the client never sees any of it."""

    def close(done: asyncio.Task) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result()[0].close()

    if task.done():
        close(task)
    else:
        task.cancel()
        task.add_done_callback(close)


def _gateway_fields(decision: Decision) -> dict[str, Any]:
    """Unknown top-level fields: ingest keeps them in the record's `extra` map."""
    fields: dict[str, Any] = {"gateway_action": decision.action}
    if decision.reasons:
        fields["gateway_reasons"] = decision.reasons
    if decision.would_action != decision.action:
        fields["gateway_would_action"] = decision.would_action
        fields["gateway_monitored_rules"] = decision.monitored
    if decision.cluster_id:
        fields["gateway_cluster_id"] = decision.cluster_id
    return fields


class ProxyHandler:
    """The proxied endpoints as one plain ASGI app (see `fast_path`)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.cfg = gw.cfg
        self.m = gw.metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        response = await self.exchange(scope, receive, send)
        if response is not None:  # an error or a rejection, built by Starlette
            await response(scope, receive, send)

    def record_decision(self, decision: Decision) -> None:
        m = self.m
        if decision.action == "allow":
            m.decisions.labels("allow", "").inc()
        for reason in decision.reasons:
            m.decisions.labels(decision.action, reason).inc()
        for rule in decision.monitored:
            m.monitored.labels(decision.would_action, rule).inc()
        if decision.action != "allow" or decision.monitored:
            log.info("decision %s", orjson.dumps(decision.as_dict()).decode())

    def reject(self, decision: Decision, endpoint: str, request_id: str) -> Response:
        appeal_url = self.cfg.appeal_url
        status = REJECT_STATUS[decision.action]
        code = decision.reasons[0] if decision.reasons else decision.action
        extra = {"action": decision.action, "reason_codes": decision.reasons,
                 "request_id": request_id, "appeal_url": appeal_url}
        headers = {"x-distillguard-decision": decision.action, "x-distillguard-reason": code,
                   "x-request-id": request_id}
        if decision.action == "throttle":
            retry = max(1, int(decision.retry_after_s + 0.999))
            headers["retry-after"] = str(retry)
            extra["retry_after_s"] = round(decision.retry_after_s, 3)
            message = "rate limit reached for this account or its cluster; retry later"
        elif decision.action == "challenge":
            message = decision.message or (
                "this request needs verification before it can be served; "
                f"appeal or verify at {appeal_url} quoting request id {request_id}")
        else:
            message = decision.message or (
                f"this account is blocked; appeal at {appeal_url} quoting {request_id}")
        return _error(status, f"distillguard_{decision.action}", message, endpoint=endpoint,
                      extra={**extra, "reason": code}, headers=headers)

    async def send_upstream(self, target: str, raw: bytes, headers: list) -> tuple:
        """The upstream call; returns the response (head read) and when it arrived."""
        resp = await self.gw.client.request("POST", target, headers, raw)
        return resp, time.perf_counter()

    def bad_request(self, endpoint: str, status: int, reason: str, code: str,
                    message: str) -> Response:
        self.m.rejected.labels(reason).inc()
        self.m.requests.labels(endpoint, str(status)).inc()
        return _error(status, code, message, endpoint=endpoint)

    async def exchange(self, scope: dict, receive: Any, send: Any) -> Response | None:
        """One proxied request; returns a response to send, or None once it sent one."""
        gw, cfg, m = self.gw, self.cfg, self.m
        t0 = time.perf_counter()
        ts = time.time()
        endpoint = ENDPOINT_BY_PATH[scope["path"]]
        headers = _headers(scope)
        key = gw.authenticate(headers)
        if key is None:
            return self.bad_request(endpoint, 401, "unauthenticated", "invalid_api_key",
                                    "missing or unknown API key")
        raw = await _read_body(receive, headers.get(b"content-length"), cfg.max_body_bytes)
        if raw is None:
            return self.bad_request(endpoint, 413, "too_large", "request_too_large",
                                    f"request body exceeds {cfg.max_body_bytes} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self.bad_request(endpoint, 400, "bad_json", "invalid_request_error",
                                    f"request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return self.bad_request(endpoint, 400, "bad_json", "invalid_request_error",
                                    "request body must be a JSON object")
        request_id = gw.new_request_id()
        exchange = request_fields(endpoint, body)
        user_agent = headers.get(b"user-agent")
        exchange.update(request_id=request_id, ts=iso(ts), account_id=key.account_id,
                        api_key_id=key.api_key_id, org_id=key.org_id,
                        ip=gw.client_ip(scope, headers),
                        user_agent=user_agent.decode("latin-1") if user_agent else None)
        target, upstream_headers = _target(scope), gw.upstream_headers(scope["headers"])
        # Decide during the upstream call when the decision cannot change the request itself
        # (docs/gateway.md, "Decision during the upstream call"): the response is held until
        # the decision allows it; a rejected request's upstream call is cancelled, a degraded
        # one is re-sent degraded. Accounts on the enforcement list or recently not allowed
        # are decided first.
        # A decision that needs no waiting (no signal could change it, local state) is
        # complete before anything could be sent, so nothing is sent speculatively.
        speculative = None
        t_up = t0
        try:
            decision = gw.decider.decide_now(exchange, key, now=ts)
            if not isinstance(decision, Decision):
                if cfg.decide_during_call and gw.may_overlap(key.account_id, ts):
                    t_up = time.perf_counter()
                    speculative = asyncio.create_task(
                        self.send_upstream(target, raw, upstream_headers))
                decision = await gw.decider.finish(decision)
        except StateUnavailable:
            if speculative is not None:
                _abandon(speculative)
            decision = Decision(action="block", would_action="block",
                                reasons=["state_unavailable"])
            m.requests.labels(endpoint, "503").inc()
            gw.log_exchange({**exchange, "status": 503, "error": "state_unavailable",
                             **_gateway_fields(decision)})
            return _error(503, "distillguard_state_unavailable",
                          "the gateway cannot reach its shared state; retry shortly",
                          endpoint=endpoint, headers={"retry-after": "1"})
        except BaseException:  # cancelled (shutdown) or a bug: never leave the call running
            if speculative is not None:
                _abandon(speculative)
            raise
        t_decided = time.perf_counter()
        m.decision_latency.observe(t_decided - t0)
        self.record_decision(decision)
        gw_fields = _gateway_fields(decision)
        if decision.action != "allow":
            gw.decide_first(key.account_id, ts)
        if decision.action in REJECT_STATUS:
            status = REJECT_STATUS[decision.action]
            response = self.reject(decision, endpoint, request_id)
            if speculative is not None:
                _abandon(speculative)
                m.upstream_cancelled.inc()
                gw_fields["gateway_upstream_cancelled"] = True
            gw.log_exchange({**exchange, "status": status, "error": decision.reasons[0]
                             if decision.reasons else decision.action, **gw_fields})
            m.requests.labels(endpoint, str(status)).inc()
            m.added_latency.observe(time.perf_counter() - t0)
            return response
        spec = decision.degrade if decision.action == "degrade" else None
        if spec is not None:
            raw = orjson.dumps(degrade_request(body, spec, endpoint))
            if speculative is not None:  # sent as the client wrote it: send it degraded
                _abandon(speculative)
                m.upstream_cancelled.inc()
                speculative = None
        try:
            if speculative is None:
                t_up = time.perf_counter()
                resp, t_headers = await self.send_upstream(target, raw, upstream_headers)
                held = 0.0
            else:
                resp, t_headers = await speculative
                held = max(0.0, t_decided - t_headers)  # response waited for the decision
        except UpstreamTimeout as exc:
            return self.upstream_failure(exchange, gw_fields, endpoint, 504, "upstream_timeout",
                                         exc, t_up)
        except UpstreamError as exc:
            return self.upstream_failure(exchange, gw_fields, endpoint, 502,
                                         "upstream_unreachable", exc, t_up)
        ctype = resp.header(b"content-type")
        if ctype and ctype.startswith(b"text/event-stream"):
            await self.stream(receive, send, resp, exchange, gw_fields, endpoint, spec,
                              t_up - t0 + held, t_up)
            return None
        try:
            data = await resp.read()
        except UpstreamTimeout as exc:
            return self.upstream_failure(exchange, gw_fields, endpoint, 504, "upstream_timeout",
                                         exc, t_up)
        except UpstreamError as exc:
            return self.upstream_failure(exchange, gw_fields, endpoint, 502, "upstream_broken",
                                         exc, t_up)
        finally:
            resp.release()
        t_down = time.perf_counter()
        acc = ResponseAccumulator(endpoint)
        parsed = None
        try:
            plain = _decode(data, resp.header(b"content-encoding"))
            parsed = orjson.loads(plain) if plain else None
        except (zlib.error, orjson.JSONDecodeError):
            plain = None
        ok = isinstance(parsed, dict) and resp.status < 400
        if ok:
            acc.from_body(parsed)
        record = {**exchange, **acc.fields(), "status": resp.status,
                  "latency_ms": round((t_down - t_up) * 1000, 3), **gw_fields}
        if resp.status >= 400:
            record["error"] = (plain or data)[:2000].decode("utf-8", "replace")
        if spec is not None and ok:
            data = orjson.dumps(degrade_response(parsed, spec, endpoint))
        gw.log_exchange(record)
        out_headers = _response_headers(resp, drop_encoding=spec is not None and ok)
        if spec is not None:
            out_headers.append((b"x-distillguard-decision", b"degrade"))
        out_headers.append((b"content-length", b"%d" % len(data)))
        m.requests.labels(endpoint, str(resp.status)).inc()
        m.added_latency.observe((t_up - t0) + held + (time.perf_counter() - t_down))
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": out_headers})
        await send({"type": "http.response.body", "body": data})
        return None

    def upstream_failure(self, exchange: dict, gw_fields: dict, endpoint: str, status: int,
                         code: str, exc: Exception, t_up: float) -> Response:
        self.m.upstream_errors.labels(code).inc()
        self.m.requests.labels(endpoint, str(status)).inc()
        self.gw.log_exchange({**exchange, "status": status, "error": f"{code}: {exc!r}"[:2000],
                              "latency_ms": round((time.perf_counter() - t_up) * 1000, 3),
                              **gw_fields})
        log.warning("upstream %s for %s: %r", code, exchange["request_id"], exc)
        return _error(status, code, f"upstream {code.replace('_', ' ')}", endpoint=endpoint)

    async def stream(self, receive: Any, send: Any, resp: UpstreamResponse, exchange: dict,
                     gw_fields: dict, endpoint: str, spec: Any, added: float,
                     t_up: float) -> None:
        """Pass an SSE response through chunk by chunk (rewritten event by event when
        degraded); the exchange is written ahead before the chunk that ends the stream.
        A client that hangs up closes the upstream connection (the model stops)."""
        m = self.m
        degrader = StreamDegrader(spec, endpoint) if spec is not None else None
        headers = _response_headers(resp, drop_encoding=degrader is not None)
        if degrader is not None:
            headers.append((b"x-distillguard-decision", b"degrade"))
        m.added_latency.observe(added)
        # The record's response fields are accumulated event by event as chunks pass, so
        # the chunk that ends the stream waits only for the WAL write, not for a parse of
        # the whole stream.
        acc = ResponseAccumulator(endpoint)
        partial = b""  # an event line split across chunks
        logged = gone = False
        error = None

        def write_log() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            if partial:
                for event in iter_sse_data(partial):
                    acc.from_event(event)
            record = {**exchange, **acc.fields(), "status": resp.status,
                      "latency_ms": round((time.perf_counter() - t_up) * 1000, 3),
                      **gw_fields}
            if error:
                record["error"] = error
            self.gw.log_exchange(record)

        def hung_up(message: asyncio.Future) -> None:
            # The body was read, so the next message is the disconnect.
            nonlocal gone
            if not message.cancelled():
                gone = True
                resp.close()

        watch = asyncio.ensure_future(receive())
        watch.add_done_callback(hung_up)
        try:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": headers})
            async for chunk in resp.iter_chunks():
                joined = partial + chunk if partial else chunk
                cut = joined.rfind(b"\n") + 1
                partial = joined[cut:]
                if cut:
                    for event in iter_sse_data(joined[:cut]):
                        acc.from_event(event)
                out = degrader.feed(chunk) if degrader else chunk
                if any(marker in chunk for marker in STREAM_END_MARKERS):
                    write_log()  # on disk before the client sees the end of the stream
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if degrader:
                tail = degrader.finish()
                write_log()
                if tail:
                    await send({"type": "http.response.body", "body": tail, "more_body": True})
        except UpstreamError as exc:
            if gone:
                error = "client_disconnected"
            else:
                error = f"upstream_broken: {exc!r}"[:2000]
                m.upstream_errors.labels("upstream_broken").inc()
        except BaseException:
            error = "client_disconnected"
            raise
        finally:
            watch.remove_done_callback(hung_up)
            watch.cancel()
            write_log()
            resp.release()
            m.requests.labels(endpoint, str(resp.status)).inc()
        if not gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(cfg: GatewayConfig, *, annotate: Annotate | None = None,
               start_worker: bool = True) -> FastAPI:
    """The gateway app. `annotate` overrides the request-signal function (tests, benchmarks)."""
    gw = Gateway(cfg, annotate=annotate, start_worker=start_worker)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="distillguard gateway", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.gateway = gw
    proxy = ProxyHandler(gw)
    for path in ENDPOINT_BY_PATH:
        app.add_route(path, proxy, methods=["POST"], include_in_schema=False)
    app.state.proxy = proxy

    @app.get("/v1/models", include_in_schema=False)
    async def models(request: Request) -> Response:
        if gw.authenticate(_headers(request.scope)) is None:
            gw.metrics.rejected.labels("unauthenticated").inc()
            return _error(401, "invalid_api_key", "missing or unknown API key")
        try:
            resp = await gw.client.request("GET", _target(request.scope),
                                           gw.upstream_headers(request.scope["headers"]))
            try:
                data = await resp.read()
            finally:
                resp.release()
        except UpstreamTimeout:
            return _error(504, "upstream_timeout", "upstream timeout")
        except UpstreamError:
            return _error(502, "upstream_unreachable", "upstream unreachable")
        out = Response(data, status_code=resp.status)
        out.raw_headers = [*_response_headers(resp), (b"content-length", b"%d" % len(data))]
        return out

    _install_service_routes(app, gw)
    return app


def fast_path(app: FastAPI) -> Any:
    """ASGI entry that sends the proxied endpoints straight to their handler.

    FastAPI's middleware stack, router and dependency solving cost ~0.1-0.2 ms per request on
    a 2-core machine; the proxy handler needs none of them (it builds its own responses and
    never raises for bad input). Everything else, and the lifespan, goes through FastAPI.
    """
    proxy = app.state.proxy

    async def asgi(scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and \
                scope["path"] in ENDPOINT_BY_PATH:
            await proxy(scope, receive, send)
            return
        await app(scope, receive, send)

    asgi.app = app
    return asgi


def _token_ok(request: Request, *tokens: str | None) -> bool:
    """Constant-time check of the bearer token against the configured ones."""
    auth = request.headers.get("authorization", "")
    presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return bool(presented) and any(
        t and hmac.compare_digest(presented.encode(), t.encode()) for t in tokens
    )


def _install_service_routes(app: FastAPI, gw: Gateway) -> None:
    """Decision API, exchange logging API, admin, metrics and health endpoints."""
    cfg, m = gw.cfg, gw.metrics

    def denied(what: str) -> Response:
        m.rejected.labels("unauthenticated").inc()
        return _error(401, "unauthorized", f"{what} needs a valid bearer token")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        health = gw.state.health()
        ok = gw.ready and (health["healthy"] or cfg.state.on_failure == "open")
        body = {"ready": ok, "state_healthy": health["healthy"]}
        return Response(orjson.dumps(body), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if not _token_ok(request, cfg.admin_token):
            return denied("/metrics")
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/decide")
    async def decide(request: Request) -> Response:
        """Request metadata + prompt -> decision, reasons and degrade instructions."""
        if not _token_ok(request, cfg.decide_token, cfg.admin_token):
            return denied("/v1/decide")
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _error(400, "invalid_request_error", f"body is not JSON: {exc}")
        if not isinstance(payload, dict) or not isinstance(payload.get("request"), dict):
            return _error(422, "invalid_request_error",
                          "expected {account_id|api_key, endpoint, request: {...}}")
        if payload.get("api_key"):
            key = cfg.lookup_key(str(payload["api_key"]))
            if key is None:
                return _error(422, "unknown_api_key", "api_key is not in the key map")
        elif payload.get("account_id"):
            key = KeyInfo(account_id=str(payload["account_id"]),
                          api_key_id=payload.get("api_key_id"), org_id=payload.get("org_id"))
        else:
            return _error(422, "invalid_request_error", "needs account_id or api_key")
        endpoint = payload.get("endpoint", "chat.completions")
        if endpoint not in ENDPOINT_BY_PATH.values():
            return _error(422, "invalid_request_error",
                          f"endpoint must be one of {sorted(ENDPOINT_BY_PATH.values())}")
        ts = time.time()
        request_id = str(payload.get("request_id") or gw.new_request_id())
        exchange = request_fields(endpoint, payload["request"])
        exchange.update(request_id=request_id, ts=iso(ts), account_id=key.account_id,
                        api_key_id=key.api_key_id, org_id=key.org_id, ip=payload.get("ip"),
                        user_agent=payload.get("user_agent"))
        try:
            decision = await gw.decider.decide(exchange, key, now=ts)
        except StateUnavailable:
            return _error(503, "distillguard_state_unavailable", "shared state unreachable")
        for reason in decision.reasons:
            m.decisions.labels(decision.action, reason).inc()
        body = {"request_id": request_id, "account_id": key.account_id, **decision.as_dict()}
        if decision.action in REJECT_STATUS:
            body["http_status"] = REJECT_STATUS[decision.action]
            body["appeal_url"] = cfg.appeal_url
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/v1/exchanges")
    async def exchanges(request: Request) -> Response:
        """Log exchanges served by another gateway (log-contract records, one or a list)."""
        if not _token_ok(request, cfg.decide_token, cfg.admin_token):
            return denied("/v1/exchanges")
        raw = await _read_body(request.receive, request.headers.get("content-length"),
                               cfg.max_body_bytes)
        if raw is None:
            return _error(413, "request_too_large", "body too large")
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return _error(400, "invalid_request_error", f"body is not JSON: {exc}")
        records = payload if isinstance(payload, list) else [payload]
        bad = [i for i, r in enumerate(records)
               if not isinstance(r, dict) or not all(r.get(k) for k in
                                                     ("request_id", "ts", "account_id", "model"))
               or not isinstance(r.get("messages"), list)]
        if bad:
            return _error(422, "invalid_request_error",
                          f"records {bad[:10]} miss request_id, ts, account_id, model or "
                          "messages (see docs/log-contract.md)")
        for r in records:
            gw.log_exchange(r)
        return Response(orjson.dumps({"logged": len(records)}), media_type="application/json")

    @app.post("/admin/reload")
    async def reload(request: Request) -> Response:
        if not _token_ok(request, cfg.admin_token):
            return denied("/admin")
        changed = gw.policy.reload(force=True)
        m.policy_version.set(gw.policy.version)
        if not changed and gw.policy.last_error:
            m.policy_reload_errors.inc()
            return _error(422, "policy_invalid", gw.policy.last_error)
        return Response(orjson.dumps({"policy_version": gw.policy.version}),
                        media_type="application/json")

    @app.get("/admin/state")
    async def state(request: Request) -> Response:
        if not _token_ok(request, cfg.admin_token):
            return denied("/admin")
        body = {
            "state": gw.state.health(),
            "policy": {"version": gw.policy.version, "source": gw.policy.policy.source,
                       "mode": gw.policy.policy.mode, "last_error": gw.policy.last_error},
            "enforcement": {"accounts": len(gw.enforcement.accounts),
                            "campaigns": len(gw.enforcement.campaigns),
                            "manual": len(gw.enforcement.manual),
                            "loaded_at": gw.enforcement.loaded_at},
            "decisions": {"without_waiting_for_signals": gw.decider.decided_early,
                          "waited_for_signals": gw.decider.decided_with_signals,
                          "signal_errors_after_decision": gw.decider.signal_errors},
            "wal": {"records": gw.wal.records if gw.wal else 0,
                    "pending_segments": gw.wal.pending_segments() if gw.wal else 0,
                    "dir": str(cfg.wal.dir)},
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/admin/accounts/{account_id}")
    async def account(account_id: str, request: Request) -> Response:
        if not _token_ok(request, cfg.admin_token):
            return denied("/admin")
        standing = gw.enforcement.standing(account_id)
        body = {"account_id": account_id,
                "standing": None if standing is None else {
                    "score": standing.score, "flagged": standing.flagged,
                    "campaign_id": standing.campaign_id, "manual": standing.manual}}
        return Response(orjson.dumps(body), media_type="application/json")

    @app.put("/admin/accounts/{account_id}")
    async def set_account(account_id: str, request: Request) -> Response:
        """Operator action for one account: {"action": "block"|"challenge"|"degrade"|"allow"|null}."""
        if not _token_ok(request, cfg.admin_token):
            return denied("/admin")
        try:
            action = orjson.loads(await request.body()).get("action")
        except (orjson.JSONDecodeError, AttributeError):
            return _error(400, "invalid_request_error", 'expected {"action": ...}')
        if action is not None and action not in MANUAL_ACTIONS:
            return _error(422, "invalid_request_error",
                          f"action must be one of {MANUAL_ACTIONS} or null")
        await gw.state.set_manual(account_id, action)
        if action is None:
            gw.enforcement.manual.pop(account_id, None)
        else:
            gw.enforcement.manual[account_id] = action
        log.info("operator set %s -> %s", account_id, action)
        return Response(orjson.dumps({"account_id": account_id, "action": action}),
                        media_type="application/json")


def load_app(config_path: str | Path | None = None, **overrides: Any) -> Any:
    """The ASGI app for a config file plus keyword overrides, e.g. for
    `uvicorn --factory distillguard.gateway.app:load_app` or another ASGI server."""
    from distillguard.gateway.config import load_config

    cfg = load_config(config_path)
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    return fast_path(create_app(cfg))


__all__ = ["Gateway", "PolicyError", "create_app", "fast_path", "load_app"]
