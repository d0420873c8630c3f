"""YAML policy: rules (conditions -> action + reason code) and token-bucket limits.

Rules are compiled once into Python closures so evaluating a policy per request is a handful of
dict lookups. `PolicyHolder` re-reads the file when it changes (hot reload); a policy that fails
to parse is reported and the previous one stays in force, so a typo never opens the gates.
See docs/gateway.md for the field reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("distillguard.gateway")

#: Actions, least to most severe. The most severe matching action wins; `degrade` combines
#: with `allow` (the request is served, modified).
ACTIONS = ("allow", "degrade", "throttle", "challenge", "block")
SEVERITY = {name: rank for rank, name in enumerate(ACTIONS)}
MODES = ("enforce", "monitor")

#: Fact namespaces a condition may test. `live.*` and `cluster.synchrony`/`cluster.requests`
#: exist only after the state update, so limits (evaluated before it) may not use them.
FACT_PREFIXES = ("signal.", "account.", "cluster.", "live.", "request.")
LIVE_FACTS = ("live.", "cluster.synchrony", "cluster.requests", "cluster.active_accounts")

Facts = dict[str, Any]
Predicate = Callable[[Facts], bool | None]


class PolicyError(ValueError):
    """The policy file is invalid; the message names the rule and key."""


def _compare(op: str, expected: Any) -> Callable[[Any], bool]:
    def numeric(fn: Callable[[float, float], bool]) -> Callable[[Any], bool]:
        def check(actual: Any) -> bool:
            return isinstance(actual, int | float) and fn(actual, expected)

        return check

    if op == "eq":
        return lambda actual: actual == expected
    if op == "ne":
        return lambda actual: actual != expected
    if op in ("gt", "gte", "lt", "lte"):
        if not isinstance(expected, int | float) or isinstance(expected, bool):
            raise PolicyError(f"{op}: needs a number, got {expected!r}")
        return numeric(
            {
                "gt": lambda a, b: a > b,
                "gte": lambda a, b: a >= b,
                "lt": lambda a, b: a < b,
                "lte": lambda a, b: a <= b,
            }[op]
        )
    if op == "in":
        if not isinstance(expected, list):
            raise PolicyError(f"in: needs a list, got {expected!r}")
        allowed = set(expected)
        return lambda actual: actual in allowed
    if op == "contains":  # list fact (e.g. signal.rule_hits) contains the value
        return lambda actual: isinstance(actual, list | tuple) and expected in actual
    raise PolicyError(f"unknown operator {op!r} (use eq, ne, gt, gte, lt, lte, in, contains)")


#: Facts that depend on the current request's signals: `signal.*`, and the live shares that
#: count this request's `cot` and template signature.
SIGNAL_FACTS = ("signal.", "live.cot_share", "live.template_repeat_share")
#: Put this key in the facts to mark the current request's signals as not known yet: every
#: condition on a `SIGNAL_FACTS` fact then evaluates to None ("unknown") instead of a bool,
#: except thresholds on a fact whose bounds the value maps (`{"live.cot_share": (lo, hi)}`).
PENDING = "\x00signals-pending"


def _combine3(results: Any, decisive: bool) -> bool | None:
    """Three-valued AND (`decisive` False) or OR (True): `decisive` if any result is, else
    None if any is unknown, else the other value."""
    unknown = False
    for r in results:
        if r is decisive:
            return decisive
        if r is None:
            unknown = True
    return None if unknown else not decisive


def _all3(results: Any) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is unknown, else True."""
    return _combine3(results, False)


def _any3(results: Any) -> bool | None:
    """Three-valued OR: True if any is True, else None if any is unknown, else False."""
    return _combine3(results, True)


