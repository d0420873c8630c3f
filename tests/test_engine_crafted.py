"""Small crafted traffic (exchanges + signals + accounts) with a known campaign, shared by the
engine's stage tests, plus end-to-end checks of `scan` on it.

The crafted world: honest users with their own addresses and prompts, a university NAT (many
honest accounts behind one address), a popular agent system prompt shared by many honest users,
and one campaign whose accounts look small and clean one by one but share a data-centre pool,
payment instruments and rare templates, and ask for chain-of-thought.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

from distillguard import contract

T0 = datetime(2026, 1, 5, tzinfo=UTC)
DAYS = 3


def _rows(rng: np.random.Generator) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    exchanges: list[dict] = []
    signals: list[dict] = []
    accounts: list[dict] = []
    truth: dict[str, str] = {}
    counter = [0]

    def add(account: str, ts: datetime, ip: str, template: str, *, cot: bool, capability: str,
            system: str | None = None, model: str = "m-1") -> None:
        counter[0] += 1
        rid = f"r{counter[0]:07d}"
        exchanges.append({
            "request_id": rid, "ts": ts, "account_id": account, "ip": ip,
            "user_agent": "python-httpx/0.27" if account.startswith("atk") else "Mozilla/5.0",
            "model": model, "endpoint": "chat.completions", "system": system,
            "messages": [{"role": "user", "content": f"{template} {counter[0]}"}],
            "params": {"temperature": 0.7, "max_tokens": 1024, "n": 1},
            "input_tokens": 50, "output_tokens": 400, "status": 200,
        })
        signals.append({
            "request_id": rid, "account_id": account, "ts": ts, "model": model,
            "prompt_chars": 60, "depth": 1, "cot": cot, "reasoning_reconstruction": False,
            "rubric": False, "safe_rewrite": False, "capability": capability,
            "extraction_params": False, "template_sig": template, "template_lsh": [template[:6]],
            "system_hash": system, "language": "en", "distill_score": 0.8 if cot else 0.2,
            "rule_hits": ["cot.step_by_step"] if cot else [],
        })

    def account(aid: str, *, payment: str, domain: str, path: str = "standard") -> None:
        accounts.append({
            "account_id": aid, "created_at": T0 - timedelta(days=int(rng.integers(1, 400))),
            "email_domain": domain, "payment_fingerprint": payment, "billing_country": "US",
            "verification_path": path, "signup_ip": None, "plan": "pay-as-you-go",
        })

    caps = list(contract.CAPABILITIES)
    for i in range(160):  # honest individuals
        aid = f"hon{i:04d}"
        account(aid, payment=f"pay-h{i}", domain="gmail.com")
        truth[aid] = "casual"
        ip = f"73.{i // 200}.{i % 200}.{i % 7 + 1}"
        for _ in range(int(rng.integers(3, 30))):
            ts = T0 + timedelta(seconds=int(rng.integers(0, DAYS * 86400)))
            add(aid, ts, ip, f"honest-{i}-{int(rng.integers(0, 1000))}",
                cot=bool(rng.random() < 0.05), capability=caps[int(rng.integers(0, 7))])
    for i in range(40):  # university NAT: one address, many honest students
        aid = f"uni{i:04d}"
        account(aid, payment=f"pay-u{i}", domain="uni.edu", path="education")
        truth[aid] = "university"
        for _ in range(int(rng.integers(5, 25))):
            ts = T0 + timedelta(seconds=int(rng.integers(0, DAYS * 86400)))
            add(aid, ts, "128.30.0.1", f"homework-{int(rng.integers(0, 10_000))}",
                cot=bool(rng.random() < 0.3), capability="reasoning_math")
    for i in range(60):  # agentic coders: one popular system prompt + tools
        aid = f"dev{i:04d}"
        account(aid, payment=f"pay-d{i}", domain="corp.example")
        truth[aid] = "agentic"
        ip = f"24.{i}.1.{i % 5 + 1}"
        for _ in range(int(rng.integers(20, 60))):
            ts = T0 + timedelta(seconds=int(rng.integers(0, DAYS * 86400)))
            add(aid, ts, ip, f"code-{i}-{int(rng.integers(0, 5000))}", cot=False,
                capability="coding", system="sys-popular-agent")
    pool = [f"203.0.113.{k}" for k in range(1, 7)]
    templates = [f"atk-template-{k}" for k in range(12)]
    for i in range(24):  # one campaign: small clean accounts, shared everything rare
        aid = f"atk{i:04d}"
        account(aid, payment=f"pay-a{i % 3}", domain="mailbox.example")
        truth[aid] = "attacker"
        for _ in range(int(rng.integers(15, 25))):
            ts = T0 + timedelta(seconds=int(rng.integers(0, DAYS * 86400)))
            add(aid, ts, pool[int(rng.integers(0, len(pool)))],
                templates[int(rng.integers(0, len(templates)))], cot=bool(rng.random() < 0.8),
                capability=caps[int(rng.integers(0, 5))])
    return exchanges, signals, accounts, truth


def crafted(seed: int = 7) -> tuple[pa.Table, pa.Table, pa.Table, dict[str, str]]:
    """(exchanges, signals, accounts, truth population per account) for the crafted world."""
    ex, sig, acc, truth = _rows(np.random.default_rng(seed))
    return (
        pa.Table.from_pylist(ex, schema=contract.EXCHANGE_SCHEMA),
        pa.Table.from_pylist(sig, schema=contract.SIGNAL_SCHEMA),
        pa.Table.from_pylist(acc, schema=contract.ACCOUNT_SCHEMA),
        truth,
    )


def load_crafted(con, seed: int = 7) -> dict[str, str]:
    """Insert the crafted world into a store; return the truth population per account."""
    ex, sig, acc, truth = crafted(seed)
    for name, table in (("exchanges", ex), ("signals", sig), ("accounts", acc)):
        con.register("_crafted", table)
        con.execute(f"INSERT INTO {name} SELECT * FROM _crafted")
        con.unregister("_crafted")
    return truth
