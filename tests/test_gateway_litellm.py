"""The LiteLLM guardrail against a REAL LiteLLM proxy: block, degrade and logging via the
decision API. LiteLLM ([proxy] is ~740 MB) is an optional extra, so this test needs an
interpreter that has it: the current one, or DISTILLGUARD_LITELLM_PYTHON=/venv/bin/python."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from conftest_gateway import DECIDE, REPO, running_gateway, wait_for, wal_records
from upstream_stub import REASONING, ThreadedServer, free_port
from upstream_stub import app as stub_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def litellm_python() -> str:
    configured = os.environ.get("DISTILLGUARD_LITELLM_PYTHON")
    if configured:
        return configured
    if importlib.util.find_spec("litellm") is not None:
        return sys.executable
    pytest.skip("LiteLLM is not installed here (pip install 'distillguard[litellm]' or set "
                "DISTILLGUARD_LITELLM_PYTHON to a python that has litellm[proxy])")


POLICY = {"rules": [
    {"id": "b", "when": {"account.id": "blocked-user"}, "action": "block",
     "reason": "test_block"},
    {"id": "d", "when": {"account.id": "degraded-user"}, "action": "degrade",
     "reason": "test_degrade",
     "degrade": {"reasoning": "summary", "summary_chars": 60, "max_n": 1,
                 "drop_logprobs": True}}]}


def test_litellm_proxy_with_distillguard_guardrail(tmp_path):
    python = litellm_python()
    with ThreadedServer(stub_app) as upstream, \
            running_gateway(tmp_path, upstream.url, POLICY) as gw:
        port = free_port()
        config = tmp_path / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: stub-reason\n"
            f"    litellm_params: {{model: openai/stub-reason, api_base: '{upstream.url}/v1',"
            " api_key: not-used}\n"
            "general_settings: {master_key: sk-master}\n"
            "litellm_settings: {telemetry: false}\n"
            "guardrails:\n"
            "  - guardrail_name: distillguard\n"
            "    litellm_params:\n"
            "      guardrail: distillguard.gateway.litellm_guardrail.DistillguardGuardrail\n"
            "      mode: [pre_call, post_call]\n"
            "      default_on: true\n"
            f"      api_base: {gw.url}\n"
            f"      api_key: {DECIDE}\n"
            "      account_from: end_user\n")
        # LiteLLM fetches a model-cost map from the internet unless told to use its bundled one.
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        log = open(tmp_path / "litellm.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [str(Path(python).parent / "litellm"), "--config", str(config), "--port",
             str(port), "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            def alive() -> bool:
                assert proc.poll() is None, (tmp_path / "litellm.log").read_text()[-2000:]
                try:
                    return httpx.get(base + "/health/liveliness", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(alive, timeout=200, interval=0.5)
            auth = {"authorization": "Bearer sk-master"}

            def ask(user: str, **extra) -> httpx.Response:
                body = {"model": "stub-reason", "user": user,
                        "messages": [{"role": "user", "content": "hi"}], **extra}
                return httpx.post(base + "/v1/chat/completions", json=body, headers=auth,
                                  timeout=60)

            blocked = ask("blocked-user")
            assert blocked.status_code == 403
            assert "test_block" in blocked.text and "distillguard_block" in blocked.text
            degraded = ask("degraded-user", n=3, logprobs=True)
            assert degraded.status_code == 200
            message = degraded.json()["choices"][0]["message"]
            assert message["reasoning_content"] == \
                "[reasoning summary] Therefore the answer is 42."
            sent = httpx.get(upstream.url + "/_stub/requests").json()[-1]["body"]
            assert sent.get("n", 1) == 1 and not sent.get("logprobs")
            plain = ask("ok-user")
            assert plain.json()["choices"][0]["message"]["reasoning_content"] == REASONING
            stream = httpx.post(base + "/v1/chat/completions", headers=auth, timeout=60, json={
                "model": "stub-reason", "user": "degraded-user", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]})
            assert stream.status_code == 200 and b"restate the problem" not in stream.content
            assert b"tok0" in stream.content
            records = wait_for(lambda: len(r := [x for x in wal_records(tmp_path / "wal")
                                                if x["request_id"].startswith("litellm-")])
                               >= 4 and r, timeout=20)
            by_account = {r["account_id"]: r for r in records}
            assert by_account["blocked-user"]["status"] == 403
            assert by_account["ok-user"]["response_text"] == "The answer is 42."
            assert by_account["degraded-user"]["gateway_action"] == "degrade"
            assert orjson.dumps(records)  # valid log-contract JSON
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
