"""The gateway's upstream HTTP client against hand-written HTTP/1.1 servers: framing (length,
chunked, end of connection), keep-alive reuse, timeouts, retries and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from distillguard.gateway.upstream import UpstreamError, UpstreamPool, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class RawServer:
    """Reads each request head and body, then lets `handler` write whatever bytes it likes;
    the handler returns False to close the connection. Counts connections and requests."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                n += 1
                if not await self.handler(reader, writer, n):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def pool(url: str, timeout_s: float = 5.0) -> UpstreamPool:
    return UpstreamPool(url, timeout_s=timeout_s, connect_timeout_s=2.0)


def test_length_framed_responses_reuse_one_connection():
    async def handler(reader, writer, n):
        writer.write(ok(b'{"n": %d}' % n, b"X-Upstream: Stub\r\n"))
        return True

    async def main():
        server = RawServer(handler)
        async with server as url:
            client = pool(url + "/prefix")
            for i in (1, 2, 3):
                resp = await client.request("POST", "/v1/chat/completions?a=1",
                                            [(b"authorization", b"Bearer k")], b'{"q": 1}')
                assert resp.status == 200 and resp.header(b"x-upstream") == b"Stub"
                assert resp.headers[1] == (b"X-Upstream", b"Stub")  # as sent
                assert await resp.read() == b'{"n": %d}' % i
                resp.release()
            await client.close()
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /prefix/v1/chat/completions?a=1 HTTP/1.1\r\n")
        assert b"\r\nhost: 127.0.0.1:" in first and b"\r\nauthorization: Bearer k\r\n" in first
        assert b"\r\ncontent-length: 8\r\n" in first and first.endswith(b'{"q": 1}')

    asyncio.run(main())


def test_chunked_body_arrives_chunk_by_chunk():
    async def main():
        more = asyncio.Event()

        async def handler(reader, writer, n):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
            await writer.drain()
            await more.wait()
            writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
            return True

        async with RawServer(handler) as url:
            client = pool(url)
            resp = await client.request("POST", "/v1/chat/completions", [], b"{}")
            chunks = []
            async for chunk in resp.iter_chunks():
                chunks.append(chunk)
                more.set()  # the second chunk is sent only after the first was received
            resp.release()
            assert chunks == [b"data: 1", b"data: 2"]
            assert client._idle  # complete: the connection went back to the pool
            await client.close()

    asyncio.run(main())


def test_body_delimited_by_end_of_connection_and_a_truncated_one():
    async def eof_delimited(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        return False

    async def truncated(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nsome of it")
        return False

    async def main():
        async with RawServer(eof_delimited) as url:
            client = pool(url)
            resp = await client.request("POST", "/x", [], b"{}")
            assert await resp.read() == b"all of it"
            resp.release()
            assert not client._idle  # not reusable
        async with RawServer(truncated) as url:
            resp = await pool(url).request("POST", "/x", [], b"{}")
            with pytest.raises(UpstreamError, match="closed the connection"):
                await resp.read()
            resp.release()

    asyncio.run(main())


def test_interim_response_is_skipped():
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"final"))
        return True

    async def main():
        async with RawServer(handler) as url:
            resp = await pool(url).request("POST", "/x", [], b"{}")
            assert resp.status == 200 and resp.header(b"link") is None
            assert await resp.read() == b"final"
            resp.release()

    asyncio.run(main())


def test_timeouts_and_unreachable():
    async def silent(reader, writer, n):
        await asyncio.sleep(10)
        return False

    async def main():
        async with RawServer(silent) as url:
            with pytest.raises(UpstreamTimeout):
                await pool(url, timeout_s=0.2).request("POST", "/x", [], b"{}")
        async with RawServer(silent) as url:
            pass  # closed: nothing listens on that port any more
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool(url).request("POST", "/x", [], b"{}")

    asyncio.run(main())


def test_a_connection_closed_by_the_server_is_not_reused():
    async def once(reader, writer, n):
        writer.write(ok(b"hi"))  # keep-alive by HTTP/1.1 default, then closes anyway
        return False

    async def main():
        server = RawServer(once)
        async with server as url:
            client = pool(url)
            for _ in range(2):
                resp = await client.request("POST", "/x", [], b"{}")
                assert await resp.read() == b"hi"
                resp.release()
                await asyncio.sleep(0.05)  # the FIN arrives
            assert server.connections == 2

    asyncio.run(main())


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
def test_stale_connection_retried_only_for_idempotent_requests(method, retried):
    async def first_only(reader, writer, n):
        if n == 1:
            writer.write(ok(b"first"))
            return True
        return False  # the second request on a connection: closed unanswered

    async def main():
        server = RawServer(first_only)
        async with server as url:
            client = pool(url)
            resp = await client.request(method, "/v1/models", [], b"")
            assert await resp.read() == b"first"
            resp.release()
            if retried:
                resp = await client.request(method, "/v1/models", [], b"")
                assert await resp.read() == b"first"  # from a fresh connection
                assert server.connections == 2
            else:
                with pytest.raises(UpstreamError):
                    await client.request(method, "/v1/models", [], b"")
                assert server.connections == 1

    asyncio.run(main())


def test_cancelling_a_call_closes_its_connection():
    async def main():
        closed = asyncio.Event()

        async def never_answers(reader, writer, n):
            if await reader.read(1) == b"":  # end of stream: the client closed it
                closed.set()
            return False

        async with RawServer(never_answers) as url:
            call = asyncio.ensure_future(pool(url).request("POST", "/x", [], b"{}"))
            await asyncio.sleep(0.1)
            call.cancel()
            await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(main())
