"""Decision during the upstream call, and request signals in a child process.

A request of an account in good standing is forwarded while it is being decided; the response is
held until the decision allows it. These tests pin what the client and the upstream see when the
decision does not allow it, and that accounts with a record are decided first."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import httpx
import pytest

from conftest_gateway import (
    ADMIN,
    chat,
    client,
    controlled_signals,
    running_gateway,
    wait_for,
    wal_records,
)

CHALLENGE_COT = {"rules": [{"id": "cot", "action": "challenge", "reason": "cot_harvesting",
                            "when": {"signal.cot": True}}]}
DEGRADE_COT = {"rules": [{"id": "cot", "action": "degrade", "reason": "cot_degrade",
                          "when": {"signal.cot": True},
                          "degrade": {"drop_logprobs": True, "max_n": 1, "max_tokens": 64}}]}
SLOW = {"x-stub-sleep": "20"}  # the upstream is still "generating" when the decision lands
#: A prompt holding this is decided only once the upstream has received it (`gated_signals`).
UPSTREAM_FIRST = "(upstream first)"
#: Signals in the child process: the request is upstream before it is decided.
OVERLAP = {"annotate": None, "signals": "test_gateway_concurrent:gated_signals"}


def gated_signals(exchange: dict) -> dict:
    """`controlled_signals`, which for a prompt marked UPSTREAM_FIRST return only once the
    upstream stub has received that request (run in the signals process; the stub's address
    is in DG_TEST_STUB_URL). So the decision lands while the upstream call is under way
    however loaded the machine is: a fixed 50 ms of signals was once not enough for the
    forwarded request to reach the stub before the gateway cancelled it."""
    text = exchange["messages"][0]["content"]
    if UPSTREAM_FIRST in text:
        url = os.environ["DG_TEST_STUB_URL"] + "/_stub/requests"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url, timeout=10) as r:
                if any(x["body"].get("messages", [{}])[0].get("content") == text
                       for x in json.load(r)):
                    break
            time.sleep(0.01)
    return controlled_signals(exchange)


@pytest.fixture
def stub(upstream, monkeypatch):
    httpx.post(upstream.url + "/_stub/reset")
    monkeypatch.setenv("DG_TEST_STUB_URL", upstream.url)  # for gated_signals

    class Stub:
        @staticmethod
        def received() -> list[str]:
            return [r["body"]["messages"][0]["content"]
                    for r in httpx.get(upstream.url + "/_stub/requests").json()
                    if r["path"] == "/v1/chat/completions"]

        @staticmethod
        def disconnected() -> list[str]:
            return httpx.get(upstream.url + "/_stub/disconnected").json()

    return Stub


def metric(gw, name: str) -> float:
    text = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}).text
    lines = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


def test_rejected_during_call_never_reaches_client_and_is_cancelled_upstream(tmp_path, upstream,
                                                                              stub):
    with running_gateway(tmp_path, upstream.url, CHALLENGE_COT, **OVERLAP) as gw, \
            client(gw) as c:
        first = f"solve it step by step #1 {UPSTREAM_FIRST}"
        r = c.post("/v1/chat/completions", json=chat(text=first), headers=SLOW)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "distillguard_challenge"
        # no trace of the upstream's answer or reasoning (a bare "42" matched a request id)
        assert "choices" not in r.json() and "answer is 42" not in r.text
        # it was forwarded while being decided, and the gateway hung up on the upstream
        wait_for(lambda: first in stub.disconnected(), timeout=10)
        assert metric(gw, "distillguard_gateway_upstream_cancelled_total") == 1
        record = [x for x in wal_records(tmp_path / "wal") if x["status"] == 403][-1]
        assert record["gateway_upstream_cancelled"] is True
        assert record["gateway_action"] == "challenge"
        # that account is now decided before anything is forwarded
        r = c.post("/v1/chat/completions", json=chat(text="solve it step by step #2"))
        assert r.status_code == 403
        assert c.post("/v1/chat/completions", json=chat(text="plain #3")).status_code == 200
        assert "solve it step by step #2" not in stub.received()
        assert "plain #3" in stub.received()
        # another account in good standing still gets answers
        with client(gw, "key-7") as c7:
            ok = c7.post("/v1/chat/completions", json=chat(text="plain question"))
            assert ok.status_code == 200 and ok.json()["choices"]


def test_listed_account_is_decided_before_forwarding(tmp_path, upstream, stub):
    with running_gateway(tmp_path, upstream.url) as gw:
        httpx.put(gw.url + "/admin/accounts/acct-2", json={"action": "block"},
                  headers={"authorization": f"Bearer {ADMIN}"})
        with client(gw, "key-2") as c:
            r = c.post("/v1/chat/completions", json=chat(text="listed-marker"), headers=SLOW)
        assert r.status_code == 403
        assert "listed-marker" not in stub.received()
        assert metric(gw, "distillguard_gateway_upstream_cancelled_total") == 0


def test_degraded_during_call_is_resent_degraded(tmp_path, upstream, stub):
    with running_gateway(tmp_path, upstream.url, DEGRADE_COT, **OVERLAP) as gw, \
            client(gw) as c:
        text = f"think step by step {UPSTREAM_FIRST}"
        r = c.post("/v1/chat/completions",
                   json=chat(text=text, n=3, logprobs=True, max_tokens=999),
                   headers={"x-stub-sleep": "2"})
        assert r.status_code == 200 and r.headers["x-distillguard-decision"] == "degrade"
        assert len(r.json()["choices"]) == 1
        assert all("logprobs" not in ch for ch in r.json()["choices"])
        sent = httpx.get(upstream.url + "/_stub/requests").json()
        bodies = [x["body"] for x in sent if x["path"] == "/v1/chat/completions"]
        assert bodies[-1]["n"] == 1 and bodies[-1]["max_tokens"] == 64
        assert bodies[-1]["logprobs"] is False
        # the copy forwarded as written was cancelled before it answered
        wait_for(lambda: text in stub.disconnected(), timeout=10)


def test_decide_during_call_can_be_turned_off(tmp_path, upstream, stub):
    with running_gateway(tmp_path, upstream.url, CHALLENGE_COT,
                         decide_during_call=False) as gw, client(gw) as c:
        r = c.post("/v1/chat/completions", json=chat(text="go step by step, off"))
        assert r.status_code == 403
        assert "go step by step, off" not in stub.received()
        assert c.post("/v1/chat/completions", json=chat(text="plain, off")).status_code == 200


def test_signals_in_child_process_and_fallback_when_it_dies(tmp_path, upstream, stub):
    """Signals computed by the child process decide exactly like in-process ones; if the child
    is killed, the gateway computes them itself and starts a new child."""
    with running_gateway(tmp_path, upstream.url, CHALLENGE_COT, annotate=None,
                         signals="conftest_gateway:controlled_signals") as gw, client(gw) as c:
        g = gw.app.app.state.gateway
        proc = g.signals_process
        assert proc is not None and proc.alive
        assert c.post("/v1/chat/completions", json=chat(text="step by step A")).status_code == 403
        assert c.post("/v1/chat/completions", json=chat(text="plain A")).status_code == 200
        os.kill(proc.process.pid, signal.SIGKILL)
        wait_for(lambda: not proc.alive, timeout=10)
        with client(gw, "key-8") as c8:  # decided in-process meanwhile
            assert c8.post("/v1/chat/completions",
                           json=chat(text="step by step B")).status_code == 403
            assert c8.post("/v1/chat/completions", json=chat(text="plain B")).status_code == 200
        wait_for(lambda: proc.alive and proc.restarts == 1, timeout=60)
        with client(gw, "key-9") as c9:
            assert c9.post("/v1/chat/completions",
                           json=chat(text="step by step C")).status_code == 403
            assert c9.post("/v1/chat/completions", json=chat(text="plain C")).status_code == 200
        records = wal_records(tmp_path / "wal")
        assert {r["messages"][0]["content"] for r in records if r["status"] == 200} >= {
            "plain A", "plain B", "plain C"}
