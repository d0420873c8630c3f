"""Turn proxied OpenAI / Anthropic requests and responses into log-contract exchange records.

The same record feeds request signals (before the upstream call) and the write-ahead log (after
it), so a scan sees gateway traffic exactly as it sees ingested logs.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson

from distillguard import contract

ENDPOINT_BY_PATH = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/messages": "messages",
}


def _text(content: Any) -> str:
    """Flatten OpenAI / Anthropic content (str or list of parts) to text; images -> [image]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind in ("text", "input_text"):
                    parts.append(str(part.get("text", "")))
                elif kind in ("image_url", "image", "input_image"):
                    parts.append(contract.IMAGE_PLACEHOLDER)
                elif kind == "tool_result":
                    parts.append(_text(part.get("content")))
                elif kind == "tool_use":
                    parts.append(orjson.dumps(part.get("input")).decode())
        return "\n".join(p for p in parts if p)
    return str(content)


def _role(role: Any) -> str:
    return role if role in contract.MESSAGE_ROLES else "user"


def request_fields(endpoint: str, body: dict) -> dict[str, Any]:
    """The request half of an exchange record (model, system, messages, tools, params)."""
    system = None
    messages: list[dict[str, str]] = []
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = "\n".join(p if isinstance(p, str) else orjson.dumps(p).decode()
                               for p in prompt)
        messages.append({"role": "user", "content": _text(prompt)})
    else:
        if endpoint == "messages" and body.get("system") is not None:
            system = _text(body.get("system"))
        for m in _list(body.get("messages")):
            if not isinstance(m, dict):
                continue
            role = m.get("role")
            if role == "system" and endpoint == "chat.completions" and system is None:
                system = _text(m.get("content"))
                continue
            messages.append({"role": _role(role), "content": _text(m.get("content"))})
    tools = []
    for t in _list(body.get("tools")):
        if isinstance(t, dict):
            name = (t.get("function") or {}).get("name") if "function" in t else t.get("name")
            tools.append(str(name) if name else orjson.dumps(t).decode())
    logprobs = body.get("logprobs")
    params = {
        "temperature": _num(body.get("temperature")),
        "top_p": _num(body.get("top_p")),
        "max_tokens": _int(body.get("max_tokens", body.get("max_completion_tokens"))),
        "n": _int(body.get("n")),
        "logprobs": bool(logprobs) if logprobs is not None else None,
        "stream": bool(body.get("stream")) if "stream" in body else None,
        "reasoning_effort": body.get("reasoning_effort")
        if isinstance(body.get("reasoning_effort"), str) else None,
        "reasoning_budget": _int((body.get("thinking") or {}).get("budget_tokens"))
        if isinstance(body.get("thinking"), dict) else None,
    }
    return {
        "model": str(body.get("model") or "unknown"),
        "endpoint": endpoint,
        "system": system,
        "messages": messages,
        "tools": tools or None,
        "params": params,
    }


def _list(value: Any) -> list:
    """`value` if it is a list, else empty: a malformed field never breaks logging."""
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


_iso_second: list = [None, ""]  # [whole second, its "YYYY-MM-DDTHH:MM:SS"]


def iso(ts: float) -> str:
    """`datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")`, with the part
    up to the second formatted once per second (it is on every request's path)."""
    frac, whole = math.modf(ts)  # split and round like datetime.fromtimestamp does
    second, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    elif us < 0:
        second, us = second - 1, us + 1_000_000
    cached = _iso_second
    if cached[0] != second:
        cached[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        cached[0] = second
    return f"{cached[1]}.{us // 1000:03d}+00:00"


class ResponseAccumulator:
    """Collects the response half of an exchange from a JSON body or from SSE events."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict] = {}
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.stop_reason: str | None = None
        self._block_kind: dict[int, str] = {}

    # ---- non-streaming -------------------------------------------------------------------
    def from_body(self, body: dict) -> None:
        if self.endpoint == "messages":
            for i, block in enumerate(body.get("content") or []):
                self._anthropic_block(i, block)
            self.stop_reason = body.get("stop_reason")
            self._usage(body.get("usage"))
            return
        choices = body.get("choices") or []
        if choices and isinstance(choices[0], dict):
            first = choices[0]
            self.stop_reason = first.get("finish_reason")
            if self.endpoint == "completions":
                self.text.append(str(first.get("text") or ""))
            else:
                msg = first.get("message") or {}
                self.text.append(_text(msg.get("content")))
                reasoning = msg.get("reasoning_content") or msg.get("reasoning")
                if isinstance(reasoning, str):
                    self.reasoning.append(reasoning)
                for i, call in enumerate(msg.get("tool_calls") or []):
                    self.tool_calls[i] = call
        self._usage(body.get("usage"))

    def _anthropic_block(self, i: int, block: dict) -> None:
        kind = block.get("type")
        self._block_kind[i] = kind
        if kind == "text":
            self.text.append(block.get("text") or "")
        elif kind == "thinking":
            self.reasoning.append(block.get("thinking") or "")
        elif kind == "tool_use":
            self.tool_calls[i] = {"name": block.get("name"), "input": block.get("input")}

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        inp = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
        if inp is not None:
            self.input_tokens = inp
        out = _int(usage.get("completion_tokens", usage.get("output_tokens")))
        if out is not None:
            self.output_tokens = out
        details = usage.get("completion_tokens_details")
        if isinstance(details, dict):
            self.reasoning_tokens = _int(details.get("reasoning_tokens"))

    # ---- streaming -----------------------------------------------------------------------
    def from_event(self, data: dict) -> None:
        """One parsed SSE `data:` object (OpenAI chunk or Anthropic event)."""
        if self.endpoint == "messages":
            kind = data.get("type")
            if kind == "message_start":
                self._usage((data.get("message") or {}).get("usage"))
            elif kind == "content_block_start":
                block = data.get("content_block") or {}
                self._anthropic_block(int(data.get("index", 0)), block)
            elif kind == "content_block_delta":
                delta = data.get("delta") or {}
                dk = delta.get("type")
                if dk == "text_delta":
                    self.text.append(delta.get("text") or "")
                elif dk == "thinking_delta":
                    self.reasoning.append(delta.get("thinking") or "")
                elif dk == "input_json_delta":
                    call = self.tool_calls.setdefault(int(data.get("index", 0)), {})
                    call["arguments"] = call.get("arguments", "") + (
                        delta.get("partial_json") or ""
                    )
            elif kind == "message_delta":
                self.stop_reason = (data.get("delta") or {}).get("stop_reason") or self.stop_reason
                self._usage(data.get("usage"))
            return
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.stop_reason = choice["finish_reason"]
            if self.endpoint == "completions":
                self.text.append(str(choice.get("text") or ""))
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.text.append(str(delta["content"]))
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str):
                self.reasoning.append(reasoning)
            for call in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(int(call.get("index", 0)), {"arguments": ""})
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["name"] = fn["name"]
                slot["arguments"] = slot.get("arguments", "") + (fn.get("arguments") or "")
        self._usage(data.get("usage"))

    def fields(self) -> dict[str, Any]:
        return {
            "response_text": "".join(self.text) or None,
            "reasoning_text": "".join(self.reasoning) or None,
            "tool_calls": [orjson.dumps(c).decode() for _, c in sorted(self.tool_calls.items())]
            or None,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "stop_reason": self.stop_reason,
        }


def iter_sse_data(buffer: bytes):
    """Yield parsed JSON objects of every complete `data:` event in `buffer` (bad ones skipped)."""
    for line in buffer.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj
