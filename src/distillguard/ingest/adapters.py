"""Adapters for the two log shapes real gateways write: OpenAI- and Anthropic-style pairs.

A pair is one JSON object per line holding the provider request body, the provider response
body and the gateway's own metadata (see docs/log-contract.md for the exact shapes). Each
adapter maps a pair to a native contract record (a dict); the record then goes through exactly
the same vectorised validation as native JSONL, so a pair missing its account id is quarantined
as `missing_field` like any other row. Unknown metadata keys are kept in the record (they land
in `extra`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distillguard import contract

#: Gateway metadata keys that map to a contract field under another name.
METADATA_ALIASES = {"timestamp": "ts", "time": "ts", "http_status": "status", "key_id": "api_key_id"}
#: Contract fields a gateway puts in the pair's metadata (or at the pair's top level).
METADATA_FIELDS = (
    "request_id",
    "ts",
    "account_id",
    "api_key_id",
    "org_id",
    "ip",
    "user_agent",
    "endpoint",
    "status",
    "error",
    "latency_ms",
)
PAIR_KEYS = ("request", "response", "metadata")

Record = dict[str, Any]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _part_text(part: Any) -> str:
    """One content part -> text, the same rule as native JSONL (docs/log-contract.md)."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return ""
    kind = str(part.get("type") or "part")
    if isinstance(part.get("text"), str):
        return part["text"]
    if "image" in kind:
        return contract.IMAGE_PLACEHOLDER
    if kind == "tool_result":  # Anthropic: the result's own content is text or parts
        return _content_text(part.get("content"))
    if kind == "tool_use":
        return f"[tool_use {part.get('name', '')}]".replace(" ]", "]")
    if kind == "thinking" and isinstance(part.get("thinking"), str):
        return part["thinking"]
    return f"[{kind}]"


