"""The stream consumer: applies another service's events exactly once, from its own database.

Billing and notification read `WatchEvents` streams (quota's, billing's) through one
`StreamConsumer` per stream. The consumer keeps its cursor in its own database and moves it in
the same transaction as the event's effect, so a crash at any instant keeps both or neither:
nothing is lost and nothing is applied twice (docs/faults.md, "Streams"). A lease row in the same
database lets one replica consume a stream at a time (docs/design/scale.md). Every applying
transaction first re-checks and extends the lease with a conditional UPDATE, which also locks the
lease row until commit; so a replica that lost its lease (paused past the ttl while another took
over) applies nothing, and two replicas never apply concurrently even on a lease that is about to
expire.

Failures never skip an event: a stream error or a failing effect closes the stream and the
consumer starts again from its stored cursor after an exponential, jittered, bounded pause.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, or_, select, update

from shared.db import Database, UnitOfWork

log = logging.getLogger("allot.consumer")

DEFAULT_LEASE_TTL = 15.0
DEFAULT_MAX_BATCH = 100

# Options for the channel a consumer watches through. gRPC's own reconnect backoff grows to
# two minutes by default, which would hold a consumer off a producer that is back long after
# its own backoff (at most 5 s) says to try again.
#
# A connection that died silently (a failover without reset: nothing errors, nothing arrives;
# docs/faults.md, "The network between the services") is found by keepalive: a ping after
# KEEPALIVE_SECONDS without reading anything, and the connection dropped when no ack comes
# within KEEPALIVE_SECONDS more, so it is dialled again about 10 s after it went silent. The
# ack wait is `grpc.http2.ping_timeout_ms`: gRPC (1.85) waits that long (default one minute)
# for any ping, keepalive ones included, so `grpc.keepalive_timeout_ms` alone does not
# shorten it. By default gRPC sends only two pings while no data flows
# (`grpc.http2.max_pings_without_data`), so a stream idle for 10 s would no longer be checked
# and a consumer would wait on it long after it died; 0 lifts that limit. Allot's servers
# accept a ping every 2 s (`grpc.http2.min_ping_interval_without_data_ms` in shared/server.py).
KEEPALIVE_SECONDS = 5
# The same keepalive on both ends of every connection between the services: outbound channels
# (CHANNEL_OPTIONS) and the servers (shared/server.py), which ping their callers this way.
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.http2.max_pings_without_data", 0),
)

# gRPC's own retry (docs/faults.md, "Callers classify codes"): a call answered UNAVAILABLE
# (quota starting, its database away, a connection refused) is tried again twice more within
# its deadline. Every call on these channels may be repeated: billing's commands to quota carry
# request ids, the rest are reads and streams (a stream is only retried before its first
# message). Other codes are left to the callers, which retry later on their own schedule.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],  # every method of every service
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
    *KEEPALIVE_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", RETRY_SERVICE_CONFIG),
)


class StreamEvent(Protocol):
    """What the consumer needs of an event envelope (`QuotaEvent`, `BillingEvent`, ...)."""

    @property
    def sequence(self) -> int: ...

    @property
    def event_id(self) -> str: ...


E = TypeVar("E", bound=StreamEvent)

# Opens the producer's stream of events with a sequence greater than the argument.
OpenStream = Callable[[int], AsyncIterator[E]]
# The effect of one event, run inside the consumer's transaction (`uow.session`).
Apply = Callable[[UnitOfWork, E], Awaitable[None]]


def consumer_tables(metadata: MetaData) -> tuple[Table, Table]:
    """The consumer's cursor and lease tables, added to a service's own metadata."""
    cursors = Table(
        "consumer_cursors",
        metadata,
        # e.g. "quota:ap-southeast-1": one row per stream this service consumes.
        Column("stream", String(128), primary_key=True),
        # The last sequence whose effect is committed.
        Column("sequence", BigInteger, nullable=False),
        Column("update_time_us", BigInteger, nullable=False),
    )
    leases = Table(
        "consumer_leases",
        metadata,
        Column("stream", String(128), primary_key=True),
        Column("holder", String(200), nullable=False),
        # Wall-clock microseconds (time.time()), never a service's manual clock: leases are
        # infrastructure and must expire while a test holds the business clock still.
        Column("expire_us", BigInteger, nullable=False),
    )
    return cursors, leases


def default_holder() -> str:
    """hostname-pid-random: unique per process, readable in the lease table."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LeaseLost(Exception):
    """Another holder has the stream's lease; this replica must stop applying."""


class StreamEnded(Exception):
    """The producer closed the stream; the consumer reconnects like after any other error."""


