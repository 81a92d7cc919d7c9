"""The stream consumer: applies another service's events exactly once, from its own database.

Billing, quota and notification read `WatchEvents` streams (quota's, billing's) through one
`StreamConsumer` per stream (built by `shared.streams.subscriptions.Subscriptions`). The
consumer keeps its cursor in its own database and moves it in the same transaction as the
event's effect, so a crash at any instant keeps both or neither: nothing is lost and nothing is
applied twice (docs/faults.md, "Streams"). A lease row in the same database lets one replica
consume a stream at a time (`shared.streams.lease`).

Failures never skip an event: a stream error or a failing effect closes the stream and the
consumer starts again from its stored cursor after an exponential, jittered, bounded pause.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import Table

from shared import tracing
from shared.db import Database, UnitOfWork
from shared.streams.backoff import Backoff
from shared.streams.lease import DEFAULT_LEASE_TTL, LeaseLost, StreamLease, default_holder

log = logging.getLogger("allot.consumer")

DEFAULT_MAX_BATCH = 100


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


class StreamEnded(Exception):
    """The producer closed the stream; the consumer reconnects like after any other error."""


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
        self.open_stream = open_stream
        self.apply = apply
        self.holder = holder or default_holder()
        self.lease_ttl = lease_ttl
        self.lease = StreamLease(stream, db, cursors, leases, self.holder, lease_ttl, wall_clock)
        self.max_batch = max_batch
        self.backoff = Backoff(backoff_initial, backoff_max)

        # Observable state.
        self.applied = 0  # events applied (committed) by this instance
        self.skipped = 0  # replayed events skipped because the cursor was past them
        self.batches = 0  # committed applying transactions
        self.last_sequence = 0  # the stored cursor as this instance last read or wrote it
        # Wall-clock age of the last applied event while more wait in the queue; 0 once the
        # queue is empty (caught up). Unknown, and left as it was, while disconnected.
        self.lag_seconds = 0.0
        self._wall_clock = wall_clock
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
        return await self.lease.stored_cursor()

    # --- the lease -----------------------------------------------------------------------

    def _standby_interval(self) -> float:
        # A waiting replica looks a few times per ttl, jittered so replicas do not align.
        return random.uniform(0.5, 1.0) * self.lease_ttl / 3

    async def _acquire(self) -> bool:
        won = await self.lease.acquire()
        if won and not self.holding:
            log.info("%s: lease taken by %s", self.stream, self.holder)
        return won

    def abandon(self) -> None:
        """Leave the lease to expire instead of giving it up when `run()` ends: at a shutdown
        that finds the database locked by another writer, giving it up would wait out busy
        timeouts again and again."""
        self._abandoned = True

    async def _release(self) -> None:
        if self._abandoned:
            return
        try:
            await self.lease.release()
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
                    await self.lease.renew()  # idle: keep the lease
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
                self.lag_seconds = self._lag(batch[-1], queue)
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
        async def work(uow: UnitOfWork) -> tuple[int, int, int]:
            await self.lease.extend(uow)
            cursor = await self.lease.cursor_in(uow)
            fresh, skipped = fresh_events(batch, cursor or 0)
            for event in fresh:
                try:
                    # A child of the span that wrote the event, when traced (shared/tracing.py).
                    with tracing.consuming(self.stream, event):
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
                await self.lease.move_cursor(uow, cursor, last)
            return len(fresh), skipped, last

        # Counters move only after the commit: the work may run more than once.
        applied, skipped, last = await self.db.transaction(work)
        self.applied += applied
        self.skipped += skipped
        self.batches += 1
        self._set_cursor(last)

    def _lag(self, last: E, queue: asyncio.Queue[Any]) -> float:
        created = getattr(last, "create_time", None)
        if queue.empty() or created is None:
            return 0.0
        return max(0.0, self._wall_clock() - (created.seconds + created.nanos / 1e9))

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