def _content_text(content: Any) -> Any:
    """Message content (string, list of parts, or null) -> text; other types pass through
    unchanged so validation reports them as `bad_type`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_part_text(p) for p in content)
    return content


def _metadata(pair: Record) -> Record:
    """Gateway metadata: the `metadata` object plus any top-level keys beside the pair keys."""
    meta: Record = {k: v for k, v in pair.items() if k not in PAIR_KEYS}
    if isinstance(pair.get("metadata"), dict):
        meta.update(pair["metadata"])
    elif "metadata" in pair:
        meta["metadata"] = pair["metadata"]
    return {METADATA_ALIASES.get(k, k): v for k, v in meta.items()}


def _merge_metadata(record: Record, meta: Record) -> Record:
    """Metadata wins for the fields it owns; other keys are kept for `extra`."""
    for key, value in meta.items():
        if key in METADATA_FIELDS or key not in record:
            record[key] = value
        else:
            record[f"metadata.{key}"] = value
    return record


def _params(request: Record, names: dict[str, str]) -> Record | None:
    params = {target: request[source] for source, target in names.items() if source in request}
    return params or None


def _dict(value: Any) -> Record:
    return value if isinstance(value, dict) else {}


def adapt_openai(pair: Record) -> Record:
    """OpenAI chat.completions pair -> native record."""
    request, response = _dict(pair.get("request")), _dict(pair.get("response"))
    messages, system = [], []
    raw_messages = request.get("messages")
    for message in raw_messages if isinstance(raw_messages, list) else []:
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            system.append(_content_text(message.get("content")))
        elif isinstance(message, dict):
            messages.append({"role": message.get("role"), "content": _content_text(message.get("content"))})
        else:
            messages.append(message)
    choices = response.get("choices") if isinstance(response.get("choices"), list) else []
    first = _dict(choices[0]) if choices else {}
    answer = _dict(first.get("message"))
    usage = _dict(response.get("usage"))
    tools = request.get("tools") if isinstance(request.get("tools"), list) else []
    tool_names = [_dict(t.get("function")).get("name") or t.get("name") for t in tools if isinstance(t, dict)]
    functions = request.get("functions") if isinstance(request.get("functions"), list) else []
    tool_names += [f.get("name") for f in functions if isinstance(f, dict)]
    calls = answer.get("tool_calls") if isinstance(answer.get("tool_calls"), list) else []
    params = _params(
        request,
        {
            "temperature": "temperature",
            "top_p": "top_p",
            "max_tokens": "max_tokens",
            "max_completion_tokens": "max_tokens",
            "n": "n",
            "logprobs": "logprobs",
            "stream": "stream",
            "reasoning_effort": "reasoning_effort",
        },
    )
    error = response.get("error")
    record: Record = {
        "request_id": response.get("id"),
        "ts": response["created"] * 1000 if isinstance(response.get("created"), int) else None,
        "model": request.get("model") or response.get("model"),
        "endpoint": "chat.completions",
        "system": "\n".join(s for s in system if isinstance(s, str)) if system else None,
        "messages": messages if isinstance(raw_messages, list) else raw_messages,
        "tools": [n for n in tool_names if n] or None,
        "params": params,
        "response_text": _content_text(answer.get("content")) if answer.get("content") is not None else None,
        "reasoning_text": _text(answer.get("reasoning_content")) or _text(answer.get("reasoning")),
        "tool_calls": [_dict(c.get("function")).get("name") for c in calls if isinstance(c, dict)]
        or None,
        "input_tokens": usage.get("prompt_tokens"),
        "output_tokens": usage.get("completion_tokens"),
        "reasoning_tokens": _dict(usage.get("completion_tokens_details")).get("reasoning_tokens"),
        "stop_reason": first.get("finish_reason"),
        "error": _dict(error).get("message") or _text(error),
    }
    return _merge_metadata(_drop_none(record), _metadata(pair))


def adapt_anthropic(pair: Record) -> Record:
    """Anthropic Messages pair -> native record."""
    request, response = _dict(pair.get("request")), _dict(pair.get("response"))
    raw_messages = request.get("messages")
    messages = [
        {"role": m.get("role"), "content": _content_text(m.get("content"))} if isinstance(m, dict) else m
        for m in (raw_messages if isinstance(raw_messages, list) else [])
    ]
    blocks = response.get("content") if isinstance(response.get("content"), list) else []
    blocks = [b for b in blocks if isinstance(b, dict)]
    texts = [b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)]
    thinking = [b["thinking"] for b in blocks if b.get("type") == "thinking" and isinstance(b.get("thinking"), str)]
    calls = [b.get("name") for b in blocks if b.get("type") in ("tool_use", "server_tool_use")]
    tools = request.get("tools") if isinstance(request.get("tools"), list) else []
    usage = _dict(response.get("usage"))
    thinking_cfg = _dict(request.get("thinking"))
    params = _params(
        request,
        {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_tokens", "stream": "stream"},
    ) or {}
    if "budget_tokens" in thinking_cfg:
        params["reasoning_budget"] = thinking_cfg["budget_tokens"]
    error = response.get("error")
    record: Record = {
        "request_id": response.get("id"),
        "model": request.get("model") or response.get("model"),
        "endpoint": "messages",
        "system": _content_text(request["system"]) if "system" in request else None,
        "messages": messages if isinstance(raw_messages, list) else raw_messages,
        "tools": [t.get("name") for t in tools if isinstance(t, dict) and t.get("name")] or None,
        "params": params or None,
        "response_text": "\n".join(texts) if texts else None,
        "reasoning_text": "\n".join(thinking) if thinking else None,
        "tool_calls": [c for c in calls if c] or None,
        "input_tokens": usage.get("input_tokens"),
        "output_tokens": usage.get("output_tokens"),
        "stop_reason": response.get("stop_reason"),
        "error": _dict(error).get("message") or _text(error),
    }
    return _merge_metadata(_drop_none(record), _metadata(pair))


def _drop_none(record: Record) -> Record:
    return {k: v for k, v in record.items() if v is not None}


ADAPTERS: dict[str, Callable[[Record], Record]] = {
    "openai": adapt_openai,
    "anthropic": adapt_anthropic,
}


def sniff(obj: Any) -> str | None:
    """Which pair shape a parsed first line has: "openai", "anthropic" or None (native)."""
    if not isinstance(obj, dict):
        return None
    request, response = obj.get("request"), obj.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict):
        return None
    if "choices" in response or response.get("object") == "chat.completion":
        return "openai"
    if response.get("type") == "message" or "stop_reason" in response or "system" in request:
        return "anthropic"
    return None
