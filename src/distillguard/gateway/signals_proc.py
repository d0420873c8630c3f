"""Request signals in a child process, so the event loop pays only for the hand-off.

`annotate_request` on a prompt never seen before costs ~0.4-0.55 ms of CPU on the development
machine (rules, template signature, language, classifier), about half of everything the gateway
spends on a request. Run on the event loop, it holds every other request in flight for that
long; run here, on the other core, it costs the loop ~0.05 ms (one orjson encode/decode and two
socket syscalls) and the loop serves other requests while it runs.

One child, one socket pair, requests answered in order (FIFO): frames are a 4-byte big-endian
length and an orjson body, the framing of `multiprocessing.Connection`. Both sides batch: the
gateway writes the frames of one event-loop tick with one `write`, and the child answers
everything one `recv` brought with one `sendall`, so a burst of requests costs two syscalls and
one wake-up of each process instead of that per request. If the child dies, requests in flight
and later ones fall back to the in-process function (same results, slower) until
`ensure_running` has started a new child.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import multiprocessing as mp
import os
import socket
import struct
from typing import Any

import orjson

log = logging.getLogger("distillguard.gateway")

HEADER = struct.Struct("!i")
#: The child moves what survived into the collector's permanent generation this often (answers).
FREEZE_EVERY = 1000
#: How long frames that no decision waits for may wait for others before they are written.
LAZY_FLUSH_S = 0.01


class SignalsUnavailable(RuntimeError):
    """The signals process is not running (the caller computes the signals itself)."""


def _serve(conn, spec: str, warmup: dict) -> None:
    """Child process: answer annotate requests until the parent closes the pipe.

    SIGTERM/SIGINT sent to the whole process group (a service manager, Ctrl-C) are ignored: the
    gateway still drains its requests after them, and closes the pipe (or dies, which closes it
    too) when this process should go."""
    import contextlib
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from distillguard.gateway.decide import load_annotate

    annotate = load_annotate(spec)
    annotate(warmup)  # load rule packs and the classifier before saying ready
    prewarm = batch_prewarm(annotate)
    # What lives here is long-lived: rule packs, the classifier and the annotator's per-text
    # cache, which grows with every new prompt. Unfrozen, the collector's full passes walked
    # all of it (~90 ms each, measured with gc.callbacks under load), holding every decision
    # in flight; frozen after start and after every FREEZE_EVERY answers, a full pass only
    # sees what survived since. (Young cycles are still collected by the younger passes.)
    gc.collect()
    gc.freeze()
    answered = 0
    conn.send_bytes(b"ready")
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    dumps, loads, pack = orjson.dumps, orjson.loads, HEADER.pack
    opts = orjson.OPT_SERIALIZE_NUMPY
    buf = bytearray()
    with contextlib.suppress(OSError, KeyboardInterrupt), sock:
        while data := sock.recv(1 << 20):
            buf += data
            replies = []
            requests = []
            for body in _frames(buf):
                try:
                    requests.append(loads(body))
                except Exception as exc:
                    requests.append(exc)
            if prewarm is not None and len(requests) > 1:
                prewarm(requests)
            for request in requests:
                try:
                    if isinstance(request, Exception):
                        raise request
                    out = dumps({"ok": annotate(request)}, option=opts)
                except Exception as exc:  # the parent recomputes in-process and sees the error
                    out = dumps({"error": repr(exc)})
                replies.append(pack(len(out)))
                replies.append(out)
            if replies:
                sock.sendall(b"".join(replies))
                answered += len(replies) // 2
                if answered >= FREEZE_EVERY:
                    answered = 0
                    gc.freeze()


def batch_prewarm(annotate) -> Any:
    """For the built-in `annotate_request`: a function that analyses the prompts of several
    requests in one call of the annotator (whose per-text cache `annotate_request` then hits),
    else None.

    `SignalAnnotator.analyse` has a fixed cost per call (the classifier scores a batch at once):
    on the development machine a new GSM8K prompt cost 540 us of CPU alone and 393 us in a
    batch of 5, the size the signals process typically receives at 500 req/s. Per-text results
    do not depend on the batch (the batch engine relies on it; `tests/test_gateway_units.py`
    checks answers with and without the prewarm are identical). The answers still come from
    `annotate_request` itself, so if it ever analysed something else, the prewarm would only
    cost time, never change an answer."""
    from distillguard import signals

    if annotate is not getattr(signals, "annotate_request", None):
        return None
    from distillguard.signals.annotate import default_annotator, user_text

    annotator = default_annotator()

    def prewarm(requests: list) -> None:
        try:
            texts = [user_text(r.get("messages")) for r in requests if isinstance(r, dict)]
            annotator.analyse(texts)
        except Exception:  # annotate_request reports it for its own request
            pass

    return prewarm


def _frames(buf: bytearray) -> list[bytes]:
    """Remove the complete frames at the start of `buf` and return their bodies."""
    bodies, start = [], 0
    while len(buf) - start >= 4:
        (n,) = HEADER.unpack_from(buf, start)
        if len(buf) - start - 4 < n:
            break
        bodies.append(bytes(buf[start + 4:start + 4 + n]))
        start += 4 + n
    del buf[:start]
    return bodies


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: SignalsProcess):
        self.owner = owner
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pending = self.owner.pending
        for body in _frames(self.buf):
            fut = pending.popleft()
            if fut.done():
                continue
            reply = orjson.loads(body)
            if "ok" in reply:
                fut.set_result(reply["ok"])
            else:
                fut.set_exception(SignalsUnavailable(
                    f"signals process failed: {reply.get('error')}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(exc)


class SignalsProcess:
    """Owns the signals child process of one gateway."""

    def __init__(self, spec: str, warmup: dict):
        self.spec = spec
        self.warmup = warmup
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.outbox: list[bytes] = []  # frames not written yet, written by _flush
        self._flush_now = False  # a call_soon(_flush) is scheduled
        self._flush_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.process = None
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self.transport is not None

    async def start(self, timeout_s: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)  # a socketpair on Linux
        self.process = ctx.Process(target=_serve, args=(child, self.spec, self.warmup),
                                   name="distillguard-signals", daemon=True)
        await asyncio.to_thread(self.process.start)
        child.close()
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(parent.recv_bytes), timeout_s)
        except (TimeoutError, EOFError, OSError) as exc:
            parent.close()
            self.process.kill()
            raise RuntimeError(f"signals process did not start: {exc!r}") from exc
        if ready != b"ready":
            raise RuntimeError(f"signals process said {ready!r}")
        sock = socket.socket(fileno=os.dup(parent.fileno()))
        parent.close()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_unix_connection(lambda: _Protocol(self),
                                                              sock=sock)

    def submit(self, exchange: dict, *, urgent: bool = True) -> asyncio.Future:
        """Queue `exchange` for the child; the future gets the signals dict, or fails with
        SignalsUnavailable (child gone, or the function raised there).

        Urgent frames (a decision waits for them) leave at the end of this event-loop tick;
        the others wait up to LAZY_FLUSH_S for company, so the child and the gateway wake
        once per batch instead of once per request. Frames always leave in order."""
        transport = self.transport
        if transport is None:
            raise SignalsUnavailable("signals process not running")
        body = orjson.dumps(exchange)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append(fut)
        self.outbox.append(HEADER.pack(len(body)))
        self.outbox.append(body)
        if urgent:
            if not self._flush_now:
                self._flush_now = True
                loop.call_soon(self._flush)
        elif self._flush_timer is None and not self._flush_now:
            self._flush_timer = loop.call_later(LAZY_FLUSH_S, self._flush)
        return fut

    async def annotate(self, exchange: dict) -> dict[str, Any]:
        return await self.submit(exchange)

    def _flush(self) -> None:
        self._flush_now = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        frames, self.outbox = self.outbox, []
        if frames and self.transport is not None:
            self.transport.write(b"".join(frames))

    def _lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.transport = None
        if self.process is not None:  # not closing: the child died
            log.error("signals process exited (%r); computing signals in-process until it "
                      "is restarted", exc)
        pending, self.pending = self.pending, collections.deque()
        self.outbox = []  # unsent frames belong to the futures failed below
        for fut in pending:
            if not fut.done():
                fut.set_exception(SignalsUnavailable("signals process exited"))

    async def ensure_running(self) -> None:
        """Restart a dead child (called from the gateway's 1 s refresh loop)."""
        if self.transport is not None or self.process is None:
            return
        self.restarts += 1
        try:
            await self.start()
            log.warning("signals process restarted")
        except Exception:
            log.exception("signals process could not be restarted")

    async def close(self) -> None:
        process, self.process = self.process, None  # _lost: an expected exit
        if self.transport is not None:
            self.transport.close()
            await asyncio.sleep(0)
        if process is not None:
            await asyncio.to_thread(process.join, 5.0)
            if process.is_alive():
                process.kill()
