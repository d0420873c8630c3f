"""The per-request decision: signals on the prompt + live state + enforcement list -> action.

Order of work, O(1) per request:
1. request signals from `distillguard.signals.annotate_request` (the batch engine's code),
   started first and awaited only if the outcome depends on them,
2. the account's standing (scan findings + operator list) and its cluster,
3. the state update (counters, template sketch, token buckets of the limits that apply); the
   request's signal part (cot, template repeat) is counted when its signals are known,
4. policy rules over all facts; the most severe action wins. Rules and limits in monitor mode
   (or a policy in monitor mode) are recorded as `would_action` but not enforced.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distillguard.gateway.config import KeyInfo
from distillguard.gateway.policy import (
    PENDING,
    SEVERITY,
    DegradeSpec,
    Limit,
    Policy,
    PolicyHolder,
)
from distillguard.gateway.signals_proc import SignalsProcess, SignalsUnavailable
from distillguard.gateway.state import (
    BucketRequest,
    EnforcementList,
    LiveState,
    LiveView,
    LocalState,
    Standing,
)

log = logging.getLogger("distillguard.gateway")

#: Reason codes of decisions that do not come from a policy rule's own `reason`.
BUILTIN_REASONS = {
    "enforcement_list_block": "an operator put the account on the block list",
    "enforcement_list_challenge": "an operator asked the account to verify (appeal path)",
    "enforcement_list_degrade": "an operator limited the account's outputs",
    "state_unavailable": "shared state is unreachable and the gateway fails closed",
}
MANUAL_DEGRADE = DegradeSpec(reasoning="summary", drop_logprobs=True, max_n=1)

Annotate = Callable[[dict], dict]


def load_annotate(spec: str = "distillguard.signals:annotate_request") -> Annotate:
    """Import the request-signal function named `module:function` (by default the batch
    engine's, imported lazily because it loads rule packs and the classifier)."""
    import importlib

    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"signals function {spec!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"signals function {spec!r} is not callable")
    return fn


@dataclass(slots=True)
class Decision:
    action: str = "allow"  # what is enforced
    would_action: str = "allow"  # what the policy asks for, monitor rules included
    reasons: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    monitored: list[str] = field(default_factory=list)  # rule ids matched in monitor mode
    degrade: DegradeSpec | None = None
    retry_after_s: float = 0.0
    message: str | None = None
    cluster_id: str | None = None
    signals: dict[str, Any] = field(default_factory=dict)
    live: LiveView | None = None
    policy_version: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "would_action": self.would_action,
            "reasons": self.reasons,
            "rules": self.rules,
            "monitored_rules": self.monitored,
            "degrade": self.degrade.as_dict() if self.degrade else None,
            "retry_after_s": round(self.retry_after_s, 3) if self.retry_after_s else None,
            "message": self.message,
            "cluster_id": self.cluster_id,
            "policy_version": self.policy_version,
            "state_backend": self.live.backend if self.live else None,
        }


@dataclass(slots=True)
class Undecided:
    """A decision `Decider.decide_now` started and `Decider.finish` completes."""

    exchange: dict
    account_id: str
    now: float
    policy: Policy
    standing: Standing | None
    cluster_id: str | None
    facts: dict[str, Any]
    limits: tuple[list[BucketRequest], list[Limit]] | None = None  # None: wait for signals
    live: LiveView | None = None  # None: state not updated yet


