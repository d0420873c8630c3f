"""Live state behind one interface: windowed counters, template sketches and token buckets per
account and per cluster, plus the enforcement list.

`LocalState` keeps everything in this process. `RedisState` keeps it in Redis so several gateway
replicas agree, doing the whole per-request update in ONE round trip (a Lua script), and falls back
to a `LocalState` when Redis is unreachable (fail-open, or fail-closed if configured). When Redis
returns, what was counted locally during the outage is merged back (resynchronisation).

Windows are fixed (`window_s`) and read as a sliding estimate: current + previous * (1 - elapsed
fraction), the usual approximation that needs two counters instead of a log of timestamps.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import orjson

log = logging.getLogger("distillguard.gateway")

#: Per-window cap on remembered template signatures per account (bounded memory).
TEMPLATE_SET_CAP = 4096
MANUAL_ACTIONS = ("block", "challenge", "degrade", "allow")


class StateUnavailable(RuntimeError):
    """Shared state is down and the gateway is configured to fail closed."""


@dataclass(slots=True)
class BucketRequest:
    """Take one token from bucket `limit_id` of `key` (an account or cluster id)."""

    limit_id: str
    key: str
    rate: float
    burst: float


@dataclass(slots=True)
class LiveView:
    """What the state knows about this request's account and cluster, after counting it."""

    requests: float = 0.0
    cot_share: float = 0.0
    template_repeat_share: float = 0.0
    cluster_requests: float = 0.0
    cluster_active_accounts: float = 0.0
    denied: str | None = None  # limit id of the first bucket without a token
    retry_after_s: float = 0.0
    backend: str = "memory"


@dataclass(slots=True)
class Standing:
    """An account's entry on the enforcement list (from `scan` findings and/or an operator)."""

    score: float = 0.0
    flagged: bool = False
    campaign_id: str | None = None
    manual: str | None = None  # operator action: block | challenge | degrade | allow


class LiveState(Protocol):
    backend: str

    async def observe(
        self,
        account_id: str,
        cluster_id: str | None,
        template_sig: str | None,
        cot: bool,
        buckets: list[BucketRequest],
        now: float,
        window_s: float,
    ) -> LiveView: ...

    async def add_signals(self, account_id: str, template_sig: str | None, cot: bool,
                          now: float, window_s: float) -> tuple[float, float]: ...

    async def set_manual(self, account_id: str, action: str | None) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> dict: ...


def _sliding(cur: float, prev: float, frac: float) -> float:
    return cur + prev * (1.0 - frac)


def _fill(view: LiveView, a_cur, a_prev, c_cur, c_prev, act_cur, act_prev, frac: float) -> None:
    """Turn raw window counters (n, cot, rep tuples) into the sliding figures of `view`."""
    n = _sliding(a_cur[0], a_prev[0], frac)
    view.requests = n
    if n > 0:
        view.cot_share = _sliding(a_cur[1], a_prev[1], frac) / n
        view.template_repeat_share = _sliding(a_cur[2], a_prev[2], frac) / n
    view.cluster_requests = _sliding(c_cur, c_prev, frac)
    view.cluster_active_accounts = max(float(act_cur), act_prev * (1.0 - frac))


@dataclass
class EnforcementList:
    """Account -> standing, and campaign -> (score, size); swapped whole on refresh."""

    accounts: dict[str, Standing] = field(default_factory=dict)
    campaigns: dict[str, tuple[float, int]] = field(default_factory=dict)
    manual: dict[str, str] = field(default_factory=dict)
    loaded_at: float = 0.0

    def standing(self, account_id: str) -> Standing | None:
        found = self.accounts.get(account_id)
        action = self.manual.get(account_id)
        if action is None:
            return found
        base = found or Standing()
        return Standing(base.score, base.flagged, base.campaign_id, action)

    def replace_findings(self, snapshot: dict) -> None:
        """Install an enforcement snapshot written by the store worker (see wal.py)."""
        accounts = {
            a: Standing(float(s or 0.0), bool(f), c) for a, s, f, c in snapshot.get("accounts", [])
        }
        campaigns = {c: (float(s or 0.0), int(n or 0)) for c, s, n in snapshot.get("campaigns", [])}
        self.accounts, self.campaigns = accounts, campaigns
        self.loaded_at = time.time()


