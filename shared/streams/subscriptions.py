"""The streams one service follows: another service's `WatchEvents`, over gRPC, each through a
`StreamConsumer` into this service's own database (docs/faults.md, "Streams").

A service builds one `Subscriptions` (`Subscriptions.of(runtime, caller, tables)`), names each
stream it follows with `subscribe(...)` and runs them with the service: `start()` from its
`start`, `quiesce()` from its `quiesce` (shutdown begins: each consumer finishes the
transaction in flight and gives its lease up), `await stop()` from its `stop` (bounded: see
`stop`). Every connection takes a fresh stub on the runtime's channel to the address
(channels follow certificate rotation) and a freshly minted `internal` token (local runs;
none with mTLS).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from sqlalchemy import Table

from shared.db import Database
from shared.streams.consumer import Apply, StreamConsumer
from shared.streams.lease import DEFAULT_LEASE_TTL
from shared.tokens import TokenSigner, internal_metadata

log = logging.getLogger("allot.consumer")

Metadata = Callable[[], Sequence[tuple[str, str]]] | Sequence[tuple[str, str]]

# How long `stop()` waits for consumers, asked to stop in `quiesce()`, to give up their leases
# (milliseconds on a healthy database), and then for cancelled ones to end. Short: a consumer
# stuck on a busy database must not hold shutdown past its grace.
STOP_SECONDS = 0.5


def grpc_stream(
    watch: Callable[..., Any],
    request_after: Callable[[int], Any],
    metadata: Metadata = (),
) -> Callable[[int], AsyncIterator[Any]]:
    """An `open_stream` over a server-streaming RPC such as `stub.WatchEvents`.

    `request_after(sequence)` builds the request; `metadata` may be a callable so a token is
    minted (or re-read) per connection. Closing the iterator cancels the call.
    """

    async def open_stream(after_sequence: int) -> AsyncIterator[Any]:
        md = metadata() if callable(metadata) else metadata
        call = watch(request_after(after_sequence), metadata=tuple(md))
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    return open_stream


class Subscriptions:
    """The `WatchEvents` streams a service consumes, and their tasks.

    `caller` is the service the tokens name (`quota`, `billing`, `notification`); `tables` its
    cursor and lease tables (`shared.streams.lease.consumer_tables`); `channels` has
    `get(addr)` returning a channel (`shared.tls.Channels`).
    """

    def __init__(
        self,
        db: Database,
        channels: Any,
        signer: TokenSigner | None,
        caller: str,
        tables: tuple[Table, Table],
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        stop_seconds: float = STOP_SECONDS,
    ) -> None:
        self.db = db
        self.channels = channels
        self.caller = caller
        self.tables = tables
        self.lease_ttl = lease_ttl
        self.stop_seconds = stop_seconds
        self._metadata = internal_metadata(signer, caller)
        self.consumers: list[StreamConsumer] = []
        self._tasks: dict[asyncio.Task, StreamConsumer] = {}

    @classmethod
    def of(cls, runtime: Any, caller: str, tables: tuple[Table, Table]) -> Subscriptions:
        """The subscriptions of service `caller` as `runtime` runs it (`shared.server.Runtime`:
        its database, channels, signer and ALLOT_CONSUMER_LEASE_SECONDS)."""
        subscriptions = cls(
            runtime.db,
            runtime.channels,
            runtime.signer,
            caller,
            tables,
            lease_ttl=runtime.settings.consumer_lease_seconds,
        )
        runtime.metrics.track_consumers(subscriptions.consumers)  # shared/metrics.py
        return subscriptions

    def subscribe(
        self,
        stream: str,
        addr: str,
        stub_type: Callable[[Any], Any],
        request_type: Callable[..., Any],
        event_types: Sequence[str],
        apply: Apply,
    ) -> StreamConsumer:
        """Follow the `event_types` of the `WatchEvents` of the service at `addr` (`stub_type`
        is its generated stub, `request_type` its `WatchEventsRequest`), applying each event
        with `apply(uow, event)` in the transaction that moves the cursor named `stream`."""
        channels = self.channels
        types = list(event_types)

        def watch(request, metadata):  # a fresh stub per connection: channels follow rotation
            return stub_type(channels.get(addr)).WatchEvents(request, metadata=metadata)

        cursors, leases = self.tables
        consumer: StreamConsumer = StreamConsumer(
            stream,
            self.db,
            cursors,
            leases,
            grpc_stream(
                watch,
                lambda after: request_type(after_sequence=after, event_types=types),
                self._metadata,
            ),
            apply,
            lease_ttl=self.lease_ttl,
        )
        self.consumers.append(consumer)
        return consumer

    def start(self) -> None:
        """Run every consumer subscribed so far in the background. Never awaited: while a
        producer is away its consumer retries with backoff and the service serves on."""
        for consumer in self.consumers:
            if consumer not in self._tasks.values():
                task = asyncio.create_task(consumer.run(), name=f"consume {consumer.stream}")
                self._tasks[task] = consumer

    def quiesce(self) -> None:
        """Shutdown begins: ask every consumer to stop (it finishes the transaction in flight
        and gives its lease up)."""
        for consumer in self.consumers:
            consumer.stop()

    async def stop(self) -> None:
        """Stop every consumer within about twice `stop_seconds`. They were asked to stop in
        `quiesce()` and normally have returned, giving up their leases. One that has not is
        stuck on a database too busy to answer (a write lock held elsewhere; every attempt
        waits out SQLite's busy timeout), and giving up its lease would wait on that database
        again: its lease is abandoned (it expires by itself) and it is cancelled, so shutdown
        stays within its grace."""
        self.quiesce()
        tasks, self._tasks = self._tasks, {}
        if not tasks:
            return
        done, stuck = await asyncio.wait(tasks, timeout=self.stop_seconds)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s ended with %r", task.get_name(), task.exception())
        for task in stuck:
            log.warning("%s is stuck on the database; abandoning its lease", task.get_name())
            tasks[task].abandon()
            task.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=self.stop_seconds)
