"""A small OpenAI/Anthropic-compatible model server for gateway tests and benchmarks.

Deterministic answers, real HTTP (uvicorn on 127.0.0.1), SSE streaming. Test controls travel in
request headers so the body stays a genuine API request:
  x-stub-status: 429        answer with that status and an error body
  x-stub-sleep: 2.5         sleep that many seconds before answering (timeouts)
  x-stub-chunks: 8          number of content chunks in a stream
  x-stub-chunk-delay: 0.05  seconds between stream chunks
  x-stub-split: 1           send each stream event in two writes, split mid-line, that
                            many ms apart (an event line across two chunks)
The model name decides the shape: names containing "reason" return reasoning
(`reasoning_content`, or `thinking` blocks on /v1/messages); "think-tags" puts <think>...</think>
inside the content, like llama.cpp serving DeepSeek-R1.
GET /_stub/requests returns the bodies and headers received (to check what was forwarded);
GET /_stub/disconnected the first message of each request whose client hung up while the stub
slept on it (to check that the gateway cancelled an upstream call).

Run: python tests/upstream_stub.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import threading
import time

import orjson

REASONING = ("First, restate the problem. Next, add the two numbers step by step. "
             "Carry the one where needed. Therefore the answer is 42.")
ANSWER = "The answer is 42."
RECEIVED: list[dict] = []
DISCONNECTED: list[str] = []  # first message of requests whose client left during x-stub-sleep
RECEIVED_CAP = 1000


async def _read(receive) -> bytes:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def _send_json(send, status: int, obj, headers: list | None = None) -> None:
    data = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
        (b"x-upstream-server", b"stub"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def _chat(model: str, body: dict) -> dict:
    n = body.get("n") or 1
    message: dict = {"role": "assistant", "content": ANSWER}
    if "reason" in model:
        message["reasoning_content"] = REASONING
    if "think-tags" in model:
        message["content"] = f"<think>{REASONING}</think>\n{ANSWER}"
    choices = [{"index": i, "message": dict(message), "finish_reason": "stop"} for i in range(n)]
    if body.get("logprobs"):
        for c in choices:
            c["logprobs"] = {"content": [{"token": "The", "logprob": -0.1}]}
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 1, "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                      "completion_tokens_details": {"reasoning_tokens": 30 if "reason" in model
                                                    else 0}}}


def _chat_stream(model: str, chunks: int) -> list[bytes]:
    base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1,
            "model": model}
    events = []

    def ev(delta: dict, finish=None) -> None:
        events.append(b"data: " + orjson.dumps(
            {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n")

    ev({"role": "assistant", "content": ""})
    if "reason" in model:
        for part in REASONING.split(". "):
            ev({"reasoning_content": part + ". "})
    if "think-tags" in model:
        ev({"content": "<think>"})
        ev({"content": REASONING})
        ev({"content": "</think>\n"})
    words = [f"tok{i} " for i in range(max(1, chunks))]
    for w in words:
        ev({"content": w})
    ev({}, "stop")
    events.append(b"data: " + orjson.dumps(
        {**base, "choices": [], "usage": {"prompt_tokens": 11,
                                           "completion_tokens": len(words)}}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _messages(model: str) -> dict:
    content = []
    if "reason" in model:
        content.append({"type": "thinking", "thinking": REASONING, "signature": "sig"})
    content.append({"type": "text", "text": ANSWER})
    return {"id": "msg_stub", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "end_turn",
            "usage": {"input_tokens": 11, "output_tokens": 7}}


def _messages_stream(model: str, chunks: int) -> list[bytes]:
    def ev(name: str, obj: dict) -> bytes:
        return f"event: {name}\n".encode() + b"data: " + orjson.dumps(obj) + b"\n\n"

    out = [ev("message_start", {"type": "message_start", "message": {
        "id": "msg_stub", "type": "message", "role": "assistant", "model": model, "content": [],
        "usage": {"input_tokens": 11, "output_tokens": 1}}})]
    idx = 0
    if "reason" in model:
        out.append(ev("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "thinking",
                                                                "thinking": ""}}))
        for part in REASONING.split(". "):
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "thinking_delta",
                                                            "thinking": part + ". "}}))
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "signature_delta",
                                                        "signature": "sig"}}))
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
        idx = 1
    out.append(ev("content_block_start", {"type": "content_block_start", "index": idx,
                                          "content_block": {"type": "text", "text": ""}}))
    for i in range(max(1, chunks)):
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": idx,
                                              "delta": {"type": "text_delta",
                                                        "text": f"tok{i} "}}))
    out.append(ev("content_block_stop", {"type": "content_block_stop", "index": idx}))
    out.append(ev("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": chunks}}))
    out.append(ev("message_stop", {"type": "message_stop"}))
    return out


async def app(scope, receive, send) -> None:
    """The stub as a bare ASGI app (no framework: it must not be the benchmark's bottleneck)."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    path, method = scope["path"], scope["method"]
    raw = await _read(receive)
    if path == "/_stub/requests":
        await _send_json(send, 200, RECEIVED)
        return
    if path == "/_stub/disconnected":
        await _send_json(send, 200, DISCONNECTED)
        return
    if path == "/_stub/reset":
        RECEIVED.clear()
        DISCONNECTED.clear()
        await _send_json(send, 200, {"ok": True})
        return
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        await _send_json(send, 400, {"error": {"message": "bad json", "type": "invalid"}})
        return
    if len(RECEIVED) < RECEIVED_CAP:
        RECEIVED.append({"path": path, "query": scope.get("query_string", b"").decode(),
                         "body": body, "headers": headers})
    if "x-stub-sleep" in headers:
        sleep = asyncio.ensure_future(asyncio.sleep(float(headers["x-stub-sleep"])))
        gone = asyncio.ensure_future(receive())  # after the body, only a disconnect arrives
        await asyncio.wait({sleep, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone.done() and not sleep.done():
            sleep.cancel()
            messages = body.get("messages") if isinstance(body, dict) else None
            DISCONNECTED.append(str(messages[0].get("content")) if messages else path)
            return
        gone.cancel()
    if "x-stub-status" in headers:
        status = int(headers["x-stub-status"])
        await _send_json(send, status, {"error": {"message": f"stub error {status}",
                                                  "type": "stub_error", "code": status}},
                         headers=[(b"retry-after", b"7")] if status == 429 else None)
        return
    if method == "GET" and path == "/v1/models":
        await _send_json(send, 200, {"object": "list", "data": [
            {"id": "stub-model", "object": "model", "owned_by": "stub"}]})
        return
    model = str(body.get("model", "stub-model"))
    if path == "/v1/chat/completions" or path == "/v1/messages" or path == "/v1/completions":
        if body.get("stream"):
            chunks = int(headers.get("x-stub-chunks", "8"))
            delay = float(headers.get("x-stub-chunk-delay", "0"))
            if path == "/v1/messages":
                events = _messages_stream(model, chunks)
            elif path == "/v1/completions":
                events = [b"data: " + orjson.dumps({"id": "cmpl-stub", "object":
                          "text_completion", "choices": [{"index": 0, "text": f"tok{i} ",
                                                          "finish_reason": None}]}) + b"\n\n"
                          for i in range(chunks)] + [b"data: [DONE]\n\n"]
            else:
                events = _chat_stream(model, chunks)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-upstream-server", b"stub")]})
            split = float(headers.get("x-stub-split", "0")) / 1000
            for event in events:
                if split:
                    half = len(event) // 2
                    await send({"type": "http.response.body", "body": event[:half],
                                "more_body": True})
                    await asyncio.sleep(split)
                    event = event[half:]
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if delay:
                    await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/v1/messages":
            await _send_json(send, 200, _messages(model))
        elif path == "/v1/completions":
            await _send_json(send, 200, {"id": "cmpl-stub", "object": "text_completion",
                                         "model": model, "choices": [
                                             {"index": 0, "text": ANSWER,
                                              "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 3, "completion_tokens": 5}})
        else:
            await _send_json(send, 200, _chat(model, body))
        return
    await _send_json(send, 404, {"error": {"message": f"no route {path}", "type": "not_found"}})


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free right now, never one this process handed out before (two
    servers started in a row must not both get the port the kernel just freed)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


class ThreadedServer:
    """Run an ASGI app with uvicorn in a background thread of this process (tests).

    The listening socket is bound here, before the thread starts, and handed to uvicorn: the
    port cannot be taken by someone else between picking it and serving on it."""

    START_TIMEOUT_S = 60.0

    def __init__(self, asgi_app, port: int | None = None, **uvicorn_options):
        import uvicorn

        self.app = asgi_app
        self.sock = _listening_socket(port or 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            asgi_app, host="127.0.0.1", port=self.port, log_level="warning", loop="asyncio",
            http="h11", lifespan="on", **uvicorn_options))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn's exit on a failed start-up (logged)
            self.server.run(sockets=[self.sock])

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + self.START_TIMEOUT_S
        try:
            while not self.server.started:
                if not self.thread.is_alive():
                    raise RuntimeError(f"test server on port {self.port} exited during start-up"
                                       " (its error is in the log above)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"test server on port {self.port} did not start in "
                                       f"{self.START_TIMEOUT_S:.0f} s")
                time.sleep(0.01)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        if self.thread.is_alive():  # connections that will not finish: stop waiting on them
            self.server.force_exit = True
            self.thread.join(timeout=10)
        self.sock.close()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", backlog=4096)


if __name__ == "__main__":
    main()