def compile_condition(spec: Any, *, allow_live: bool = True) -> Predicate:
    """`{fact: value | {op: value}, any: [...], all: [...], not: {...}}` -> predicate (AND).

    With complete facts the predicate returns a bool. With `PENDING` in the facts it is
    three-valued: None when the outcome depends on a signal fact (`SIGNAL_FACTS`), and a bool
    only when that bool holds whatever the signals turn out to be (Kleene logic), which is
    what lets the gateway decide without waiting for the signals."""
    if spec is None:
        return lambda facts: True
    if not isinstance(spec, dict):
        raise PolicyError(f"a condition must be a mapping, got {spec!r}")
    parts: list[Predicate] = []
    for key, value in spec.items():
        if key in ("any", "all"):
            if not isinstance(value, list) or not value:
                raise PolicyError(f"{key}: needs a non-empty list of conditions")
            subs = [compile_condition(v, allow_live=allow_live) for v in value]
            combine = _any3 if key == "any" else _all3
            parts.append(lambda facts, subs=subs, combine=combine:
                         combine(s(facts) for s in subs))
            continue
        if key == "not":
            sub = compile_condition(value, allow_live=allow_live)
            parts.append(lambda facts, sub=sub: _not3(sub(facts)))
            continue
        if not key.startswith(FACT_PREFIXES):
            raise PolicyError(f"unknown fact {key!r} (facts start with {', '.join(FACT_PREFIXES)})")
        if not allow_live and key.startswith(LIVE_FACTS):
            raise PolicyError(f"{key}: live facts cannot be used in a limit's condition")
        ops = list(value.items()) if isinstance(value, dict) else [("eq", value)]
        checks = [_compare(op, expected) for op, expected in ops]
        if key.startswith(SIGNAL_FACTS):
            monotone = all(op in ("gt", "gte", "lt", "lte") for op, _ in ops)
            parts.append(lambda facts, key=key, checks=checks, monotone=monotone:
                         _pending_leaf(facts, key, checks, monotone))
        elif len(checks) == 1:
            parts.append(lambda facts, key=key, check=checks[0]: bool(check(facts.get(key))))
        else:
            parts.append(
                lambda facts, key=key, checks=checks: all(c(facts.get(key)) for c in checks)
            )
    if len(parts) == 1:
        return parts[0]
    return lambda facts: _all3(p(facts) for p in parts)


def _pending_leaf(facts: Facts, key: str, checks: list, monotone: bool) -> bool | None:
    """A condition on a signal fact. While the signals are pending it is unknown, unless the
    fact has bounds (`facts[PENDING][key] = (lo, hi)`, the live shares) and every check is a
    threshold that gives the same answer at both ends (then it does everywhere between)."""
    pending = facts.get(PENDING)
    if pending is None:
        return all(c(facts.get(key)) for c in checks)
    bounds = pending.get(key) if monotone else None
    if bounds is None:
        return None
    lo, hi = bounds
    results = []
    for check in checks:
        at_lo = bool(check(lo))
        results.append(at_lo if at_lo == bool(check(hi)) else None)
    return _all3(results)


def _not3(value: bool | None) -> bool | None:
    return None if value is None else not value


def reads_signals(spec: Any) -> bool:
    """True when a condition mentions a fact that depends on the current request's signals."""
    if isinstance(spec, dict):
        return any(reads_signals(v) if k in ("any", "all", "not") else
                   k.startswith(SIGNAL_FACTS) for k, v in spec.items())
    if isinstance(spec, list):
        return any(reads_signals(v) for v in spec)
    return False


@dataclass(frozen=True)
class DegradeSpec:
    """Output countermeasures. None/False means leave that aspect alone."""

    reasoning: str | None = None  # "strip" | "summary"
    summary_chars: int = 280
    drop_logprobs: bool = False
    max_n: int | None = None
    max_tokens: int | None = None
    reasoning_effort: str | None = None

    def merge(self, other: DegradeSpec) -> DegradeSpec:
        """The stricter of two specs, field by field."""

        def smallest(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        reasoning = "strip" if "strip" in (self.reasoning, other.reasoning) else (
            self.reasoning or other.reasoning
        )
        return DegradeSpec(
            reasoning=reasoning,
            summary_chars=min(self.summary_chars, other.summary_chars),
            drop_logprobs=self.drop_logprobs or other.drop_logprobs,
            max_n=smallest(self.max_n, other.max_n),
            max_tokens=smallest(self.max_tokens, other.max_tokens),
            reasoning_effort=self.reasoning_effort or other.reasoning_effort,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}


def _degrade_spec(raw: Any, where: str) -> DegradeSpec:
    if raw is None:
        return DegradeSpec(reasoning="summary", drop_logprobs=True, max_n=1)
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}.degrade: expected a mapping")
    unknown = set(raw) - set(DegradeSpec.__dataclass_fields__)
    if unknown:
        raise PolicyError(f"{where}.degrade: unknown keys {sorted(unknown)}")
    spec = DegradeSpec(**raw)
    if spec.reasoning not in (None, "strip", "summary"):
        raise PolicyError(f"{where}.degrade.reasoning: use strip or summary")
    return spec


@dataclass(frozen=True)
class Rule:
    id: str
    when: Predicate
    action: str
    reason: str
    monitor: bool
    degrade: DegradeSpec | None
    message: str | None


@dataclass(frozen=True)
class Limit:
    """A token bucket: `rate_per_s` refill, `burst` capacity, one per account or per cluster."""

    id: str
    scope: str  # "account" | "cluster"
    rate_per_s: float
    burst: float
    when: Predicate
    reason: str
    monitor: bool


