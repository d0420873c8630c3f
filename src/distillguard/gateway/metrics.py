"""Prometheus metrics of one gateway process, on a private registry (several apps per process in
tests must not collide on the global one)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1)


def _memo_labels(labels):
    """`metric.labels(...)` with the children cached by label values: prometheus_client takes
    a lock and validates the labels on every call (~10 us each, several per request)."""
    cache: dict[tuple, object] = {}

    def cached(*values):
        child = cache.get(values)
        if child is None:
            child = cache[values] = labels(*values)
        return child

    return cached


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distillguard_gateway_requests", "Requests by endpoint and HTTP status.",
            ["endpoint", "status"], registry=r)
        self.decisions = Counter(
            "distillguard_gateway_decisions", "Enforced decisions by action and reason code.",
            ["action", "reason"], registry=r)
        self.monitored = Counter(
            "distillguard_gateway_monitored", "Actions monitor-mode rules would have taken.",
            ["action", "rule"], registry=r)
        self.added_latency = Histogram(
            "distillguard_gateway_added_latency_seconds",
            "Time the gateway spends on a request outside the upstream call.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.decision_latency = Histogram(
            "distillguard_gateway_decision_seconds", "Time of the per-request decision.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_cancelled = Counter(
            "distillguard_gateway_upstream_cancelled",
            "Upstream calls started during the decision and cancelled because it rejected "
            "or degraded the request.", registry=r)
        self.upstream_errors = Counter(
            "distillguard_gateway_upstream_errors", "Upstream unreachable or timed out.",
            ["kind"], registry=r)
        self.rejected = Counter(
            "distillguard_gateway_rejected", "Malformed or unauthenticated requests.",
            ["reason"], registry=r)
        self.state_healthy = Gauge(
            "distillguard_gateway_state_healthy", "1 if the shared state store answers.",
            registry=r)
        self.state_outages = Counter(
            "distillguard_gateway_state_outages", "Times the shared state became unreachable.",
            registry=r)
        self.wal_records = Counter(
            "distillguard_gateway_wal_records", "Exchange records written ahead to disk.",
            registry=r)
        self.wal_errors = Counter(
            "distillguard_gateway_wal_errors", "Exchange records that could not be logged.",
            registry=r)
        self.policy_version = Gauge(
            "distillguard_gateway_policy_version", "Version of the policy in force.", registry=r)
        self.policy_reload_errors = Counter(
            "distillguard_gateway_policy_reload_errors", "Policy reloads that failed validation.",
            registry=r)
        self.enforcement_accounts = Gauge(
            "distillguard_gateway_enforcement_accounts", "Accounts on the enforcement list.",
            registry=r)
        self.gc_pause = Histogram(
            "distillguard_gateway_gc_pause_seconds",
            "Garbage-collector passes of the serving process (each holds every request).",
            ["generation"], buckets=LATENCY_BUCKETS, registry=r)
        self.state_healthy.set(1)
        for metric in (self.requests, self.decisions, self.monitored, self.upstream_errors,
                       self.rejected, self.gc_pause):
            metric.labels = _memo_labels(metric.labels)

    def state_health_changed(self, healthy: bool) -> None:
        self.state_healthy.set(1 if healthy else 0)
        if not healthy:
            self.state_outages.inc()

    def gc_callback(self) -> Callable[[str, dict], None]:
        """A `gc.callbacks` entry timing each collection by generation."""
        started = [0.0]
        clock = time.perf_counter

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = clock()
            else:
                self.gc_pause.labels(str(info["generation"])).observe(clock() - started[0])

        return callback

    def render(self) -> bytes:
        return generate_latest(self.registry)
