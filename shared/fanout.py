"""The outbox's live fan-out: one reader per outbox and process hands the events committed at
the head to every `WatchEvents` stream waiting there (docs/faults.md, "Streams"; the
hand-over rules are in `shared.outbox`'s docstring).

The reader wakes at once for a commit in this process (which hands it the committed rows, so
it reads nothing for them), and every POLL_SECONDS looks at the last sequence (one indexed
row) for commits of other processes; whatever lies between its position and the head it reads
once, paged. It gives each subscriber the events matching its filter with a sequence past the
subscriber's cursor, in order, into a bounded queue. It runs only while streams subscribe.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

log = logging.getLogger("allot.outbox")

PAGE = 500
# How often the live reader looks for events committed by other processes.
POLL_SECONDS = 0.5
# Events queued for one stream at the head before it is left to read on its own (its caller
# does not keep up).
SUBSCRIBER_QUEUE = 1000


class LiveFanOut:
    """The live reader of one outbox in this process and the streams at the head it serves.

    `read_after(sequence)` reads the last committed sequence and the next page of events after
    `sequence` (unfiltered, with their type, account and region); `last_sequence()` reads only
    the former. `subscribers` and `reader` are read by tests."""

    def __init__(
        self,
        read_after: Callable[[int], Awaitable[tuple[int, list]]],
        last_sequence: Callable[[], Awaitable[int]],
        queue_limit: int = SUBSCRIBER_QUEUE,
    ) -> None:
        self._read_after = read_after
        self._last_sequence = last_sequence
        self.queue_limit = queue_limit
        # The highest last sequence anyone here has seen committed. Invariant: it never grows
        # without `_wakeup` being set, so the reader never sleeps past a known commit.
        self._head = 0
        self._wakeup = asyncio.Event()
        # `_live` is how far the reader has read: every event up to it went to the subscribers
        # of the time.
        self.subscribers: set[Subscriber] = set()
        self.reader: asyncio.Task | None = None
        self._live = 0
        # Events committed here and not yet handed out, by sequence (the reader's shortcut).
        self._local: dict[int, Row] = {}
        self.closed = False

    def close(self) -> None:
        """End every live stream (shutdown): consumers reconnect to another replica."""
        self.closed = True
        for subscriber in self.subscribers:
            subscriber.ready.set()
        self._wakeup.set()
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None

    def committed(self, rows: list[dict]) -> None:
        """A transaction here committed `rows`: while the reader runs, it gets them as they are
        rather than reading them back (it still reads whatever lies between)."""
        if not rows:
            return
        if self.reader is not None:
            for row in rows:
                if row["sequence"] <= self._live:
                    continue  # the reader read it already
                self._local[row["sequence"]] = Row(
                    row["sequence"],
                    row["envelope"],
                    row["event_type"],
                    row["account_id"],
                    row["region"],
                )
        self._wake(rows[-1]["sequence"])

    def _wake(self, head: int = 0) -> None:
        """`head` is committed (a commit here, or the reader's poll saw it): the reader reads."""
        self._head = max(self._head, head)
        self._wakeup.set()

    def advance(self, head: int) -> None:
        """`head` is committed: wake the reader if nobody here knew it yet."""
        if head > self._head:
            self._wake(head)

    def subscribe(
        self,
        cursor: int,
        types: list[str],
        account_id: str | None,
        regions: list[str] | None,
    ) -> Subscriber | None:
        """Subscribe a stream that has every event up to `cursor`; None when the reader has
        already handed out events past it (the stream reads those itself, then tries again).
        Synchronous: nothing runs between the check and the subscription."""
        if self.reader is None:
            # Nobody is served: the new reader starts where this stream is.
            self._live = cursor
            self.reader = asyncio.get_running_loop().create_task(self._read_live())
        elif self._live > cursor:
            return None
        subscriber = Subscriber(
            cursor,
            frozenset(types),
            account_id,
            None if regions is None else frozenset(regions),
        )
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        if not self.subscribers:
            self._wakeup.set()  # the reader ends now rather than at its next poll

    async def _read_live(self) -> None:
        """The one live reader of this outbox in this process, while streams subscribe: woken by
        a commit here, it reads the new events once and hands each subscriber those it asked
        for; every POLL_SECONDS it looks at the last sequence (one indexed row) for commits of
        other processes."""
        try:
            while self.subscribers and not self.closed:
                if self._head <= self._live:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)
                        continue
                    except TimeoutError:
                        pass
                    if not self.subscribers or self.closed:
                        break
                    try:
                        self.advance(await self._last_sequence())
                    except Exception as exc:  # nothing is known to be missing: keep looking
                        log.warning("outbox reader cannot read the last sequence: %s", exc)
                    continue
                local = self._take_local()
                if local:
                    self._hand_out(local[-1].sequence, local)
                    continue
                try:
                    head, rows = await self._read_after(self._live)
                except Exception as exc:
                    # The streams end with the error (the database is away: UNAVAILABLE), as
                    # their own reads would; consumers reconnect and resume from their cursor.
                    log.warning("outbox reader cannot read new events: %s", exc)
                    self._fail(exc)
                    break
                live = rows[-1].sequence if rows else self._live
                if len(rows) < PAGE:
                    live = max(live, head)  # the page saw everything up to `head`
                self.advance(head)
                self._hand_out(live, rows)
                for sequence in [s for s in self._local if s <= live]:
                    del self._local[sequence]
        finally:
            if self.reader is asyncio.current_task():
                self.reader = None  # no await since the last check: a new stream starts one
                self._local.clear()

    def _take_local(self) -> list[Row]:
        """The events committed here that directly follow the reader's position."""
        rows: list[Row] = []
        while (row := self._local.pop(self._live + 1 + len(rows), None)) is not None:
            rows.append(row)
        return rows

    def _hand_out(self, live: int, rows) -> None:
        """Hand each subscriber its events of `rows`; every event up to `live` is in them."""
        for subscriber in list(self.subscribers):
            matching = [
                (row.sequence, row.envelope)
                for row in rows
                if row.sequence > subscriber.cursor and subscriber.wants(row)
            ]
            if len(subscriber.events) + len(matching) > self.queue_limit:
                # A slow caller: it reads on its own from its cursor once its queue is drained.
                subscriber.overflowed = True
                self.subscribers.discard(subscriber)
            else:
                subscriber.events.extend(matching)
                subscriber.cursor = max(subscriber.cursor, live)
            if matching or subscriber.overflowed:
                subscriber.ready.set()
        self._live = live

    def _fail(self, exc: Exception) -> None:
        for subscriber in self.subscribers:
            subscriber.error = exc
            subscriber.ready.set()
        self.subscribers.clear()


class Row(NamedTuple):
    """An event as the reader hands it out (a row of `read_after` or committed here)."""

    sequence: int
    envelope: bytes
    event_type: str
    account_id: str
    region: str


class Subscriber:
    """A stream at the head: its filter (the same as `Outbox`'s queries), its cursor (every event
    it asked for up to there is queued or yielded) and its bounded queue."""

    __slots__ = (
        "cursor",
        "types",
        "account_id",
        "regions",
        "events",
        "ready",
        "overflowed",
        "error",
    )

    def __init__(
        self,
        cursor: int,
        types: frozenset[str],
        account_id: str | None,
        regions: frozenset[str] | None,
    ) -> None:
        self.cursor = cursor
        self.types = types
        self.account_id = account_id
        self.regions = regions
        self.events: deque[tuple[int, bytes]] = deque()
        self.ready = asyncio.Event()
        self.overflowed = False
        self.error: Exception | None = None

    def wants(self, row) -> bool:
        return (
            (not self.types or row.event_type in self.types)
            and (self.account_id is None or row.account_id == self.account_id)
            # Events that are about no region (an account's standing) stay visible.
            and (self.regions is None or row.region == "" or row.region in self.regions)
        )
