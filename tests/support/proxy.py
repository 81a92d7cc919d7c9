"""A loopback TCP proxy that a test can cut and heal: the network between a service and its
database, or between two services, misbehaving the way real networks do.

`cut()` is a failover without reset: nothing errors and nothing arrives. Bytes already in
flight in either direction are swallowed; connections opened during the cut are accepted and
never answered. `heal()` lets new connections through again, but the connections that lived
through the cut stay dead for good (the peer they talked to is gone), so a client recovers only
if it notices a dead connection by itself (a timeout, TCP keepalive, gRPC keepalive) and dials
again. `reset()` is the other kind of fault: every open connection is closed at once (the
client sees a reset), new ones go through.

The proxy runs its own event loop in a thread, like the receivers in `tests.support.receivers`,
so it keeps forwarding while a test blocks (waiting on a process) and works from sync and async
tests alike. Every socket it opens is closed by `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0


class _Link:
    """One client connection and its upstream; `dead` once it lived through a cut."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.dead = False

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def close(self) -> None:
        self.client.close()
        self.close_upstream()


class TcpProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or HOST, int(port))
        self.port = 0
        self.cut_now = False
        self.connections = 0  # accepted, over the proxy's life
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(START_TIMEOUT)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Go silent: every open connection dies without a sound, new ones hang."""
        self._call(self._cut)

    def _cut(self) -> None:
        self.cut_now = True
        for link in self._links:
            link.dead = True

    def heal(self) -> None:
        """New connections go through again; the ones that lived through the cut stay dead to
        their clients. Their upstream ends are closed, as a failed-over server's sessions end:
        a database backend left open would hold its locks against the new connections."""
        self._call(self._heal)

    def _heal(self) -> None:
        self.cut_now = False
        for link in self._links:
            if link.dead:
                link.close_upstream()

    def reset(self) -> None:
        """Close every open connection at once; new ones go through."""
        self._call(self._reset)

    def _reset(self) -> None:
        self.cut_now = False
        for link in list(self._links):
            link.close()

    def _call(self, fn) -> None:
        # Run on the proxy's loop and wait, so the change holds when the call returns.
        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(START_TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.cut_now:
                link.dead = True  # accepted, never answered; the client gives up or we close
                await self._swallow(reader)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                return
            link.upstream = up_writer
            await asyncio.gather(
                self._pump(link, reader, up_writer, from_client=True),
                self._pump(link, up_reader, writer, from_client=False),
                return_exceptions=True,
            )
        finally:
            self._links.discard(link)
            link.close()

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    @staticmethod
    async def _pump(
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        from_client: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not link.dead:
                    writer.write(data)
                    await writer.drain()
        # One side ended: end the other. Except when the upstream of a dead link ended: its
        # client hears nothing, as after a cut, while the other pump swallows what it sends
        # until it gives up by itself.
        if from_client or not link.dead:
            link.close()

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for link in list(self._links):
                link.close()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(START_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(START_TIMEOUT)


@contextlib.contextmanager
def tcp_proxy(upstream: str) -> Iterator[TcpProxy]:
    """A started `TcpProxy` to `upstream` ("host:port"), closed on exit."""
    proxy = TcpProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.close()


def database_addr(url: str) -> str:
    """host:port of the server in a database URL (PostgreSQL's port when it has none)."""
    netloc = url.rsplit("@", 1)[-1].split("://", 1)[-1].split("/", 1)[0]
    return netloc if ":" in netloc else f"{netloc}:5432"


def through(url: str, proxy: TcpProxy) -> str:
    """`url` with its server replaced by the proxy."""
    netloc = url.rsplit("@", 1)[-1].split("://", 1)[-1].split("/", 1)[0]
    head, _, tail = url.rpartition(netloc)
    return f"{head}{proxy.addr}{tail}"