class _AccountWindow:
    __slots__ = ("cur", "idx", "prev", "tpl_cur", "tpl_prev")

    def __init__(self, idx: int):
        self.idx = idx
        self.cur = [0, 0, 0]  # requests, cot, template repeats
        self.prev = [0, 0, 0]
        self.tpl_cur: set[str] = set()
        self.tpl_prev: set[str] = set()

    def roll(self, idx: int) -> None:
        if idx == self.idx:
            return
        if idx == self.idx + 1:
            self.prev, self.tpl_prev = self.cur, self.tpl_cur
        else:
            self.prev, self.tpl_prev = [0, 0, 0], set()
        self.cur, self.tpl_cur, self.idx = [0, 0, 0], set(), idx


class _ClusterWindow:
    __slots__ = ("act_cur", "act_prev", "cur", "idx", "prev")

    def __init__(self, idx: int):
        self.idx, self.cur, self.prev = idx, 0, 0
        self.act_cur: set[str] = set()
        self.act_prev: set[str] = set()

    def roll(self, idx: int) -> None:
        if idx == self.idx:
            return
        if idx == self.idx + 1:
            self.prev, self.act_prev = self.cur, self.act_cur
        else:
            self.prev, self.act_prev = 0, set()
        self.cur, self.act_cur, self.idx = 0, set(), idx