@dataclass(frozen=True)
class Policy:
    mode: str = "enforce"
    window_s: float = 60.0
    rules: tuple[Rule, ...] = ()
    limits: tuple[Limit, ...] = ()
    source: str = "<default>"
    version: int = 0
    raw: dict = field(default_factory=dict, compare=False)


def _mode(value: Any, where: str) -> bool:
    """True when `where` runs in monitor mode."""
    if value is None:
        return False
    if value not in MODES:
        raise PolicyError(f"{where}.mode: use enforce or monitor")
    return value == "monitor"


def policy_from_dict(raw: dict, source: str = "<dict>", version: int = 0) -> Policy:
    """Validate and compile a parsed policy document."""
    if not isinstance(raw, dict):
        raise PolicyError("the policy must be a YAML mapping")
    mode = raw.get("mode", "enforce")
    if mode not in MODES:
        raise PolicyError("mode: use enforce or monitor")
    rules = []
    seen: set[str] = set()
    for i, r in enumerate(raw.get("rules") or []):
        where = f"rules[{i}]"
        if not isinstance(r, dict) or not r.get("id"):
            raise PolicyError(f"{where}: needs an id")
        where = f"rule {r['id']!r}"
        if r["id"] in seen:
            raise PolicyError(f"{where}: duplicate id")
        seen.add(r["id"])
        action = r.get("action")
        if action not in ACTIONS or action == "throttle":
            raise PolicyError(
                f"{where}.action: {action!r} is not allow, degrade, challenge or block "
                "(throttling is configured under limits)"
            )
        try:
            when = compile_condition(r.get("when"))
        except PolicyError as exc:
            raise PolicyError(f"{where}.when: {exc}") from exc
        rules.append(
            Rule(
                id=str(r["id"]),
                when=when,
                action=action,
                reason=str(r.get("reason") or r["id"]),
                monitor=_mode(r.get("mode"), where),
                degrade=_degrade_spec(r.get("degrade"), where) if action == "degrade" else None,
                message=r.get("message"),
            )
        )
    limits = []
    for i, lim in enumerate(raw.get("limits") or []):
        where = f"limits[{i}]"
        if not isinstance(lim, dict) or not lim.get("id"):
            raise PolicyError(f"{where}: needs an id")
        where = f"limit {lim['id']!r}"
        if lim["id"] in seen:
            raise PolicyError(f"{where}: duplicate id")
        seen.add(lim["id"])
        scope = lim.get("scope", "account")
        if scope not in ("account", "cluster"):
            raise PolicyError(f"{where}.scope: use account or cluster")
        try:
            rate, burst = float(lim["rate_per_s"]), float(lim.get("burst", lim["rate_per_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyError(f"{where}: needs numeric rate_per_s (and burst)") from exc
        if rate <= 0 or burst < 1:
            raise PolicyError(f"{where}: rate_per_s must be > 0 and burst >= 1")
        try:
            when = compile_condition(lim.get("when"), allow_live=False)
        except PolicyError as exc:
            raise PolicyError(f"{where}.when: {exc}") from exc
        limits.append(
            Limit(
                id=str(lim["id"]),
                scope=scope,
                rate_per_s=rate,
                burst=burst,
                when=when,
                reason=str(lim.get("reason") or f"{scope}_rate_limit"),
                monitor=_mode(lim.get("mode"), where),
            )
        )
    window = float(raw.get("window_s", 60.0))
    if window <= 0:
        raise PolicyError("window_s must be > 0")
    return Policy(
        mode=mode,
        window_s=window,
        rules=tuple(rules),
        limits=tuple(limits),
        source=source,
        version=version,
        raw=raw,
    )


def load_policy(path: str | Path, version: int = 0) -> Policy:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise PolicyError(f"{path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return policy_from_dict(raw, source=str(path), version=version)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from exc


class PolicyHolder:
    """The policy in force, reloaded from its file when the file changes."""

    def __init__(self, path: str | Path | None, policy: Policy | None = None):
        self.path = Path(path) if path else None
        self.version = 0
        self.last_error: str | None = None
        self._stamp: tuple[int, int] | None = None
        if policy is not None:
            self.policy = policy
        elif self.path is not None:
            self.policy = load_policy(self.path, version=0)
            self._stamp = self._file_stamp()
        else:
            self.policy = Policy()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st else None

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or `force`); True if a new policy took effect."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            policy = load_policy(self.path, version=self.version + 1)
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy reload failed, keeping version %d: %s", self.version, exc)
            return False
        self.version += 1
        self.policy = policy
        self.last_error = None
        log.info("policy reloaded from %s (version %d)", self.path, self.version)
        return True
