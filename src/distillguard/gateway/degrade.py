"""Output countermeasures: give a suspected distiller a less useful answer, not an error.

Request side: cap `n` and `max_tokens`, turn off `logprobs`, lower the reasoning effort.
Response side: strip raw reasoning text or replace it with a short extractive summary (the
conclusion without the step-by-step trace that makes reasoning valuable as training data), and
drop any `logprobs` the upstream still returned. Works on JSON bodies and on SSE streams event by
event, so a degraded stream is still delivered incrementally.
"""

from __future__ import annotations

import re

import orjson

from distillguard.gateway.policy import DegradeSpec

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)\s*", re.DOTALL)
SUMMARY_PREFIX = "[reasoning summary] "


def summarize(reasoning: str, max_chars: int) -> str:
    """A short extractive summary: the closing sentences of the reasoning, within `max_chars`."""
    sentences = [s.strip() for s in _SENTENCE_END.split(reasoning.strip()) if s.strip()]
    budget = max(0, max_chars - len(SUMMARY_PREFIX))
    picked: list[str] = []
    for sentence in reversed(sentences):
        if len(sentence) + sum(len(p) + 1 for p in picked) > budget:
            break
        picked.insert(0, sentence)
    if not picked and sentences:
        picked = [sentences[-1][: max(0, budget - 1)] + "…"]
    return SUMMARY_PREFIX + " ".join(picked)


def _replacement(reasoning: str, spec: DegradeSpec) -> str | None:
    """What replaces withheld reasoning: a summary, or None to remove it."""
    if spec.reasoning == "summary" and reasoning.strip():
        return summarize(reasoning, spec.summary_chars)
    return None


def degrade_request(body: dict, spec: DegradeSpec, endpoint: str) -> dict:
    """A copy of the request body with the caps of `spec` applied."""
    out = dict(body)
    if spec.max_n is not None and isinstance(out.get("n"), int) and out["n"] > spec.max_n:
        out["n"] = spec.max_n
    if spec.max_tokens is not None:
        for key in ("max_tokens", "max_completion_tokens"):
            value = out.get(key)
            if isinstance(value, int) and value > spec.max_tokens:
                out[key] = spec.max_tokens
        if "max_tokens" not in out and "max_completion_tokens" not in out:
            out["max_tokens"] = spec.max_tokens
        thinking = out.get("thinking")
        if isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int):
            out["thinking"] = {**thinking,
                               "budget_tokens": min(thinking["budget_tokens"], spec.max_tokens)}
    if spec.drop_logprobs:
        if endpoint == "completions":
            out.pop("logprobs", None)
        elif "logprobs" in out:
            out["logprobs"] = False
        out.pop("top_logprobs", None)
    if spec.reasoning_effort and "reasoning_effort" in out:
        out["reasoning_effort"] = spec.reasoning_effort
    return out


def _strip_think_tags(text: str, spec: DegradeSpec) -> str:
    def repl(match: re.Match) -> str:
        summary = _replacement(match.group(1), spec)
        return f"<think>{summary}</think>\n" if summary else ""

    return _THINK.sub(repl, text)


def degrade_response(body: dict, spec: DegradeSpec, endpoint: str) -> dict:
    """Apply the response-side countermeasures to a non-streaming JSON body (in place)."""
    if endpoint == "messages":
        if spec.reasoning:
            blocks = []
            for block in body.get("content") or []:
                if isinstance(block, dict) and block.get("type") in ("thinking",
                                                                     "redacted_thinking"):
                    summary = _replacement(block.get("thinking") or "", spec)
                    if summary:
                        blocks.append({"type": "thinking", "thinking": summary, "signature": ""})
                    continue
                blocks.append(block)
            body["content"] = blocks
        return body
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if spec.drop_logprobs:
            choice.pop("logprobs", None)
        if not spec.reasoning:
            continue
        msg = choice.get("message")
        if isinstance(msg, dict):
            for key in ("reasoning_content", "reasoning"):
                if isinstance(msg.get(key), str):
                    summary = _replacement(msg.pop(key), spec)
                    if summary:
                        msg[key] = summary
            if isinstance(msg.get("content"), str) and "<think>" in msg["content"]:
                msg["content"] = _strip_think_tags(msg["content"], spec)
        elif isinstance(choice.get("text"), str) and "<think>" in choice["text"]:
            choice["text"] = _strip_think_tags(choice["text"], spec)
    return body