class LocalState:
    """All live state in this process: O(1) per request, pruned of idle keys periodically."""

    backend = "memory"

    def __init__(self) -> None:
        self.accounts: dict[str, _AccountWindow] = {}
        self.clusters: dict[str, _ClusterWindow] = {}
        self.buckets: dict[tuple[str, str], list[float]] = {}  # -> [tokens, ts, rate, burst]
        self.manual: dict[str, str] = {}

    def observe_sync(
        self,
        account_id: str,
        cluster_id: str | None,
        template_sig: str | None,
        cot: bool,
        buckets: list[BucketRequest],
        now: float,
        window_s: float,
    ) -> LiveView:
        idx = int(now // window_s)
        frac = (now % window_s) / window_s
        win = self.accounts.get(account_id)
        if win is None:
            win = self.accounts[account_id] = _AccountWindow(idx)
        win.roll(idx)
        win.cur[0] += 1
        if cot:
            win.cur[1] += 1
        if template_sig:
            if template_sig in win.tpl_cur:
                win.cur[2] += 1
            else:
                if template_sig in win.tpl_prev:
                    win.cur[2] += 1
                if len(win.tpl_cur) < TEMPLATE_SET_CAP:
                    win.tpl_cur.add(template_sig)
        c_cur = c_prev = act_cur = act_prev = 0
        if cluster_id is not None:
            cw = self.clusters.get(cluster_id)
            if cw is None:
                cw = self.clusters[cluster_id] = _ClusterWindow(idx)
            cw.roll(idx)
            cw.cur += 1
            cw.act_cur.add(account_id)
            c_cur, c_prev, act_cur, act_prev = cw.cur, cw.prev, len(cw.act_cur), len(cw.act_prev)
        view = LiveView(backend=self.backend)
        _fill(view, win.cur, win.prev, c_cur, c_prev, act_cur, act_prev, frac)
        self._take(buckets, now, view)
        return view

    def add_signals_sync(self, account_id: str, template_sig: str | None, cot: bool,
                         now: float, window_s: float) -> tuple[float, float]:
        """Count the signals of a request already counted by `observe` without them (its
        `cot` and template repeat, in the window of its own `now`); returns the account's
        (cot_share, template_repeat_share) after it."""
        idx = int(now // window_s)
        win = self.accounts.get(account_id)
        if win is None or idx < win.idx - 1:
            return 0.0, 0.0  # pruned or two windows old: nothing left to count into
        if idx > win.idx:
            win.roll(idx)
        counts, seen, prev = ((win.cur, win.tpl_cur, win.tpl_prev) if idx == win.idx
                              else (win.prev, win.tpl_prev, set()))
        if cot:
            counts[1] += 1
        if template_sig:
            if template_sig in seen or template_sig in prev:
                counts[2] += 1
            if template_sig not in seen and len(seen) < TEMPLATE_SET_CAP:
                seen.add(template_sig)
        view = LiveView()
        _fill(view, win.cur, win.prev, 0, 0, 0, 0, (now % window_s) / window_s)
        return view.cot_share, view.template_repeat_share

    async def add_signals(self, *args, **kwargs) -> tuple[float, float]:
        return self.add_signals_sync(*args, **kwargs)

    def _take(self, buckets: list[BucketRequest], now: float, view: LiveView) -> None:
        """All-or-nothing: a token is taken from every bucket only if each has one."""
        levels = []
        for b in buckets:
            state = self.buckets.get((b.limit_id, b.key))
            if state is None:
                tokens = b.burst
            else:
                tokens = min(b.burst, state[0] + max(0.0, now - state[1]) * b.rate)
            levels.append(tokens)
            if view.denied is None and tokens < 1.0:
                view.denied = b.limit_id
                view.retry_after_s = (1.0 - tokens) / b.rate
        take = 0.0 if view.denied else 1.0
        for b, tokens in zip(buckets, levels, strict=True):
            self.buckets[(b.limit_id, b.key)] = [tokens - take, now, b.rate, b.burst]

    async def observe(self, *args, **kwargs) -> LiveView:
        return self.observe_sync(*args, **kwargs)

    async def set_manual(self, account_id: str, action: str | None) -> None:
        if action is None:
            self.manual.pop(account_id, None)
        else:
            self.manual[account_id] = action

    def prune(self, now: float, window_s: float) -> int:
        """Drop windows idle for two windows and buckets that have refilled; returns count."""
        idx = int(now // window_s)
        stale = [k for k, w in self.accounts.items() if w.idx < idx - 1]
        for k in stale:
            del self.accounts[k]
        stale_c = [k for k, w in self.clusters.items() if w.idx < idx - 1]
        for k in stale_c:
            del self.clusters[k]
        full = [
            k for k, (t, ts, rate, burst) in self.buckets.items() if t + (now - ts) * rate >= burst
        ]
        for k in full:
            del self.buckets[k]
        return len(stale) + len(stale_c) + len(full)

    async def close(self) -> None:
        return None

    def health(self) -> dict:
        return {"backend": self.backend, "healthy": True, "accounts": len(self.accounts)}


# Counts a request's signal half (chain-of-thought, template repeat) into the account's current
# window and reads both windows back as `a` and `p`; expects locals ttl, cot, tpl and KEYS
# 1-4 (acct cur hash, acct prev hash, tpl set cur, tpl set prev). Shared by the two scripts.
_COUNT_SIGNALS_LUA = """
if cot == '1' then redis.call('HINCRBY', KEYS[1], 'cot', 1) end
if tpl ~= '' then
  local seen = redis.call('SISMEMBER', KEYS[4], tpl) == 1
  if redis.call('SCARD', KEYS[3]) < 4096 then
    if redis.call('SADD', KEYS[3], tpl) == 0 then seen = true end
    redis.call('EXPIRE', KEYS[3], ttl)
  elseif redis.call('SISMEMBER', KEYS[3], tpl) == 1 then
    seen = true
  end
  if seen then redis.call('HINCRBY', KEYS[1], 'rep', 1) end
end
redis.call('EXPIRE', KEYS[1], ttl)
local a = redis.call('HMGET', KEYS[1], 'n', 'cot', 'rep')
local p = redis.call('HMGET', KEYS[2], 'n', 'cot', 'rep')
"""

# KEYS: 1 acct cur hash, 2 acct prev hash, 3 acct tpl set cur, 4 acct tpl set prev,
#       5 cluster cur counter, 6 cluster prev counter, 7 cluster accounts cur, 8 ... prev,
#       9.. buckets.   ARGV: now, ttl, cot, tpl, account, has_cluster, n_buckets, bucket_ttl,
#       then rate, burst per bucket.
_OBSERVE_LUA = """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local cot = ARGV[3]
local tpl = ARGV[4]
local nb = tonumber(ARGV[7])
local bttl = tonumber(ARGV[8])
redis.call('HINCRBY', KEYS[1], 'n', 1)
""" + _COUNT_SIGNALS_LUA + """local c1, c2, c3, c4 = 0, 0, 0, 0
if ARGV[6] == '1' then
  c1 = redis.call('INCR', KEYS[5]); redis.call('EXPIRE', KEYS[5], ttl)
  c2 = tonumber(redis.call('GET', KEYS[6]) or '0')
  redis.call('SADD', KEYS[7], ARGV[5]); redis.call('EXPIRE', KEYS[7], ttl)
  c3 = redis.call('SCARD', KEYS[7]); c4 = redis.call('SCARD', KEYS[8])
end
local levels = {}
local denied, retry = 0, 0
for i = 1, nb do
  local rate = tonumber(ARGV[7 + 2 * i]); local burst = tonumber(ARGV[8 + 2 * i])
  local b = redis.call('HMGET', KEYS[8 + i], 't', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if denied == 0 and tokens < 1 then denied = i; retry = (1 - tokens) / rate end
end
for i = 1, nb do
  local tokens = levels[i]
  if denied == 0 then tokens = tokens - 1 end
  redis.call('HSET', KEYS[8 + i], 't', tostring(tokens), 'ts', ARGV[1])
  redis.call('EXPIRE', KEYS[8 + i], bttl)
end
return {tonumber(a[1]) or 0, tonumber(a[2]) or 0, tonumber(a[3]) or 0,
        tonumber(p[1]) or 0, tonumber(p[2]) or 0, tonumber(p[3]) or 0,
        c1, c2, c3, c4, denied, tostring(retry)}
"""

# The signal half of a request that _OBSERVE_LUA counted without signals (cot, template
# repeat). KEYS: acct cur hash, acct prev hash, tpl set cur, tpl set prev. ARGV: ttl, cot, tpl.
_SIGNALS_LUA = """
local ttl = tonumber(ARGV[1])
local cot = ARGV[2]
local tpl = ARGV[3]
""" + _COUNT_SIGNALS_LUA + """return {tonumber(a[1]) or 0, tonumber(a[2]) or 0, tonumber(a[3]) or 0,
        tonumber(p[1]) or 0, tonumber(p[2]) or 0, tonumber(p[3]) or 0}
"""

# Merge a locally kept bucket level into Redis: keep the lower of the two levels.
_MERGE_BUCKET_LUA = """
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local t = tonumber(ARGV[1])
if b[1] and tonumber(b[1]) < t then return 0 end
redis.call('HSET', KEYS[1], 't', ARGV[1], 'ts', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class RedisState:
    """Live state in Redis (one Lua round trip per request), local fallback during outages."""

    def __init__(self, url: str, *, timeout_s: float = 0.05, fail_closed: bool = False,
                 prefix: str = "dg"):
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.manual_key = f"{prefix}:enf:manual"  # operator list: account -> action
        # a fresh random token on every change: a counter restarts when Redis loses its data,
        # and a replica holding the old count would take the new list for the one it has
        self.manual_version_key = f"{prefix}:enf:ver"
        self.fail_closed = fail_closed
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=0,
        )
        self._observe = self.client.register_script(_OBSERVE_LUA)
        self._signals = self.client.register_script(_SIGNALS_LUA)
        self._merge = self.client.register_script(_MERGE_BUCKET_LUA)
        self.fallback = LocalState()
        self.healthy = True
        self._epoch = 0  # bumped on every recovery
        self.outages = 0
        self.resyncs = 0
        self.manual: dict[str, str] = {}
        self._manual_version: bytes | None = None
        self.on_health_change: list = []  # callbacks(healthy: bool)

    @property
    def backend(self) -> str:
        return "redis" if self.healthy else "memory-fallback"

    def _mark_down(self, exc: BaseException, epoch: int | None = None) -> None:
        """Switch to local state, unless the failed call began before the last recovery (a
        call still in flight from the outage, e.g. a deferred signal count, must not undo
        the switch back)."""
        if epoch is not None and epoch != self._epoch:
            return
        if self.healthy:
            self.healthy = False
            self.outages += 1
            log.error("redis state unreachable (%s): serving on local state (fail-%s)",
                      exc.__class__.__name__, "closed" if self.fail_closed else "open")
            for cb in self.on_health_change:
                cb(False)

    async def observe(
        self,
        account_id: str,
        cluster_id: str | None,
        template_sig: str | None,
        cot: bool,
        buckets: list[BucketRequest],
        now: float,
        window_s: float,
    ) -> LiveView:
        if self.healthy:
            idx = int(now // window_s)
            p = self.prefix
            ttl = int(window_s * 2) + 1
            keys = [
                f"{p}:a:{account_id}:{idx}", f"{p}:a:{account_id}:{idx - 1}",
                f"{p}:at:{account_id}:{idx}", f"{p}:at:{account_id}:{idx - 1}",
                f"{p}:c:{cluster_id}:{idx}", f"{p}:c:{cluster_id}:{idx - 1}",
                f"{p}:ca:{cluster_id}:{idx}", f"{p}:ca:{cluster_id}:{idx - 1}",
            ]
            args: list = [repr(now), ttl, "1" if cot else "0", template_sig or "", account_id,
                          "1" if cluster_id is not None else "0", len(buckets)]
            bttl = ttl
            for b in buckets:
                keys.append(f"{p}:b:{b.limit_id}:{b.key}")
                bttl = max(bttl, int(b.burst / b.rate) + 2)
            args.append(bttl)
            for b in buckets:
                args.extend((repr(b.rate), repr(b.burst)))
            epoch = self._epoch
            try:
                r = await self._observe(keys=keys, args=args)
            except Exception as exc:  # connection refused, timeout, server restarting...
                self._mark_down(exc, epoch)
            else:
                view = LiveView(backend="redis")
                _fill(view, r[0:3], r[3:6], r[6], r[7], r[8], r[9], (now % window_s) / window_s)
                if r[10]:
                    view.denied = buckets[r[10] - 1].limit_id
                    view.retry_after_s = float(r[11])
                return view
        if self.fail_closed:
            raise StateUnavailable("shared state (redis) is unreachable")
        view = self.fallback.observe_sync(
            account_id, cluster_id, template_sig, cot, buckets, now, window_s
        )
        view.backend = "memory-fallback"
        return view

    async def add_signals(self, account_id: str, template_sig: str | None, cot: bool,
                          now: float, window_s: float) -> tuple[float, float]:
        """The signal half of a request `observe` counted without signals (one round trip);
        on local state while Redis is down, like `observe`."""
        if self.healthy:
            idx = int(now // window_s)
            p = self.prefix
            keys = [f"{p}:a:{account_id}:{idx}", f"{p}:a:{account_id}:{idx - 1}",
                    f"{p}:at:{account_id}:{idx}", f"{p}:at:{account_id}:{idx - 1}"]
            args = [int(window_s * 2) + 1, "1" if cot else "0", template_sig or ""]
            epoch = self._epoch
            try:
                r = await self._signals(keys=keys, args=args)
            except Exception as exc:
                self._mark_down(exc, epoch)
            else:
                view = LiveView()
                _fill(view, r[0:3], r[3:6], 0, 0, 0, 0, (now % window_s) / window_s)
                return view.cot_share, view.template_repeat_share
        if self.fail_closed:
            raise StateUnavailable("shared state (redis) is unreachable")
        return self.fallback.add_signals_sync(account_id, template_sig, cot, now, window_s)

    async def set_manual(self, account_id: str, action: str | None) -> None:
        """Put an operator action on the shared enforcement list (or remove it)."""
        if action is None:
            self.manual.pop(account_id, None)
        else:
            self.manual[account_id] = action
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                if action is None:
                    pipe.hdel(self.manual_key, account_id)
                else:
                    pipe.hset(self.manual_key, account_id, action)
                pipe.set(self.manual_version_key, _new_version())
                await pipe.execute()
        except Exception as exc:
            self._mark_down(exc)

    async def refresh_manual(self) -> dict[str, str]:
        """Pull the shared operator list if its version moved; returns the list in force."""
        if not self.healthy:
            return self.manual
        try:
            version = await self.client.get(self.manual_version_key)
            if version is None and self.manual:
                await self._push_manual()  # Redis lost it (restart without persistence)
                return self.manual
            if version != self._manual_version:
                raw = await self.client.hgetall(self.manual_key)
                self.manual = {k.decode(): v.decode() for k, v in raw.items()}
                self._manual_version = version
        except Exception as exc:
            self._mark_down(exc)
        return self.manual

    async def _push_manual(self) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.manual_key)
            if self.manual:
                pipe.hset(self.manual_key, mapping=self.manual)
            pipe.set(self.manual_version_key, _new_version())
            await pipe.execute()

    async def try_recover(self, window_s: float) -> bool:
        """If Redis answers again, merge what was counted locally and switch back to it."""
        if self.healthy:
            return True
        try:
            # connections idle since before the outage point at the old server: dropped, so
            # the first calls after the switch back do not fail on them and undo it
            await self.client.connection_pool.disconnect(inuse_connections=False)
            await self.client.ping()
            await self._resync(window_s)
        except Exception as exc:
            log.debug("redis still unreachable: %s", exc)
            return False
        self.healthy = True
        self._epoch += 1
        self.resyncs += 1
        log.warning("redis state reachable again: resynchronised local counters and buckets")
        for cb in self.on_health_change:
            cb(True)
        return True

    async def _resync(self, window_s: float) -> None:
        local = self.fallback
        p = self.prefix
        ttl = int(window_s * 2) + 1
        async with self.client.pipeline(transaction=False) as pipe:
            for account, w in local.accounts.items():
                for idx, counts in ((w.idx, w.cur), (w.idx - 1, w.prev)):
                    key = f"{p}:a:{account}:{idx}"
                    for name, value in zip(("n", "cot", "rep"), counts, strict=True):
                        if value:
                            pipe.hincrby(key, name, value)
                    pipe.expire(key, ttl)
                if w.tpl_cur:
                    pipe.sadd(f"{p}:at:{account}:{w.idx}", *w.tpl_cur)
                    pipe.expire(f"{p}:at:{account}:{w.idx}", ttl)
            for cluster, cw in local.clusters.items():
                for idx, count, members in ((cw.idx, cw.cur, cw.act_cur),
                                            (cw.idx - 1, cw.prev, cw.act_prev)):
                    if count:
                        pipe.incrby(f"{p}:c:{cluster}:{idx}", count)
                        pipe.expire(f"{p}:c:{cluster}:{idx}", ttl)
                    if members:
                        pipe.sadd(f"{p}:ca:{cluster}:{idx}", *members)
                        pipe.expire(f"{p}:ca:{cluster}:{idx}", ttl)
            await pipe.execute()
        for (limit_id, key), (tokens, ts, rate, burst) in local.buckets.items():
            await self._merge(keys=[f"{p}:b:{limit_id}:{key}"],
                              args=[repr(tokens), repr(ts), int(burst / rate) + 2])
        await self._push_manual()
        self._manual_version = None
        self.fallback = LocalState()

    async def close(self) -> None:
        await self.client.aclose()

    def health(self) -> dict:
        return {"backend": self.backend, "healthy": self.healthy, "url": _redact(self.url),
                "outages": self.outages, "resyncs": self.resyncs}


def _redact(url: str) -> str:
    """Hide a password in a redis:// URL before it reaches logs or an API response."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def make_state(url: str, *, timeout_s: float = 0.05, fail_closed: bool = False) -> LiveState:
    """`memory` -> LocalState; `redis://...` -> RedisState."""
    if url in ("memory", "", None):
        return LocalState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisState(url, timeout_s=timeout_s, fail_closed=fail_closed)
    raise ValueError(f"state url {url!r}: use memory or redis://host:port/db")


def load_snapshot(path) -> dict | None:
    """Read an enforcement snapshot file; None if absent or torn."""
    try:
        with open(path, "rb") as fh:
            return orjson.loads(fh.read())
    except (OSError, orjson.JSONDecodeError):
        return None


def _new_version() -> str:
    return uuid.uuid4().hex


async def refresh_loop(interval_s: float, fn) -> None:
    """Call `fn` every `interval_s` until cancelled; a failing call is logged, never fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background refresh failed")
