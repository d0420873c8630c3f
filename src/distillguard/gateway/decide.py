"""The per-request decision: signals on the prompt + live state + enforcement list -> action.

Order of work, O(1) per request:
1. request signals from `distillguard.signals.annotate_request` (the batch engine's code),
2. the account's standing (scan findings + operator list) and its cluster,
3. ONE state update (counters, template sketch, token buckets of the limits that apply),
4. policy rules over all facts; the most severe action wins. Rules and limits in monitor mode
   (or a policy in monitor mode) are recorded as `would_action` but not enforced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distillguard.gateway.config import KeyInfo
from distillguard.gateway.policy import SEVERITY, DegradeSpec, PolicyHolder
from distillguard.gateway.signals_proc import SignalsProcess, SignalsUnavailable
from distillguard.gateway.state import BucketRequest, EnforcementList, LiveState, LiveView

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


class Decider:
    """Holds the policy, live state and enforcement list; `decide` is called per request."""

    def __init__(self, policy: PolicyHolder, state: LiveState, enforcement: EnforcementList,
                 *, annotate: Annotate, cluster_by_org: bool = False):
        self.policy = policy
        self.state = state
        self.enforcement = enforcement
        self.annotate = annotate
        self.cluster_by_org = cluster_by_org
        #: Set by the gateway when signals are computed in a child process.
        self.signals_process: SignalsProcess | None = None

    @property
    def signals_offloaded(self) -> bool:
        return self.signals_process is not None and self.signals_process.alive

    async def signals(self, exchange: dict) -> dict:
        """Request signals, from the signals process when it runs, else in-process."""
        proc = self.signals_process
        if proc is not None and proc.alive:
            try:
                return await proc.annotate(exchange)
            except SignalsUnavailable:
                pass  # same function, computed here (raises here if it raises)
        return self.annotate(exchange)

    async def decide(self, exchange: dict, key: KeyInfo, *, now: float | None = None) -> Decision:
        """Decide on `exchange` (the request half of a log-contract record)."""
        now = time.time() if now is None else now
        policy = self.policy.policy
        signals = await self.signals(exchange)
        account_id = key.account_id
        standing = self.enforcement.standing(account_id)
        cluster_id = standing.campaign_id if standing else None
        if cluster_id is None and self.cluster_by_org and key.org_id:
            cluster_id = f"org:{key.org_id}"
        campaign = self.enforcement.campaigns.get(cluster_id) if cluster_id else None
        params = exchange.get("params") or {}
        facts: dict[str, Any] = {f"signal.{k}": v for k, v in signals.items()}
        facts.update({
            "account.id": account_id,
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
        })
        buckets = []
        applied = []
        for limit in policy.limits:
            key_id = account_id if limit.scope == "account" else cluster_id
            if key_id is None or not limit.when(facts):
                continue
            buckets.append(BucketRequest(limit.id, key_id, limit.rate_per_s, limit.burst))
            applied.append(limit)
        live = await self.state.observe(
            account_id, cluster_id, signals.get("template_sig"), bool(signals.get("cot")),
            buckets, now, policy.window_s,
        )
        size = facts["cluster.size"]
        facts.update({
            "live.requests": live.requests,
            "live.cot_share": live.cot_share,
            "live.template_repeat_share": live.template_repeat_share,
            "cluster.requests": live.cluster_requests,
            "cluster.active_accounts": live.cluster_active_accounts,
            "cluster.synchrony": min(1.0, live.cluster_active_accounts / size) if size else 0.0,
        })
        decision = Decision(cluster_id=cluster_id, signals=signals, live=live,
                            policy_version=self.policy.version)
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
        if not exempt:
            for rule in policy.rules:
                if not rule.when(facts):
                    continue
                monitor = monitor_all or rule.monitor
                self._add(decision, rule.action, rule.reason, rule.id, monitor, rule.degrade,
                          rule.message)
                if rule.action == "allow" and not monitor:
                    break  # an allow rule exempts the request from the rules after it
        return decision

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