class StreamDegrader:
    """Rewrites an SSE stream event by event. Reasoning deltas are withheld (and summarised in
    one delta when the answer starts or the stream ends); other events pass unchanged.

    Limitation: a `<think>` tag split across two deltas is not recognised (servers emit it as
    one token in practice).
    """

    def __init__(self, spec: DegradeSpec, endpoint: str):
        self.spec = spec
        self.endpoint = endpoint
        self._pending = b""
        self._withheld: dict[int, list[str]] = {}  # choice/block index -> reasoning text
        self._in_think: dict[int, bool] = {}
        self._template: dict | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send now for an upstream chunk (only complete events are emitted)."""
        self._pending += chunk
        if b"\n\n" not in self._pending:
            return b""
        complete, self._pending = self._pending.rsplit(b"\n\n", 1)
        out = [self._event(ev) for ev in complete.split(b"\n\n")]
        return b"".join(out)

    def finish(self) -> bytes:
        """Anything left at the end of the stream (a summary not yet sent, a partial event)."""
        tail = self._event(self._pending) if self._pending.strip() else b""
        return self._flush_summaries() + tail

    def _event(self, raw: bytes) -> bytes:
        lines = raw.split(b"\n")
        data_idx = next((i for i, ln in enumerate(lines) if ln.startswith(b"data:")), None)
        if data_idx is None:
            return raw + b"\n\n"
        payload = lines[data_idx][5:].strip()
        if payload == b"[DONE]":
            return self._flush_summaries() + raw + b"\n\n"
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return raw + b"\n\n"
        if not isinstance(obj, dict):
            return raw + b"\n\n"
        prefix = b""
        if self.endpoint == "messages":
            keep, prefix = self._anthropic(obj)
        else:
            keep, prefix = self._openai(obj)
        if not keep:
            return prefix
        lines[data_idx] = b"data: " + orjson.dumps(obj)
        return prefix + b"\n".join(lines) + b"\n\n"

    def _openai(self, obj: dict) -> tuple[bool, bytes]:
        prefix = b""
        changed = False
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            idx = int(choice.get("index", 0))
            if self.spec.drop_logprobs and "logprobs" in choice:
                choice.pop("logprobs")
                changed = True
            if not self.spec.reasoning:
                continue
            delta = choice.get("delta") or {}
            for key in ("reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    self._withheld.setdefault(idx, []).append(delta.pop(key))
                    changed = True
            content = delta.get("content")
            if isinstance(content, str):
                content = self._think_filter(idx, content)
                if content != delta["content"]:
                    delta["content"] = content
                    changed = True
                if content and idx in self._withheld:
                    prefix += self._summary_event(obj, idx)
            if self._template is None:
                self._template = obj
        if not changed:
            return True, prefix
        empty = all(
            not (c.get("delta") or {}) and not c.get("finish_reason")
            for c in obj.get("choices") or [] if isinstance(c, dict)
        ) and not obj.get("usage")
        return not empty, prefix

    def _think_filter(self, idx: int, content: str) -> str:
        """Move text inside <think>...</think> to the withheld reasoning."""
        out = []
        while content:
            if self._in_think.get(idx):
                end = content.find("</think>")
                if end < 0:
                    self._withheld.setdefault(idx, []).append(content)
                    return "".join(out)
                self._withheld.setdefault(idx, []).append(content[:end])
                self._in_think[idx] = False
                content = content[end + len("</think>"):].lstrip("\n")
            else:
                start = content.find("<think>")
                if start < 0:
                    out.append(content)
                    break
                out.append(content[:start])
                self._in_think[idx] = True
                self._withheld.setdefault(idx, [])
                content = content[start + len("<think>"):]
        return "".join(out)

    def _summary_event(self, template: dict, idx: int) -> bytes:
        summary = _replacement("".join(self._withheld.pop(idx, [])), self.spec)
        if not summary:
            return b""
        if self.endpoint == "messages":
            event = {"type": "content_block_delta", "index": idx,
                     "delta": {"type": "thinking_delta", "thinking": summary}}
            return b"event: content_block_delta\ndata: " + orjson.dumps(event) + b"\n\n"
        event = {k: template[k] for k in ("id", "object", "created", "model") if k in template}
        event["choices"] = [{"index": idx, "delta": {"reasoning_content": summary},
                             "finish_reason": None}]
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def _flush_summaries(self) -> bytes:
        if self.endpoint == "messages":
            return b""  # summaries are emitted at content_block_stop
        template = self._template or {}
        return b"".join(self._summary_event(template, idx) for idx in list(self._withheld))

    def _anthropic(self, obj: dict) -> tuple[bool, bytes]:
        if not self.spec.reasoning:
            return True, b""
        kind = obj.get("type")
        idx = int(obj.get("index", 0))
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") in ("thinking", "redacted_thinking"):
                self._withheld[idx] = [block.get("thinking") or ""]
                obj["content_block"] = {"type": "thinking", "thinking": "", "signature": ""}
            return True, b""
        if kind == "content_block_delta" and idx in self._withheld:
            delta = obj.get("delta") or {}
            if delta.get("type") == "thinking_delta":
                self._withheld[idx].append(delta.get("thinking") or "")
            return False, b""  # thinking and signature deltas are withheld
        if kind == "content_block_stop" and idx in self._withheld:
            return True, self._summary_event(obj, idx)
        return True, b""