@dataclass
class Backoff:
    """Exponential backoff with jitter, bounded: each delay lies in [base/2, base], where base
    doubles from `initial` up to `maximum`. Never zero, so a failing loop never spins."""

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and multiplier >= 1")

    def next_delay(self, rng: random.Random | None = None) -> float:
        # Cap the exponent so a long outage cannot overflow the float.
        base = min(self.maximum, self.initial * self.multiplier ** min(self.attempt, 64))
        self.attempt += 1
        return (rng or random).uniform(base / 2, base)

    def reset(self) -> None:
        self.attempt = 0


def fresh_events(events: Iterable[E], cursor: int) -> tuple[list[E], int]:
    """The events to apply after `cursor`, in order, and how many were replays (skipped)."""
    fresh: list[E] = []
    skipped = 0
    last = cursor
    for event in events:
        if event.sequence <= last:
            skipped += 1
            continue
        fresh.append(event)
        last = event.sequence
    return fresh, skipped


class _End:
    """Queued by the stream reader when the stream is over (error None: closed by the producer)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


_STOP = object()


class StreamConsumer(Generic[E]):
    """Consumes one stream into this service's database, exactly once, on one replica at a time.

    `run()` loops until `stop()`: take (or wait for) the lease, read the stored cursor, open the
    stream after it, and apply events in transactions that each re-check the lease, skip
    replays (`sequence <= cursor`), run `apply` and store the new cursor. Events already queued
    when a transaction starts are applied together, up to `max_batch`.

    `apply(uow, event)` does its writes through `uow.session` and never commits; it may run
    more than once for one event (a transaction that lost a race is retried whole, and a
    failed group is retried one event at a time), but only one run ever commits. An effect
    that keeps failing holds the stream at that event (retried with backoff), never skips it.

    A stream name identifies one producer sequence: name it after the producer deployment it
    reads (e.g. the quota endpoint serving a group of regions), not after a region that shares
    its stream with others. `run()` is meant to be called once per instance.

    The attributes below are for health checks, metrics and tests; they are only read.
    """

    def __init__(
        self,
        stream: str,
        db: Database,
        cursors: Table,
        leases: Table,
        open_stream: OpenStream[E],
        apply: Apply[E],
        *,
        holder: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.stream = stream
        self.db = db
        self.cursors = cursors
        self.leases = leases
        self.open_stream = open_stream
        self.apply = apply
        self.holder = holder or default_holder()
        self.lease_ttl = lease_ttl
        self.max_batch = max_batch
        self.backoff = Backoff(backoff_initial, backoff_max)
        self._wall_clock = wall_clock

        # Observable state.
        self.applied = 0  # events applied (committed) by this instance
        self.skipped = 0  # replayed events skipped because the cursor was past them
        self.batches = 0  # committed applying transactions
        self.last_sequence = 0  # the stored cursor as this instance last read or wrote it
        self.connected = False  # a stream is open and being read
        self.holding = False  # this instance holds the lease
        self.connects = 0  # streams opened
        self.errors = 0  # failures that led to a pause (stream, effect or database)
        self.last_error: BaseException | None = None

        self._stopping = asyncio.Event()
        self._abandoned = False
        self._queue: asyncio.Queue[Any] | None = None
        self._progress = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`; then give the lease up so a replica can take over at once."""
        try:
            while not self._stopping.is_set():
                try:
                    if not await self._acquire():
                        self.holding = False
                        await self._pause(self._standby_interval())
                        continue
                    self.holding = True
                    await self._consume()
                except LeaseLost:
                    log.warning("%s: lease taken over by another replica", self.stream)
                    self.holding = False
                except Exception as exc:  # every failure is retried from the stored cursor
                    self.errors += 1
                    self.last_error = exc
                    delay = self.backoff.next_delay()
                    log.warning(
                        "%s: %s; reconnecting in %.2fs",
                        self.stream,
                        _describe(exc),
                        delay,
                        exc_info=not _is_transport_error(exc),
                    )
                    await self._pause(delay)
        finally:
            self.connected = False
            if self.holding:
                await self._release()
            self.holding = False

    def stop(self) -> None:
        """Ask `run()` to return; an applying transaction in flight finishes first."""
        self._stopping.set()
        if self._queue is not None:
            try:
                self._queue.put_nowait(_STOP)
            except asyncio.QueueFull:  # the applier is busy and sees the flag next
                pass

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_for(self, sequence: int, within: float) -> bool:
        """Wait until the stored cursor reaches `sequence`; False after `within` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.last_sequence < sequence:
            left = deadline - loop.time()
            if left <= 0:
                return False
            progress = self._progress
            try:
                async with asyncio.timeout(left):
                    await progress.wait()
            except TimeoutError:
                return self.last_sequence >= sequence
        return True

    async def stored_cursor(self) -> int:
        """The committed cursor of this stream (0 before the first event)."""

        async def work(uow: UnitOfWork) -> int:
            value = (
                await uow.session.execute(
                    select(self.cursors.c.sequence).where(self.cursors.c.stream == self.stream)
                )
            ).scalar_one_or_none()
            return value or 0

        return await self.db.read(work)

    # --- the lease -----------------------------------------------------------------------

    def _now_us(self) -> int:
        return int(self._wall_clock() * 1_000_000)

    def _standby_interval(self) -> float:
        # A waiting replica looks a few times per ttl, jittered so replicas do not align.
        return random.uniform(0.5, 1.0) * self.lease_ttl / 3

    async def _acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; make sure a cursor row exists."""
        leases = self.leases

        async def work(uow: UnitOfWork) -> bool:
            now = self._now_us()
            expire = now + int(self.lease_ttl * 1_000_000)
            # The condition is re-checked after a row lock wait (PostgreSQL READ COMMITTED), so
            # of two replicas racing for an expired lease exactly one wins.
            taken = await uow.session.execute(
                update(leases)
                .where(
                    leases.c.stream == self.stream,
                    or_(leases.c.holder == self.holder, leases.c.expire_us < now),
                )
                .values(holder=self.holder, expire_us=expire)
            )
            if taken.rowcount != 1:
                exists = (
                    await uow.session.execute(
                        select(leases.c.holder).where(leases.c.stream == self.stream)
                    )
                ).first()
                if exists is not None:
                    return False
                # A concurrent first insert makes this fail on the primary key; the retry of
                # the transaction then finds that replica's lease.
                await uow.session.execute(
                    insert(leases).values(stream=self.stream, holder=self.holder, expire_us=expire)
                )
            await self._ensure_cursor(uow, now)
            return True

        won = await self.db.transaction(work)
        if won and not self.holding:
            log.info("%s: lease taken by %s", self.stream, self.holder)
        return won

    async def _ensure_cursor(self, uow: UnitOfWork, now_us: int) -> None:
        found = (
            await uow.session.execute(
                select(self.cursors.c.sequence).where(self.cursors.c.stream == self.stream)
            )
        ).first()
        if found is None:
            await uow.session.execute(
                insert(self.cursors).values(stream=self.stream, sequence=0, update_time_us=now_us)
            )

    async def _extend(self, uow: UnitOfWork) -> None:
        """Inside an applying transaction: prove we still hold the lease and extend it. The
        UPDATE locks the lease row until commit, which fences out a replica taking over."""
        leases = self.leases
        result = await uow.session.execute(
            update(leases)
            .where(leases.c.stream == self.stream, leases.c.holder == self.holder)
            .values(expire_us=self._now_us() + int(self.lease_ttl * 1_000_000))
        )
        if result.rowcount != 1:
            raise LeaseLost(self.stream)

    async def _renew(self) -> None:
        await self.db.transaction(self._extend)

    def abandon(self) -> None:
        """Leave the lease to expire instead of giving it up when `run()` ends: at a shutdown
        that finds the database locked by another writer, giving it up would wait out busy
        timeouts again and again."""
        self._abandoned = True

    async def _release(self) -> None:
        if self._abandoned:
            return
        leases = self.leases

        async def work(uow: UnitOfWork) -> None:
            await uow.session.execute(
                update(leases)
                .where(leases.c.stream == self.stream, leases.c.holder == self.holder)
                .values(expire_us=0)
            )

        try:
            await self.db.transaction(work)
            log.info("%s: lease released by %s", self.stream, self.holder)
        except Exception as exc:  # it expires by itself
            log.warning("%s: could not release the lease: %s", self.stream, exc)

    # --- consuming -----------------------------------------------------------------------

    async def _consume(self) -> None:
        """Read the stream after the stored cursor and apply it while we hold the lease."""
        cursor = await self.stored_cursor()
        self._set_cursor(cursor)
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * self.max_batch)
        stream = self.open_stream(cursor)
        reader = asyncio.create_task(self._read(stream, queue), name=f"consume {self.stream}")
        self._queue = queue
        self.connects += 1
        self.connected = True
        loop = asyncio.get_running_loop()
        renew_every = self.lease_ttl / 3
        renew_at = loop.time() + renew_every
        try:
            while not self._stopping.is_set():
                try:
                    async with asyncio.timeout(max(0.0, renew_at - loop.time())):
                        item = await queue.get()
                except TimeoutError:
                    await self._renew()  # idle: keep the lease
                    renew_at = loop.time() + renew_every
                    continue
                if item is _STOP:
                    return
                if isinstance(item, _End):
                    raise item.error or StreamEnded("the producer closed the stream")
                batch = [item]
                end = None
                while len(batch) < self.max_batch:
                    try:
                        more = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if more is _STOP or isinstance(more, _End):
                        end = more
                        break
                    batch.append(more)
                await self._apply_batch(batch)
                renew_at = loop.time() + renew_every  # the batch extended the lease
                self.backoff.reset()  # progress: the next failure starts short again
                if end is _STOP:
                    return
                if isinstance(end, _End):
                    raise end.error or StreamEnded("the producer closed the stream")
        finally:
            self._queue = None
            self.connected = False
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await _close_stream(stream)

    async def _read(self, stream: AsyncIterator[E], queue: asyncio.Queue[Any]) -> None:
        try:
            async for event in stream:
                await queue.put(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(_End(exc))
            return
        await queue.put(_End(None))

    async def _apply_batch(self, batch: Sequence[E]) -> None:
        try:
            await self._apply_together(batch)
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception:
            if len(batch) == 1:
                raise
            # One event's effect failed: apply one at a time so the events before it commit
            # and the failure names the event that causes it.
            log.warning("%s: a batch of %d failed; applying singly", self.stream, len(batch))
            for event in batch:
                await self._apply_together([event])

    async def _apply_together(self, batch: Sequence[E]) -> None:
        cursors = self.cursors

        async def work(uow: UnitOfWork) -> tuple[int, int, int]:
            await self._extend(uow)
            cursor = (
                await uow.session.execute(
                    select(cursors.c.sequence).where(cursors.c.stream == self.stream)
                )
            ).scalar_one_or_none()
            fresh, skipped = fresh_events(batch, cursor or 0)
            for event in fresh:
                try:
                    await self.apply(uow, event)
                except Exception:
                    log.error(
                        "%s: applying event %s (sequence %d) failed",
                        self.stream,
                        event.event_id,
                        event.sequence,
                    )
                    raise
            last = fresh[-1].sequence if fresh else cursor or 0
            if fresh:
                values = {"sequence": last, "update_time_us": self._now_us()}
                if cursor is None:
                    await uow.session.execute(insert(cursors).values(stream=self.stream, **values))
                else:
                    await uow.session.execute(
                        update(cursors).where(cursors.c.stream == self.stream).values(**values)
                    )
            return len(fresh), skipped, last

        # Counters move only after the commit: the work may run more than once.
        applied, skipped, last = await self.db.transaction(work)
        self.applied += applied
        self.skipped += skipped
        self.batches += 1
        self._set_cursor(last)

    def _set_cursor(self, sequence: int) -> None:
        self.last_sequence = sequence
        self._progress.set()
        self._progress = asyncio.Event()

    async def _pause(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass


async def _close_stream(stream: Any) -> None:
    """Close what `open_stream` returned: an async generator, or a gRPC call (cancel it)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception as exc:
            log.debug("closing the stream: %s", exc)
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()


def _is_transport_error(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    return callable(code) or isinstance(exc, (StreamEnded, ConnectionError, TimeoutError))


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):  # grpc.aio.AioRpcError
        return f"stream failed: {code()} {details()}"
    return f"{type(exc).__name__}: {exc}"


def grpc_stream(
    watch: Callable[..., Any],
    request_after: Callable[[int], Any],
    metadata: Callable[[], Sequence[tuple[str, str]]] | Sequence[tuple[str, str]] = (),
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


def watching(
    stream: str,
    db: Database,
    tables: tuple[Table, Table],
    watch: Callable[..., Any],
    request_type: type,
    event_types: Sequence[str],
    metadata: Callable[[], Sequence[tuple[str, str]]],
    apply: Apply[E],
    lease_ttl: float,
) -> StreamConsumer[E]:
    """A consumer of another service's `WatchEvents` (`watch` is the stub's method) for
    `event_types`, its cursor and lease in `tables` (from `consumer_tables`)."""
    cursors, leases = tables
    return StreamConsumer(
        stream,
        db,
        cursors,
        leases,
        grpc_stream(
            watch,
            lambda after: request_type(after_sequence=after, event_types=list(event_types)),
            metadata,
        ),
        apply,
        lease_ttl=lease_ttl,
    )
