"""Gateway over real HTTP on loopback: passthrough fidelity, every decision type, per-cluster
throttling, hot reload, monitor mode, trusted proxies, malformed input, auth, decision API."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from conftest_gateway import (
    ADMIN,
    DECIDE,
    chat,
    client,
    running_gateway,
    wait_for,
    wal_records,
    write_policy,
    write_snapshot,
)
from upstream_stub import ANSWER, REASONING

DEGRADE_ALL = {"rules": [{"id": "degrade-all", "when": {"account.id": "acct-0"},
                          "action": "degrade", "reason": "test_degrade",
                          "degrade": {"reasoning": "summary", "summary_chars": 60, "drop_logprobs": True,
                                      "max_n": 1, "max_tokens": 64}}]}


@pytest.fixture
def stub_requests(upstream):
    httpx.post(upstream.url + "/_stub/reset")

    def received() -> list[dict]:
        return httpx.get(upstream.url + "/_stub/requests").json()

    return received


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


# ---- passthrough fidelity --------------------------------------------------------------------
def test_non_streaming_passthrough_is_byte_identical(tmp_path, upstream, stub_requests):
    body = chat("stub-reason", temperature=0.3, n=2, logprobs=True)
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body)
    with running_gateway(tmp_path, upstream.url) as gw, client(gw) as c:
        via = c.post("/v1/chat/completions?trace=1", json=body,
                     headers={"x-custom": "kept"})
        assert via.status_code == 200
        assert via.content == direct.content
        assert via.headers["x-upstream-server"] == "stub"
        assert via.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert "x-distillguard-decision" not in via.headers
        forwarded = stub_requests()[-1]
        assert forwarded["body"] == body
        assert forwarded["query"] == "trace=1"
        assert forwarded["headers"]["x-custom"] == "kept"
        assert forwarded["headers"]["authorization"] == "Bearer key-0"
        for path, payload in (("/v1/completions", {"model": "m", "prompt": "hi"}),
                              ("/v1/messages", chat("stub-reason", max_tokens=50))):
            assert c.post(path, json=payload).content == httpx.post(
                upstream.url + path, json=payload).content
        models = c.get("/v1/models")
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "stub-model"


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_upstream_errors_reach_client_unchanged(tmp_path, upstream, status):
    with running_gateway(tmp_path, upstream.url) as gw, client(gw) as c:
        r = c.post("/v1/chat/completions", json=chat(), headers={"x-stub-status": str(status)})
        assert r.status_code == status
        assert r.json()["error"]["message"] == f"stub error {status}"
        if status == 429:
            assert r.headers["retry-after"] == "7"
        record = wait_for(lambda: wal_records(tmp_path / "wal"))[-1]
        assert record["status"] == status and "stub error" in record["error"]


def test_streaming_chunks_in_order_and_unbuffered(tmp_path, upstream):
    body = chat("stub-reason", stream=True)
    headers = {"x-stub-chunks": "10", "x-stub-chunk-delay": "0.05"}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body, headers=headers)
    with running_gateway(tmp_path, upstream.url) as gw, client(gw) as c:
        start = time.perf_counter()
        with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            arrivals, chunks = [], []
            for chunk in r.iter_raw():
                arrivals.append(time.perf_counter() - start)
                chunks.append(chunk)
        assert sse_events(b"".join(chunks)) == sse_events(direct.content)
        # 17 events 50 ms apart: the first must arrive long before the stream ends.
        assert arrivals[0] < 0.4 < arrivals[-1]
        assert len(chunks) >= 10
        record = wait_for(lambda: wal_records(tmp_path / "wal"))[-1]
        assert record["response_text"] == "".join(f"tok{i} " for i in range(10))
        assert record["reasoning_text"].startswith("First, restate")
        assert record["params"]["stream"] is True and record["status"] == 200


def test_stream_events_split_across_chunks_are_recorded_whole(tmp_path, upstream):
    """The record is accumulated event by event as chunks pass; a `data:` line that arrives
    in two chunks is still parsed once, whole."""
    body = chat("stub-reason", stream=True)
    headers = {"x-stub-chunks": "6", "x-stub-split": "2"}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body, headers=headers)
    with running_gateway(tmp_path, upstream.url) as gw, client(gw) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            chunks = list(r.iter_raw())
        assert sse_events(b"".join(chunks)) == sse_events(direct.content)
        assert len(chunks) >= 12  # the halves really came apart
        record = wait_for(lambda: wal_records(tmp_path / "wal"))[-1]
        assert record["response_text"] == "".join(f"tok{i} " for i in range(6))
        assert record["reasoning_text"].startswith("First, restate")


def test_client_hanging_up_mid_stream_stops_the_upstream_stream(tmp_path, upstream):
    headers = {"x-stub-chunks": "100", "x-stub-chunk-delay": "0.05"}  # 5 s of tokens
    with running_gateway(tmp_path, upstream.url) as gw, client(gw) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat(stream=True),
                      headers=headers) as r:
            next(r.iter_raw())
        record = wait_for(lambda: wal_records(tmp_path / "wal"))[-1]
        assert record["error"] == "client_disconnected"
        assert "tok99" not in (record.get("response_text") or "")  # the rest was never read


def test_anthropic_streaming_passthrough(tmp_path, upstream):
    body = chat("stub-reason", stream=True, max_tokens=100)
    direct = httpx.post(upstream.url + "/v1/messages", json=body)
    with running_gateway(tmp_path, upstream.url) as gw, client(gw) as c:
        via = c.post("/v1/messages", json=body, headers={"x-api-key": "key-1"})
        assert sse_events(via.content) == sse_events(direct.content)
        record = wait_for(lambda: wal_records(tmp_path / "wal"))[-1]
        assert record["endpoint"] == "messages" and record["stop_reason"] == "end_turn"
        assert record["response_text"].startswith("tok0") and record["input_tokens"] == 11


def test_upstream_timeout_and_unreachable(tmp_path, upstream):
    with running_gateway(tmp_path, upstream.url, upstream_timeout_s=0.3) as gw, client(gw) as c:
        r = c.post("/v1/chat/completions", json=chat(), headers={"x-stub-sleep": "1"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    with running_gateway(tmp_path / "d", dead) as gw, client(gw) as c:
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


# ---- malformed requests and auth ---------------------------------------------------------------
def test_malformed_requests_get_clear_4xx_and_gateway_stays_up(tmp_path, upstream):
    with running_gateway(tmp_path, upstream.url, max_body_bytes=10_000) as gw, client(gw) as c:
        cases = [
            (c.post("/v1/chat/completions", content=b"{not json"), 400, "not JSON"),
            (c.post("/v1/chat/completions", content=b"[1, 2]"), 400, "JSON object"),
            (c.post("/v1/chat/completions", content=b"x" * 20_000), 413, "exceeds"),
            (c.post("/v1/chat/completions",
                    content=iter([b"{" + b" " * 6000, b" " * 6000 + b"}"])), 413, "exceeds"),
            (httpx.post(gw.url + "/v1/chat/completions", json=chat()), 401, "API key"),
            (httpx.post(gw.url + "/v1/chat/completions", json=chat(),
                        headers={"authorization": "Bearer wrong"}), 401, "API key"),
            (httpx.get(gw.url + "/v1/models"), 401, "API key"),
        ]
        # wrongly typed fields are forwarded (the upstream judges them) and still logged
        assert c.post("/v1/chat/completions", json={"model": "m", "messages": 5,
                                                    "tools": "x"}).status_code == 200
        assert wait_for(lambda: wal_records(tmp_path / "wal"))[-1]["messages"] == []
        for response, status, text in cases:
            assert response.status_code == status, response.text
            assert text in response.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200


def test_service_endpoints_need_tokens(tmp_path, upstream):
    with running_gateway(tmp_path, upstream.url) as gw:
        for method, path in (("GET", "/metrics"), ("GET", "/admin/state"),
                             ("POST", "/admin/reload"), ("GET", "/admin/accounts/acct-1"),
                             ("PUT", "/admin/accounts/acct-1"), ("POST", "/v1/decide"),
                             ("POST", "/v1/exchanges")):
            assert httpx.request(method, gw.url + path).status_code == 401
            bad = httpx.request(method, gw.url + path, headers={"authorization": "Bearer key-0"})
            assert bad.status_code == 401
        # the decide token opens the decision API, not the admin API
        decide_auth = {"authorization": f"Bearer {DECIDE}"}
        assert httpx.get(gw.url + "/admin/state", headers=decide_auth).status_code == 401
        admin = {"authorization": f"Bearer {ADMIN}"}
        assert httpx.get(gw.url + "/metrics", headers=admin).status_code == 200
        assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(gw.url + "/readyz").status_code == 200


# ---- decisions --------------------------------------------------------------------------------
def test_block_via_operator_list_with_reason_and_appeal(tmp_path, upstream):
    with running_gateway(tmp_path, upstream.url, appeal_url="https://appeal.example/x") as gw:
        admin = {"authorization": f"Bearer {ADMIN}"}
        r = httpx.put(gw.url + "/admin/accounts/acct-2", json={"action": "block"}, headers=admin)
        assert r.status_code == 200
        with client(gw, "key-2") as c:
            r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 403
        assert r.headers["x-distillguard-reason"] == "enforcement_list_block"
        info = r.json()["distillguard"]
        assert info["action"] == "block" and info["appeal_url"] == "https://appeal.example/x"
        assert info["request_id"] in r.json()["error"]["message"]
        with client(gw, "key-3") as c:
            assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        httpx.put(gw.url + "/admin/accounts/acct-2", json={"action": None}, headers=admin)
        with client(gw, "key-2") as c:
            assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        blocked = [r for r in wal_records(tmp_path / "wal") if r["status"] == 403]
        assert blocked and blocked[0]["gateway_action"] == "block"
        assert blocked[0]["response_text"] is None if "response_text" in blocked[0] else True


def test_challenge_rule_on_signals_and_live_state(tmp_path, upstream):
    policy = {"rules": [{"id": "cot-farm", "action": "challenge", "reason": "cot_harvesting",
                         "when": {"signal.cot": True, "live.requests": {"gte": 3},
                                  "live.template_repeat_share": {"gte": 0.5}}}]}
    with running_gateway(tmp_path, upstream.url, policy) as gw, client(gw) as c:
        statuses = [c.post("/v1/chat/completions",
                           json=chat(text=f"Q: think step by step about item {i}")).status_code
                    for i in range(5)]
        assert statuses == [200, 200, 403, 403, 403]
        r = c.post("/v1/chat/completions", json=chat(text="Q: think step by step again"))
        assert r.json()["error"]["code"] == "distillguard_challenge"
        assert r.json()["distillguard"]["reason_codes"] == ["cot_harvesting"]
        assert c.post("/v1/chat/completions", json=chat(text="plain question")).status_code == 200


def test_account_token_bucket_throttles_with_retry_after(tmp_path, upstream):
    policy = {"limits": [{"id": "acct", "scope": "account", "rate_per_s": 0.5, "burst": 3}]}
    with running_gateway(tmp_path, upstream.url, policy) as gw:
        with client(gw, "key-4") as c:
            statuses = [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(5)]
            assert statuses == [200, 200, 200, 429, 429]
            r = c.post("/v1/chat/completions", json=chat())
            assert r.headers["retry-after"] == "2"
            assert r.json()["distillguard"]["reason"] == "account_rate_limit"
        with client(gw, "key-5") as c:  # buckets are per account
            assert c.post("/v1/chat/completions", json=chat()).status_code == 200


def test_cluster_bucket_shared_by_many_accounts(tmp_path, upstream):
    members = [f"acct-{i}" for i in range(50)]
    write_snapshot(tmp_path / "wal", [[a, 0.8, True, "camp-1"] for a in members],
                   [["camp-1", 0.8, 50]])
    policy = {"limits": [
        {"id": "acct", "scope": "account", "rate_per_s": 10, "burst": 10},
        {"id": "cluster", "scope": "cluster", "rate_per_s": 0.001, "burst": 12,
         "when": {"account.flagged": True}, "reason": "cluster_rate_limit"}]}
    with running_gateway(tmp_path, upstream.url, policy) as gw:
        statuses = []
        for i in range(30):  # 30 different accounts, ONE request each
            with client(gw, f"key-{i}") as c:
                statuses.append(c.post("/v1/chat/completions", json=chat()).status_code)
        assert statuses.count(200) == 12 and statuses[12:] == [429] * 18
        with client(gw, "key-55") as c:  # key-55 is not in the campaign
            assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        records = [r for r in wal_records(tmp_path / "wal") if r["status"] == 429]
        assert {r["gateway_cluster_id"] for r in records} == {"camp-1"}
        assert all(r["gateway_reasons"] == ["cluster_rate_limit"] for r in records)


def test_degrade_non_streaming(tmp_path, upstream, stub_requests):
    with running_gateway(tmp_path, upstream.url, DEGRADE_ALL) as gw, client(gw) as c:
        r = c.post("/v1/chat/completions",
                   json=chat("stub-reason", n=4, logprobs=True, top_logprobs=5, max_tokens=4096))
        assert r.status_code == 200 and r.headers["x-distillguard-decision"] == "degrade"
        sent = stub_requests()[-1]["body"]
        assert sent["n"] == 1 and sent["logprobs"] is False and sent["max_tokens"] == 64
        assert "top_logprobs" not in sent
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] == ANSWER
        assert msg["reasoning_content"].startswith("[reasoning summary]")
        assert "step by step" not in msg["reasoning_content"]
        assert "Therefore the answer is 42." in msg["reasoning_content"]
        assert all("logprobs" not in ch for ch in r.json()["choices"])
        think = c.post("/v1/chat/completions", json=chat("stub-think-tags")).json()
        assert "restate the problem" not in think["choices"][0]["message"]["content"]
        assert think["choices"][0]["message"]["content"].endswith(ANSWER)
        anthropic = c.post("/v1/messages", json=chat("stub-reason", max_tokens=10_000)).json()
        assert stub_requests()[-1]["body"]["max_tokens"] == 64
        thinking = anthropic["content"][0]
        assert thinking["type"] == "thinking" and "step by step" not in thinking["thinking"]
        record = [r for r in wal_records(tmp_path / "wal") if r["endpoint"] == "messages"][-1]
        assert record["gateway_action"] == "degrade" and record["reasoning_text"] == REASONING


def test_degrade_streaming_withholds_reasoning_but_streams_answer(tmp_path, upstream):
    with running_gateway(tmp_path, upstream.url, DEGRADE_ALL) as gw, client(gw) as c:
        raw = c.post("/v1/chat/completions", json=chat("stub-reason", stream=True)).content
        events = [orjson.loads(e[6:]) for e in sse_events(raw) if e != b"data: [DONE]"]
        reasoning = [ch["delta"]["reasoning_content"] for e in events for ch in e["choices"]
                     if "reasoning_content" in ch["delta"]]
        assert len(reasoning) == 1 and reasoning[0].startswith("[reasoning summary]")
        content = "".join(ch["delta"].get("content", "") for e in events for ch in e["choices"])
        assert content == "".join(f"tok{i} " for i in range(8))
        assert raw.endswith(b"data: [DONE]\n\n")
        raw = c.post("/v1/messages", json=chat("stub-reason", stream=True,
                                               max_tokens=10)).content
        thinking = [orjson.loads(e.split(b"data: ")[1]) for e in sse_events(raw)
                    if b"thinking_delta" in e]
        assert len(thinking) == 1 and "step by step" not in thinking[0]["delta"]["thinking"]
        assert b"signature_delta" not in raw and b"message_stop" in raw


def test_policy_hot_reload_and_invalid_policy_keeps_previous(tmp_path, upstream):
    with running_gateway(tmp_path, upstream.url, {}) as gw, client(gw) as c:
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        write_policy(tmp_path / "policy.yaml", {"rules": [
            {"id": "block-0", "when": {"account.id": "acct-0"}, "action": "block"}]})
        wait_for(lambda: c.post("/v1/chat/completions", json=chat()).status_code == 403)
        (tmp_path / "policy.yaml").write_text("rules: [{id: x, action: explode}]")
        admin = {"authorization": f"Bearer {ADMIN}"}
        state = wait_for(lambda: (s := httpx.get(gw.url + "/admin/state", headers=admin).json())
                         ["policy"]["last_error"] and s)
        assert "explode" not in state["policy"]["last_error"] or "action" in \
            state["policy"]["last_error"]
        assert c.post("/v1/chat/completions", json=chat()).status_code == 403  # previous policy
        r = httpx.post(gw.url + "/admin/reload", headers=admin)
        assert r.status_code == 422 and "action" in r.json()["error"]["message"]


def test_monitor_mode_records_but_does_not_enforce(tmp_path, upstream):
    policy = {"mode": "monitor",
              "limits": [{"id": "acct", "scope": "account", "rate_per_s": 0.01, "burst": 1}],
              "rules": [{"id": "block-0", "when": {"account.id": "acct-0"}, "action": "block",
                         "reason": "would_block"}]}
    with running_gateway(tmp_path, upstream.url, policy) as gw, client(gw) as c:
        assert [c.post("/v1/chat/completions", json=chat()).status_code
                for _ in range(3)] == [200] * 3
        records = wait_for(lambda: len(r := wal_records(tmp_path / "wal")) == 3 and r)
        assert all(r["gateway_action"] == "allow" for r in records)
        assert all(r["gateway_would_action"] == "block" for r in records)
        assert records[-1]["gateway_monitored_rules"] == ["acct", "block-0"]
        metrics = httpx.get(gw.url + "/metrics",
                            headers={"authorization": f"Bearer {ADMIN}"}).text
        assert 'distillguard_gateway_monitored_total{action="block",rule="block-0"} 3.0' in metrics


def test_trusted_proxy_forwarded_for(tmp_path, upstream):
    for trusted, xff, expected in (
        ([], "1.2.3.4", "127.0.0.1"),  # untrusted peer: header ignored
        (["127.0.0.1/32"], "1.2.3.4", "1.2.3.4"),
        (["127.0.0.1/32", "10.0.0.0/8"], "9.9.9.9, 5.6.7.8, 10.1.1.1", "5.6.7.8"),
    ):
        tmp = tmp_path / f"p{len(trusted)}"
        with running_gateway(tmp, upstream.url, trusted_proxies=trusted) as gw, client(gw) as c:
            c.post("/v1/chat/completions", json=chat(), headers={"x-forwarded-for": xff})
            assert wait_for(lambda tmp=tmp: wal_records(tmp / "wal"))[-1]["ip"] == expected


def test_decide_api_and_external_exchange_logging(tmp_path, upstream):
    auth = {"authorization": f"Bearer {DECIDE}"}
    with running_gateway(tmp_path, upstream.url, DEGRADE_ALL) as gw:
        r = httpx.post(gw.url + "/v1/decide", headers=auth, json={
            "account_id": "acct-0", "ip": "203.0.113.9", "endpoint": "chat.completions",
            "request": chat("m", n=3)})
        body = r.json()
        assert r.status_code == 200 and body["action"] == "degrade"
        assert body["degrade"] == {"reasoning": "summary", "summary_chars": 60,
                                   "drop_logprobs": True, "max_n": 1, "max_tokens": 64}
        assert body["reasons"] == ["test_degrade"]
        other = httpx.post(gw.url + "/v1/decide", headers=auth,
                           json={"api_key": "key-7", "request": chat()}).json()
        assert other["action"] == "allow" and other["account_id"] == "acct-7"
        bad = httpx.post(gw.url + "/v1/decide", headers=auth, json={"request": chat()})
        assert bad.status_code == 422
        record = {"request_id": "ext-1", "ts": "2026-01-01T00:00:00Z", "account_id": "acct-9",
                  "model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(gw.url + "/v1/exchanges", headers=auth,
                          json=[record]).json() == {"logged": 1}
        assert httpx.post(gw.url + "/v1/exchanges", headers=auth,
                          json={"request_id": "x"}).status_code == 422
        assert wait_for(lambda: [r for r in wal_records(tmp_path / "wal")
                                 if r["request_id"] == "ext-1"])
