"""LiteLLM proxy guardrail: ask a distillguard gateway's decision API about every request.

For teams that already run the LiteLLM proxy: the proxy keeps routing; distillguard decides.
Before the call (`pre_call`) the request goes to `POST /v1/decide`; `block` / `challenge` /
`throttle` become HTTP 403 / 403 / 429 errors with the reason code and appeal path, `degrade`
caps the request (n, max_tokens, logprobs) and, after the call, withholds or summarises the
reasoning text of the answer (streaming included). Every exchange is then logged through
`POST /v1/exchanges`, so `distillguard scan` sees LiteLLM traffic too.

LiteLLM config (docs/gateway.md, "LiteLLM"):

    guardrails:
      - guardrail_name: distillguard
        litellm_params:
          guardrail: distillguard.gateway.litellm_guardrail.DistillguardGuardrail
          mode: [pre_call, post_call]
          default_on: true
          api_base: http://127.0.0.1:8080          # the distillguard gateway
          api_key: os.environ/DISTILLGUARD_DECIDE_TOKEN

Requires the `litellm` extra (`pip install distillguard[litellm]`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import httpx
from fastapi import HTTPException
from litellm.integrations.custom_guardrail import CustomGuardrail

from distillguard.gateway.degrade import degrade_request, summarize
from distillguard.gateway.exchange import ResponseAccumulator, iso, request_fields
from distillguard.gateway.policy import DegradeSpec

log = logging.getLogger("distillguard.litellm")

ENDPOINT_BY_CALL_TYPE = {
    "completion": "chat.completions", "acompletion": "chat.completions",
    "text_completion": "completions", "atext_completion": "completions",
    "anthropic_messages": "messages",
}
STATUS = {"block": 403, "challenge": 403, "throttle": 429}
METADATA_KEY = "distillguard"


class DistillguardGuardrail(CustomGuardrail):
    """See the module docstring. Extra `litellm_params`: api_base, api_key, timeout_s,
    fail_open (default true: if the decision API is down, requests are served and counted),
    account_from (user_id | team_id | end_user | key: which LiteLLM identity is the account)."""

    def __init__(self, api_base: str | None = None, api_key: str | None = None,
                 timeout_s: float = 0.5, fail_open: bool = True, account_from: str = "user_id",
                 **kwargs: Any):
        self.api_base = (api_base or os.environ.get("DISTILLGUARD_URL")
                         or "http://127.0.0.1:8080").rstrip("/")
        token = api_key or os.environ.get("DISTILLGUARD_DECIDE_TOKEN")
        self.fail_open = fail_open
        self.account_from = account_from
        self.client = httpx.AsyncClient(
            base_url=self.api_base, timeout=timeout_s,
            headers={"authorization": f"Bearer {token}"} if token else {})
        self._pending: set[asyncio.Task] = set()
        super().__init__(**kwargs)

    # ---- identity ------------------------------------------------------------------------
    def account_of(self, user_api_key_dict: Any, data: dict) -> tuple[str, str | None]:
        """(account id, org id) from the LiteLLM key's identity."""
        auth = user_api_key_dict
        candidates = {
            "user_id": getattr(auth, "user_id", None),
            "team_id": getattr(auth, "team_id", None),
            "end_user": getattr(auth, "end_user_id", None) or data.get("user"),
            "key": getattr(auth, "api_key", None),
        }
        account = candidates.get(self.account_from) or next(
            (v for v in candidates.values() if v), "anonymous")
        return str(account), getattr(auth, "org_id", None) or getattr(auth, "team_id", None)

    # ---- hooks ---------------------------------------------------------------------------
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict,
                                  call_type: str) -> dict:
        endpoint = ENDPOINT_BY_CALL_TYPE.get(call_type)
        if endpoint is None:
            return data
        account, org = self.account_of(user_api_key_dict, data)
        request_id = f"litellm-{uuid.uuid4().hex}"
        request = {k: v for k, v in data.items()
                   if k in ("model", "messages", "prompt", "system", "tools", "n", "max_tokens",
                            "max_completion_tokens", "logprobs", "top_logprobs", "stream",
                            "temperature", "top_p", "reasoning_effort", "thinking")}
        payload = {"request_id": request_id, "account_id": account, "org_id": org,
                   "endpoint": endpoint, "request": request,
                   "ip": _client_ip(data), "user_agent": _header(data, "user-agent")}
        try:
            r = await self.client.post("/v1/decide", json=payload)
            r.raise_for_status()
            decision = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.error("distillguard decision API unavailable: %r", exc)
            if self.fail_open:
                return data
            raise HTTPException(503, detail={"error": "distillguard_unavailable"}) from exc
        meta = data.setdefault("metadata", {})
        meta[METADATA_KEY] = {"request_id": request_id, "account_id": account, "org_id": org,
                              "endpoint": endpoint, "decision": decision, "ts": time.time()}
        action = decision.get("action")
        if action in STATUS:
            detail = {"error": f"distillguard_{action}", "reason_codes": decision.get("reasons"),
                      "request_id": request_id, "appeal_url": decision.get("appeal_url")}
            if decision.get("retry_after_s"):
                detail["retry_after_s"] = decision["retry_after_s"]
            self._log_exchange(data, status=STATUS[action], error=action)
            raise HTTPException(STATUS[action], detail=detail)
        if action == "degrade" and decision.get("degrade"):
            spec = DegradeSpec(**decision["degrade"])
            capped = degrade_request(data, spec, endpoint)
            data.clear()
            data.update(capped)
        return data

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any,
                                           response: Any) -> Any:
        spec = self._degrade_spec(data)
        body = _as_dict(response)
        if spec is not None and spec.reasoning:
            for choice in getattr(response, "choices", None) or []:
                message = getattr(choice, "message", None)
                for attr in ("reasoning_content", "thinking_blocks"):
                    value = getattr(message, attr, None) if message is not None else None
                    if not value:
                        continue
                    text = value if isinstance(value, str) else " ".join(
                        str(b.get("thinking", "")) for b in value if isinstance(b, dict))
                    replacement = (summarize(text, spec.summary_chars)
                                   if spec.reasoning == "summary" and attr == "reasoning_content"
                                   else None)
                    setattr(message, attr, replacement)
        acc = ResponseAccumulator(self._endpoint(data))
        if isinstance(body, dict):
            acc.from_body(body)
        self._log_exchange(data, status=200, response=acc.fields())
        return response

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any, response: Any,
                                                      request_data: dict):
        spec = self._degrade_spec(request_data)
        acc = ResponseAccumulator(self._endpoint(request_data))
        withheld: list[str] = []
        async for chunk in response:
            body = _as_dict(chunk)
            if isinstance(body, dict):
                acc.from_event(body)
            if spec is not None and spec.reasoning:
                for choice in getattr(chunk, "choices", None) or []:
                    delta = getattr(choice, "delta", None)
                    text = getattr(delta, "reasoning_content", None) if delta else None
                    if text:
                        withheld.append(text)
                        delta.reasoning_content = None
                    if withheld and delta is not None and getattr(delta, "content", None) \
                            and spec.reasoning == "summary":
                        delta.reasoning_content = summarize("".join(withheld),
                                                            spec.summary_chars)
                        withheld.clear()
            yield chunk
        self._log_exchange(request_data, status=200, response=acc.fields())

    # ---- helpers -------------------------------------------------------------------------
    @staticmethod
    def _degrade_spec(data: dict) -> DegradeSpec | None:
        decision = ((data.get("metadata") or {}).get(METADATA_KEY) or {}).get("decision") or {}
        if decision.get("action") == "degrade" and decision.get("degrade"):
            return DegradeSpec(**decision["degrade"])
        return None

    @staticmethod
    def _endpoint(data: dict) -> str:
        return ((data.get("metadata") or {}).get(METADATA_KEY) or {}).get(
            "endpoint", "chat.completions")

    def _log_exchange(self, data: dict, *, status: int, error: str | None = None,
                      response: dict | None = None) -> None:
        """Send the exchange to the gateway's WAL without delaying the LiteLLM response."""
        meta = (data.get("metadata") or {}).get(METADATA_KEY)
        if not meta:
            return
        record = request_fields(meta["endpoint"], data)
        decision = meta["decision"]
        record.update(request_id=meta["request_id"], ts=iso(meta["ts"]),
                      account_id=meta["account_id"], org_id=meta["org_id"], status=status,
                      latency_ms=round((time.time() - meta["ts"]) * 1000, 3),
                      gateway_action=decision.get("action"), **(response or {}))
        if error:
            record["error"] = error
        if decision.get("reasons"):
            record["gateway_reasons"] = decision["reasons"]
        task = asyncio.ensure_future(self._post_exchange(record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _post_exchange(self, record: dict) -> None:
        try:
            r = await self.client.post("/v1/exchanges", json=record)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            log.error("could not log exchange %s to distillguard: %r", record["request_id"], exc)


def _as_dict(obj: Any) -> Any:
    if isinstance(obj, dict):
        return obj
    dump = getattr(obj, "model_dump", None)
    return dump() if callable(dump) else None


def _header(data: dict, name: str) -> str | None:
    headers = ((data.get("proxy_server_request") or {}).get("headers") or {})
    return headers.get(name)


def _client_ip(data: dict) -> str | None:
    meta = data.get("metadata") or {}
    return meta.get("requester_ip_address") or None


__all__ = ["DistillguardGuardrail"]