class Decider:
    """Holds the policy, live state and enforcement list; `decide` is called per request.

    With `signals_wait="needed"` (default) a decision waits for the request's signals only
    when its outcome depends on them: conditions are evaluated three-valued with the signal
    facts unknown (`policy.PENDING`), and only a limit or rule that comes out unknown (it could
    match or not depending on the signals) makes the decision wait. The decision is the same
    as with `signals_wait="always"`; the request's `cot` and template signature are counted
    into the live state when its signals arrive (see docs/gateway.md, "Waiting for signals").
    """

    def __init__(self, policy: PolicyHolder, state: LiveState, enforcement: EnforcementList,
                 *, annotate: Annotate, cluster_by_org: bool = False,
                 signals_wait: str = "needed"):
        self.policy = policy
        self.state = state
        self.enforcement = enforcement
        self.annotate = annotate
        self.cluster_by_org = cluster_by_org
        self.signals_wait = signals_wait
        #: Set by the gateway when signals are computed in a child process.
        self.signals_process: SignalsProcess | None = None
        #: Decisions taken without waiting for signals / after waiting for them.
        self.decided_early = 0
        self.decided_with_signals = 0
        #: Signal computations that failed after their request was decided without them.
        self.signal_errors = 0
        self._background: set[asyncio.Task] = set()
        #: Account -> requests decided without their signals, not counted yet.
        self._unsettled: dict[str, int] = {}

    @property
    def signals_offloaded(self) -> bool:
        return self.signals_process is not None and self.signals_process.alive

    def start_signals(self, exchange: dict, *, urgent: bool = True) -> asyncio.Future:
        """Start computing the request's signals: in the signals process when it runs, else
        in-process right after the current event-loop tick (so an upstream call started in
        this tick is written first). Futures resolve in request order; `urgent=False` (no
        decision waits for them) lets the hand-off to the child be batched."""
        loop = asyncio.get_running_loop()
        out = loop.create_future()
        proc = self.signals_process
        if proc is not None and proc.alive:
            try:
                inner = proc.submit(exchange, urgent=urgent)
            except SignalsUnavailable:
                pass
            else:
                inner.add_done_callback(functools.partial(self._relay, out, exchange))
                return out
        loop.call_soon(self._annotate_into, out, exchange)
        return out

    def _relay(self, out: asyncio.Future, exchange: dict, inner: asyncio.Future) -> None:
        if out.done():
            return
        if not inner.cancelled() and inner.exception() is None:
            out.set_result(inner.result())
        else:  # child gone or failed: same function computed here (fails here if it fails)
            self._annotate_into(out, exchange)

    def _annotate_into(self, out: asyncio.Future, exchange: dict) -> None:
        if out.done():
            return
        try:
            out.set_result(self.annotate(exchange))
        except Exception as exc:
            out.set_exception(exc)

    def _facts(self, exchange: dict, key: KeyInfo, standing: Standing | None,
               cluster_id: str | None) -> dict[str, Any]:
        """Every fact that does not depend on signals or live state."""
        campaign = self.enforcement.campaigns.get(cluster_id) if cluster_id else None
        params = exchange.get("params") or {}
        return {
            "account.id": key.account_id,
            "account.org_id": key.org_id,
            "account.score": standing.score if standing else 0.0,
            "account.flagged": bool(standing and standing.flagged),
            "account.listed": bool(standing and (standing.flagged or standing.manual)),
            "account.campaign_id": standing.campaign_id if standing else None,
            "account.action": standing.manual if standing else None,
            "cluster.id": cluster_id,
            "cluster.score": campaign[0] if campaign else 0.0,
            "cluster.size": campaign[1] if campaign else 0,
            "request.model": exchange.get("model"),
            "request.endpoint": exchange.get("endpoint"),
            "request.ip": exchange.get("ip"),
            "request.n": params.get("n"),
            "request.max_tokens": params.get("max_tokens"),
            "request.logprobs": params.get("logprobs"),
            "request.stream": params.get("stream"),
            "request.reasoning_effort": params.get("reasoning_effort"),
        }

    @staticmethod
    def _limits(policy: Policy, facts: dict, account_id: str,
                cluster_id: str | None) -> tuple[list[BucketRequest], list[Limit]] | None:
        """The buckets to take a token from, or None if that depends on unknown signals."""
        buckets, applied = [], []
        for limit in policy.limits:
            key_id = account_id if limit.scope == "account" else cluster_id
            if key_id is None:
                continue
            hit = limit.when(facts)
            if hit is None:
                return None
            if hit:
                buckets.append(BucketRequest(limit.id, key_id, limit.rate_per_s, limit.burst))
                applied.append(limit)
        return buckets, applied

    @staticmethod
    def _live_facts(facts: dict, live: LiveView) -> None:
        size = facts["cluster.size"]
        facts.update({
            "live.requests": live.requests,
            "live.cot_share": live.cot_share,
            "live.template_repeat_share": live.template_repeat_share,
            "cluster.requests": live.cluster_requests,
            "cluster.active_accounts": live.cluster_active_accounts,
            "cluster.synchrony": min(1.0, live.cluster_active_accounts / size) if size else 0.0,
        })

    async def decide(self, exchange: dict, key: KeyInfo, *, now: float | None = None) -> Decision:
        """Decide on `exchange` (the request half of a log-contract record)."""
        first = self.decide_now(exchange, key, now=now)
        return first if isinstance(first, Decision) else await self.finish(first)

    def decide_now(self, exchange: dict, key: KeyInfo, *,
                   now: float | None = None) -> Decision | Undecided:
        """As much of the decision as needs no waiting: the whole decision when it depends
        neither on this request's signals nor on a state round trip (local state), else
        what `finish` continues from. Lets the proxy skip the speculative upstream call."""
        now = time.time() if now is None else now
        policy = self.policy.policy
        account_id = key.account_id
        standing = self.enforcement.standing(account_id)
        cluster_id = standing.campaign_id if standing else None
        if cluster_id is None and self.cluster_by_org and key.org_id:
            cluster_id = f"org:{key.org_id}"
        facts = self._facts(exchange, key, standing, cluster_id)
        u = Undecided(exchange, account_id, now, policy, standing, cluster_id, facts)
        if self.signals_wait != "needed":
            return u
        facts[PENDING] = {}
        u.limits = self._limits(policy, facts, account_id, cluster_id)
        if u.limits is None or not isinstance(self.state, LocalState):
            return u
        u.live = self.state.observe_sync(account_id, cluster_id, None, False, u.limits[0], now,
                                         policy.window_s)
        return self._early(u) or u

    def _early(self, u: Undecided) -> Decision | None:
        """The decision from what is known without this request's signals, if it is complete
        (their counting is then left to when they arrive)."""
        self._live_facts(u.facts, u.live)
        # The two shares are not known, but bounded: counting this request and the account's
        # earlier ones whose signals are still pending can only raise them, by at most
        # (pending + 1) / requests. A threshold that holds (or fails) at both ends is decided.
        live = u.live
        if live.requests > 0:
            step = (self._unsettled.get(u.account_id, 0) + 1) / live.requests
            u.facts[PENDING] = {
                "live.cot_share": (live.cot_share, min(1.0, live.cot_share + step)),
                "live.template_repeat_share": (live.template_repeat_share,
                                               min(1.0, live.template_repeat_share + step)),
            }
        decision = Decision(cluster_id=u.cluster_id, live=u.live,
                            policy_version=self.policy.version)
        if not self._evaluate(decision, u.policy, u.facts, u.standing, u.limits[1]):
            return None
        self.decided_early += 1
        self._unsettled[u.account_id] = self._unsettled.get(u.account_id, 0) + 1
        self.start_signals(u.exchange, urgent=False).add_done_callback(functools.partial(
            self._count_signals, u.account_id, u.now, u.policy.window_s))
        return decision

    async def finish(self, u: Undecided) -> Decision:
        """The rest of a decision `decide_now` could not complete."""
        policy, facts, account_id, cluster_id = u.policy, u.facts, u.account_id, u.cluster_id
        if u.limits is None:  # wait for the signals, then count and decide in one step
            facts.pop(PENDING, None)
            self.decided_with_signals += 1
            signals = await self.start_signals(u.exchange)
            facts.update({f"signal.{k}": v for k, v in signals.items()})
            buckets, applied = self._limits(policy, facts, account_id, cluster_id)
            live = await self.state.observe(
                account_id, cluster_id, signals.get("template_sig"), bool(signals.get("cot")),
                buckets, u.now, policy.window_s)
            self._live_facts(facts, live)
            decision = Decision(cluster_id=cluster_id, signals=signals, live=live,
                                policy_version=self.policy.version)
            self._evaluate(decision, policy, facts, u.standing, applied)
            return decision
        if u.live is None:  # shared state: its round trip first
            u.live = await self.state.observe(account_id, cluster_id, None, False,
                                              u.limits[0], u.now, policy.window_s)
            decision = self._early(u)
            if decision is not None:
                return decision
        # A rule's outcome depends on this request's signals: wait for them, count them in.
        self.decided_with_signals += 1
        signals = await self.start_signals(u.exchange)
        live = u.live
        live.cot_share, live.template_repeat_share = await self.state.add_signals(
            account_id, signals.get("template_sig"), bool(signals.get("cot")), u.now,
            policy.window_s)
        del facts[PENDING]
        facts.update({f"signal.{k}": v for k, v in signals.items()})
        self._live_facts(facts, live)
        decision = Decision(cluster_id=cluster_id, signals=signals, live=live,
                            policy_version=self.policy.version)
        self._evaluate(decision, policy, facts, u.standing, u.limits[1])
        return decision

    def _evaluate(self, decision: Decision, policy: Policy, facts: dict,
                  standing: Standing | None, applied: list[Limit]) -> bool:
        """Operator action, limits and rules into `decision`; False (and `decision` is
        incomplete) as soon as a rule's outcome is unknown because signals are pending."""
        live = decision.live
        monitor_all = policy.mode == "monitor"
        if standing and standing.manual and standing.manual != "allow":
            self._add(decision, standing.manual, f"enforcement_list_{standing.manual}",
                      "enforcement-list", False, MANUAL_DEGRADE)
        exempt = bool(standing and standing.manual == "allow")
        if live.denied and not exempt:
            limit = next(lim for lim in applied if lim.id == live.denied)
            self._add(decision, "throttle", limit.reason, limit.id, monitor_all or limit.monitor,
                      None)
            decision.retry_after_s = live.retry_after_s
        if exempt:
            return True
        for rule in policy.rules:
            hit = rule.when(facts)
            if hit is None:
                return False
            if not hit:
                continue
            monitor = monitor_all or rule.monitor
            self._add(decision, rule.action, rule.reason, rule.id, monitor, rule.degrade,
                      rule.message)
            if rule.action == "allow" and not monitor:
                break  # an allow rule exempts the request from the rules after it
        return True

    def _count_signals(self, account_id: str, now: float, window_s: float,
                       fut: asyncio.Future) -> None:
        """Count the signals of a request decided without them, once they arrive."""
        left = self._unsettled.pop(account_id, 1) - 1
        if left > 0:
            self._unsettled[account_id] = left
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.signal_errors += 1
            if self.signal_errors == 1 or self.signal_errors % 1000 == 0:
                log.error("request signals failed after the decision (%d so far): %r",
                          self.signal_errors, exc)
            return
        signals = fut.result()
        args = (account_id, signals.get("template_sig"), bool(signals.get("cot")), now,
                window_s)
        if isinstance(self.state, LocalState):
            self.state.add_signals_sync(*args)
            return
        task = asyncio.ensure_future(self.state.add_signals(*args))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("deferred signal count failed: %r", task.exception())

    @staticmethod
    def _add(decision: Decision, action: str, reason: str, rule_id: str, monitor: bool,
             degrade: DegradeSpec | None, message: str | None = None) -> None:
        if SEVERITY[action] > SEVERITY[decision.would_action]:
            decision.would_action = action
        if monitor:
            decision.monitored.append(rule_id)
            return
        if action == "allow":
            return
        decision.reasons.append(reason)
        decision.rules.append(rule_id)
        if action == "degrade" and degrade is not None:
            decision.degrade = degrade if decision.degrade is None else decision.degrade.merge(
                degrade)
        if SEVERITY[action] > SEVERITY[decision.action]:
            decision.action = action
            decision.message = message or decision.message
