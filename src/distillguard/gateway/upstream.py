"""A lean HTTP/1.1 client for the upstream leg: a keep-alive pool of asyncio protocols whose
responses are parsed by httptools (llhttp, the parser uvicorn uses).

Why not aiohttp: against `tests/upstream_stub.py` on the 2-core development machine an aiohttp
request cost 230-450 us of CPU, a request through this client 60-85 us (one process, sequential
and 20 in flight); on a gateway that has ~1 ms per request in all, that difference is most of
the upstream leg. The gateway needs little of a general client: one base URL, a bytes body,
the response's status and raw headers, its body whole or chunk by chunk (chunked transfer
decoded, content encoding left as sent), a total and a connect timeout, and closing the
connection to cancel a call (how OpenAI-compatible servers learn to stop generating).

Not supported (not needed by a reverse proxy to one model server): redirects, cookies,
proxies from the environment, HTTP/2, pipelining. A POST is never retried; an idempotent
request (GET) is retried once on a fresh connection when a reused one was closed by the server
before it answered (RFC 9112, 9.3.1), as aiohttp does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

IDEMPOTENT = frozenset({"GET", "OPTIONS"})
#: Pause reading from the upstream when this much of a streamed body waits for the client.
HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the connection or the HTTP framing."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the connect or the total timeout."""


class UpstreamResponse:
    """One upstream response: status and raw headers once the head arrived, then the body."""

    __slots__ = ("_buffered", "_chunks", "_complete", "_conn", "_eof_body", "_error", "_head",
                 "_started", "_waiter", "headers", "status")

    def __init__(self, conn: _Connection):
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._head = False
        self._eof_body = False  # neither content-length nor chunked: the body ends at EOF
        self._started = False  # any byte of the response received

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    # ---- consumer side ---------------------------------------------------------------------
    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self) -> bytes:
        """The whole body (transfer encoding removed, content encoding kept)."""
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: everything received since the last chunk, unbuffered."""
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if the response was
        read completely, else it is closed (which cancels the call upstream)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response_released(self)

    def close(self) -> None:
        """Close the connection whatever state the response is in (cancel the call)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    # ---- producer side (the connection) ------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self._complete and self._error is None:
            self._error = exc
            self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the upstream; one request at a time."""

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.paused = False
        self.keep_alive = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes while idle: the server is confused; do not reuse this one
            self.abort()
            return
        resp._started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp._fail(UpstreamError(f"invalid HTTP response from upstream: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        resp = self.response
        if resp is None or resp._complete:
            return
        if resp._head and resp._eof_body:
            resp._complete = True  # an EOF-delimited body ends here
            resp._wake()
        else:
            resp._fail(UpstreamError(f"upstream closed the connection: {exc!r}"))

    # ---- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.response.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.response
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim response (100 Continue, 103 Early Hints): wait for the real one
        resp.status = status
        resp._head = True
        resp._eof_body = (resp.header(b"content-length") is None
                          and resp.header(b"transfer-encoding") is None)
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.response
        resp._chunks.append(body)
        resp._buffered += len(body)
        if resp._buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        resp._wake()

    def on_message_complete(self) -> None:
        resp = self.response
        if not resp._head:
            return  # end of an interim response
        self.keep_alive = self.parser.should_keep_alive()
        self._cancel_timer()
        resp._complete = True
        resp._wake()

    # ---- used by the pool and the response -------------------------------------------------
    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def timed_out(self) -> None:
        self.timer = None
        if self.response is not None:
            self.response._fail(UpstreamTimeout("upstream did not answer in time"))
        self.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abort(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def response_released(self, resp: UpstreamResponse) -> None:
        if resp is not self.response:
            return
        self.response = None
        if resp._complete and resp._error is None and self.keep_alive and not self.closed \
                and not self.paused:
            self.pool._put_idle(self)
        else:
            self.abort()


class UpstreamPool:
    """Keep-alive connections to one upstream base URL (`http://host:port[/prefix]` or https)."""

    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float,
                 keepalive_s: float = 60.0, max_idle: int = 512):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = self.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"") -> UpstreamResponse:
        """Send `method target` (path and query, appended to the base URL's path) and return
        the response once its head arrived. Cancelling the caller closes the connection.

        `headers` are sent as given (they come from a parsed client request, so they hold no
        line breaks) plus Host and, with a body or on POST, Content-Length."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        head = b"".join((method.encode(), b" ", (self.prefix + target).encode("latin-1"),
                         b" HTTP/1.1\r\nhost: ", self.host_header, b"\r\n",
                         *[b"%s: %s\r\n" % kv for kv in headers],
                         b"content-length: %d\r\n\r\n" % len(body)
                         if body or method == "POST" else b"\r\n"))
        retry = method in IDEMPOTENT
        while True:
            conn, reused = await self._acquire(loop, deadline)
            resp = UpstreamResponse(conn)
            conn.response = resp
            if conn.closed:  # lost between connecting and now
                resp._fail(UpstreamError("upstream closed the connection"))
            else:
                conn.timer = loop.call_at(deadline, conn.timed_out)
                conn.transport.write(head + body if body else head)
            try:
                while not resp._head:
                    if resp._error is not None:
                        raise resp._error
                    await resp._wait()
            except UpstreamError as exc:
                resp.close()
                if retry and reused and not resp._started and not isinstance(
                        exc, UpstreamTimeout):
                    retry = False
                    continue
                raise
            except BaseException:  # cancelled: closing the connection cancels the call
                resp.close()
                raise
            return resp

    async def _acquire(self, loop: asyncio.AbstractEventLoop,
                       deadline: float) -> tuple[_Connection, bool]:
        if self._closed:
            raise UpstreamError("upstream client is closed")
        now = loop.time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn, True
            conn.abort()
        timeout = max(0.0, min(self.connect_timeout_s, deadline - now))
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port,
                                       ssl=self.ssl), timeout)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return conn, False

    def _put_idle(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def prune(self) -> None:
        """Close connections idle for longer than the keep-alive time, and forget closed ones
        (called from the gateway's periodic loop)."""
        now = asyncio.get_running_loop().time()
        keep = []
        for conn in self._idle:
            if conn.closed or now - conn.idle_since >= self.keepalive_s:
                conn.abort()
            else:
                keep.append(conn)
        self._idle = keep

    async def close(self) -> None:
        """Close the idle connections and refuse new requests (responses still being read
        close theirs when released)."""
        self._closed = True
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
