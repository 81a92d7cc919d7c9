"""The transactional outbox and the `WatchEvents` stream, once for every service.

A service stages events in the transaction that causes them. Right before that transaction
commits, the outbox takes the next sequence numbers from a one-row counter
(`UPDATE ... RETURNING`) and inserts the events. The counter row stays locked until commit, so
sequence order is commit order and the sequence has no gaps: a rolled-back transaction gives its
numbers back, and no reader can see sequence n+1 before n has committed. That is what lets a
reader page with `sequence > cursor` and never skip an event that commits late.

`watch()` streams history, then live events, filtered by type, account and region (each event
row carries the account and region it is about; region "" is visible to every region). History
is the stream's own: pages read with its filter in SQL. At the head the stream subscribes to the
outbox's one live reader in this process, so a commit costs one read however many streams wait
(docs/faults.md, "Streams"):

- The reader wakes at once for a commit here, and every POLL_SECONDS looks at the last sequence
  (one indexed row) for commits of other processes. A commit here hands it the committed rows
  (numbered, with their type, account and region), so it reads nothing for them; whatever lies
  between its position and the head (other processes' commits, or a hand-over that came out of
  order) it reads once, paged. It gives each subscriber the events matching its filter with a
  sequence past the subscriber's cursor, in order, into a bounded queue. It runs only while
  streams subscribe.
- The hand-over: a stream that has everything up to H subscribes without an await between the
  check and the subscription. The reader is at R: R > H means others were handed (H, R]
  already, so the stream reads on by itself first; R <= H, the stream skips what it has.
  Gapless sequences in commit order make "sequence > cursor" enough for both.
- A subscriber whose queue would pass `queue_limit` (its caller does not keep up) is let go:
  it drains its queue, reads on by itself from its cursor and subscribes again at the head.
- The reader's read of new events failing ends its streams with that error (what their own
  read would raise: the call ends, UNAVAILABLE when the database is away, and consumers resume
  from their cursor elsewhere); a failing look at the last sequence only logs, since nothing
  is known to be missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

from google.protobuf.message import Message
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    insert,
    or_,
    select,
    update,
)

from shared.db import Database, UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument
from shared.ids import new_id
from shared.timeutil import to_epoch_us, to_timestamp

E = TypeVar("E", bound=Message)

log = logging.getLogger("allot.outbox")

COUNTER_ID = 1
PAGE = 500
# How often the live reader looks for events committed by other processes.
POLL_SECONDS = 0.5
# Events queued for one stream at the head before it is left to read on its own (its caller
# does not keep up).
SUBSCRIBER_QUEUE = 1000
# How often a waiting stream looks at `stopped` on its own. A cancelled call cancels its
# handler and `close()` wakes every stream, so this is only a safety net; it is long because
# each look is a timer per stream (200 idle streams at 0.5 s cost ~15 % of a core).
STOPPED_CHECK_SECONDS = 5.0


def outbox_tables(metadata: MetaData) -> tuple[Table, Table]:
    events = Table(
        "outbox_events",
        metadata,
        Column("sequence", BigInteger, primary_key=True, autoincrement=False),
        Column("event_id", String(40), nullable=False, unique=True),
        Column("event_type", String(64), nullable=False),
        # The serialized envelope (e.g. QuotaEvent) without its sequence.
        Column("envelope", LargeBinary, nullable=False),
        Column("create_time_us", BigInteger, nullable=False),
        # What the event is about, for the streams' filters ('' = not an account's / not
        # regional: account-level events are visible to every region).
        Column("account_id", String(64), nullable=False, server_default=""),
        Column("region", String(64), nullable=False, server_default=""),
        Index("ix_outbox_events_type_sequence", "event_type", "sequence"),
        Index("ix_outbox_events_account_sequence", "account_id", "sequence"),
    )
    counter = Table(
        "outbox_counter",
        metadata,
        Column("id", SmallInteger, primary_key=True, autoincrement=False),
        Column("last_sequence", BigInteger, nullable=False),
    )
    return events, counter


class Outbox(Generic[E]):
    """Stages events of one envelope type (`QuotaEvent`, `BillingEvent`, ...) and streams them.

    The envelope has `sequence`, `event_id`, `create_time` and a oneof `payload`; an event's
    type is the name of its payload field (`threshold_crossed`).
    """

    def __init__(
        self,
        db: Database,
        events: Table,
        counter: Table,
        envelope: type[E],
        *,
        queue_limit: int = SUBSCRIBER_QUEUE,
    ) -> None:
        self.db = db
        self.queue_limit = queue_limit
        self.events = events
        self.counter = counter
        self.envelope = envelope
        self.event_types = frozenset(
            f.name for f in envelope.DESCRIPTOR.oneofs_by_name["payload"].fields
        )
        self._staged: dict[int, list[dict]] = {}
        # The highest last sequence anyone here has seen committed. Invariant: it never grows
        # without `_wakeup` being set, so the reader never sleeps past a known commit.
        self._head = 0
        self._wakeup = asyncio.Event()
        # The one live reader and the streams at the head it serves. `_live` is how far the
        # reader has read: every event up to it went to the subscribers of the time.
        self._subscribers: set[_Subscriber] = set()
        self._reader: asyncio.Task | None = None
        self._live = 0
        # Events committed here and not yet handed out, by sequence (the reader's shortcut).
        self._local: dict[int, _Row] = {}
        self._closed = False

    def add(
        self,
        uow: UnitOfWork,
        payload_field: str,
        payload: Message,
        now: datetime,
        *,
        account_id: str = "",
        region: str = "",
    ) -> str:
        """Stage one event in `uow`'s transaction; returns its event id. `account_id` and
        `region` are what the event is about, for the streams' filters ('' = none)."""
        if payload_field not in self.event_types:
            raise ValueError(f"{self.envelope.__name__} has no payload {payload_field!r}")
        event_id = new_id("evt")
        envelope = self.envelope(event_id=event_id, create_time=to_timestamp(now))
        getattr(envelope, payload_field).CopyFrom(payload)
        staged = self._staged.setdefault(id(uow), [])
        if not staged:
            numbered: list[dict] = []
            uow.before_commit(lambda u: self._flush(u, numbered))
            uow.after_commit(lambda: self._committed_here(numbered))
            uow.on_close(lambda: self._staged.pop(id(uow), None))
        staged.append(
            {
                "event_id": event_id,
                "event_type": payload_field,
                "envelope": envelope.SerializeToString(),
                "create_time_us": to_epoch_us(now),
                "account_id": account_id,
                "region": region,
            }
        )
        return event_id

    async def _flush(self, uow: UnitOfWork, numbered: list[dict]) -> None:
        staged = self._staged.pop(id(uow), [])
        if not staged:
            return
        last = (
            await uow.session.execute(
                update(self.counter)
                .where(self.counter.c.id == COUNTER_ID)
                .values(last_sequence=self.counter.c.last_sequence + len(staged))
                .returning(self.counter.c.last_sequence)
            )
        ).scalar_one()
        first = last - len(staged) + 1
        for offset, row in enumerate(staged):
            row["sequence"] = first + offset
        connection = await uow.session.connection()
        await connection.execute(insert(self.events), staged)
        numbered[:] = staged

    def close(self) -> None:
        """End every live stream (shutdown): consumers reconnect to another replica."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber.ready.set()
        self._wakeup.set()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    async def last_sequence(self) -> int:
        return await self.db.read(self._last_sequence)

    async def _last_sequence(self, uow: UnitOfWork) -> int:
        query = select(self.counter.c.last_sequence).where(self.counter.c.id == COUNTER_ID)
        return int((await uow.session.execute(query)).scalar_one())

    def _committed_here(self, rows: list[dict]) -> None:
        """A transaction here committed `rows`: while the reader runs, it gets them as they are
        rather than reading them back (it still reads whatever lies between)."""
        if not rows:
            return
        if self._reader is not None:
            for row in rows:
                if row["sequence"] <= self._live:
                    continue  # the reader read it already
                self._local[row["sequence"]] = _Row(
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

    def _advance(self, head: int) -> None:
        """`head` is committed: wake the reader if nobody here knew it yet."""
        if head > self._head:
            self._wake(head)

    def _query(
        self,
        after_sequence: int,
        event_types: Iterable[str],
        account_id: str | None,
        regions: Iterable[str] | None,
        limit: int,
    ):
        c = self.events.c
        query = (
            select(c.sequence, c.envelope)
            .where(c.sequence > after_sequence)
            .order_by(c.sequence)
            .limit(limit)
        )
        types = sorted(set(event_types))
        if types:
            query = query.where(c.event_type.in_(types))
        if account_id is not None:
            query = query.where(c.account_id == account_id)
        if regions is not None:
            # Events that are about no region (an account's standing) stay visible.
            query = query.where(or_(c.region == "", c.region.in_(sorted(set(regions)))))
        return query

    def _events(self, rows) -> list[E]:
        out = []
        for row in rows:
            event = self.envelope.FromString(row.envelope)
            event.sequence = row.sequence
            out.append(event)
        return out

    async def read(
        self,
        after_sequence: int,
        event_types: Iterable[str] = (),
        limit: int = PAGE,
        *,
        account_id: str | None = None,
        regions: Iterable[str] | None = None,
    ) -> list[E]:
        """Events after `after_sequence`, oldest first; only those about `account_id` and
        about one of `regions` (or no region) when given."""
        query = self._query(after_sequence, event_types, account_id, regions, limit)

        async def work(uow: UnitOfWork) -> list[E]:
            return self._events((await uow.session.execute(query)).all())

        return await self.db.read(work)

    async def _read_page(self, query) -> tuple[int, list[E]]:
        head, rows = await self._read_rows(query)
        return head, self._events(rows)

    async def _read_rows(self, query) -> tuple[int, list]:
        """The last committed sequence, then a page: every event up to that sequence is
        visible to the page's statement (it starts later), whatever the isolation level."""

        async def work(uow: UnitOfWork) -> tuple[int, list]:
            head = await self._last_sequence(uow)
            return head, list((await uow.session.execute(query)).all())

        return await self.db.read(work)

    def check_types(self, event_types: Iterable[str], field: str = "event_types") -> list[str]:
        unknown = sorted(set(event_types) - self.event_types)
        if unknown:
            raise InvalidArgument(
                field, f"unknown event types {unknown}; known: {sorted(self.event_types)}"
            )
        return list(event_types)

    async def watch(
        self,
        after_sequence: int,
        event_types: Iterable[str] = (),
        stopped: Callable[[], bool] = lambda: False,
        *,
        account_id: str | None = None,
        regions: Iterable[str] | None = None,
    ) -> AsyncIterator[E]:
        """History after `after_sequence`, then live events, until the caller goes away; only
        those about `account_id` and about one of `regions` (or no region) when given."""
        if after_sequence < 0:
            raise InvalidArgument("after_sequence", "after_sequence must not be negative")
        types = self.check_types(event_types)
        regions = None if regions is None else sorted(set(regions))
        last = await self.last_sequence()
        if after_sequence > last:
            # A consumer ahead of the stream (its producer's database was restored or replaced)
            # would silently skip the first new events: make it look.
            raise FailedPrecondition(
                "CURSOR_AHEAD_OF_STREAM",
                f"after_sequence {after_sequence} is beyond the last event ({last})",
                after_sequence=after_sequence,
                last_sequence=last,
            )
        cursor = after_sequence
        while not stopped() and not self._closed:
            head, batch = await self._read_page(
                self._query(cursor, types, account_id, regions, PAGE)
            )
            for event in batch:
                cursor = event.sequence
                yield event
            if len(batch) == PAGE:
                continue
            # Everything up to `head` was visible to this page: nothing filtered out up to
            # there needs reading again.
            cursor = max(cursor, head)
            self._advance(head)
            # At the head: hand over to the reader. No await between its check and the
            # subscription; when the reader is already past `cursor`, read that part first.
            subscriber = self._subscribe(cursor, types, account_id, regions)
            if subscriber is None:
                continue
            try:
                while True:
                    if subscriber.events:
                        sequence, envelope = subscriber.events.popleft()
                        event = self.envelope.FromString(envelope)
                        event.sequence = sequence
                        yield event
                        continue
                    if subscriber.error is not None:
                        raise subscriber.error
                    if subscriber.overflowed or stopped() or self._closed:
                        break
                    subscriber.ready.clear()
                    # Waking up to look at `stopped` costs no query.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(subscriber.ready.wait(), STOPPED_CHECK_SECONDS)
            finally:
                self._unsubscribe(subscriber)
            # Overflowed (this stream's caller is slow): every event up to its cursor was
            # queued and yielded; read on from there and subscribe again at the head.
            cursor = subscriber.cursor

    def _subscribe(
        self,
        cursor: int,
        types: list[str],
        account_id: str | None,
        regions: list[str] | None,
    ) -> _Subscriber | None:
        """Subscribe a stream that has every event up to `cursor`; None when the reader has
        already handed out events past it (the stream reads those itself, then tries again).
        Synchronous: nothing runs between the check and the subscription."""
        if self._reader is None:
            # Nobody is served: the new reader starts where this stream is.
            self._live = cursor
            self._reader = asyncio.get_running_loop().create_task(self._read_live())
        elif self._live > cursor:
            return None
        subscriber = _Subscriber(
            cursor,
            frozenset(types),
            account_id,
            None if regions is None else frozenset(regions),
        )
        self._subscribers.add(subscriber)
        return subscriber

    def _unsubscribe(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers:
            self._wakeup.set()  # the reader ends now rather than at its next poll

    async def _read_live(self) -> None:
        """The one live reader of this outbox in this process, while streams subscribe: woken by
        a commit here, it reads the new events once and hands each subscriber those it asked
        for; every POLL_SECONDS it looks at the last sequence (one indexed row) for commits of
        other processes."""
        try:
            while self._subscribers and not self._closed:
                if self._head <= self._live:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)
                        continue
                    except TimeoutError:
                        pass
                    if not self._subscribers or self._closed:
                        break
                    try:
                        self._advance(await self.last_sequence())
                    except Exception as exc:  # nothing is known to be missing: keep looking
                        log.warning("outbox reader cannot read the last sequence: %s", exc)
                    continue
                local = self._take_local()
                if local:
                    self._hand_out(local[-1].sequence, local)
                    continue
                try:
                    head, rows = await self._read_live_page()
                except Exception as exc:
                    # The streams end with the error (the database is away: UNAVAILABLE), as
                    # their own reads would; consumers reconnect and resume from their cursor.
                    log.warning("outbox reader cannot read new events: %s", exc)
                    self._fail(exc)
                    break
                live = rows[-1].sequence if rows else self._live
                if len(rows) < PAGE:
                    live = max(live, head)  # the page saw everything up to `head`
                self._advance(head)
                self._hand_out(live, rows)
                for sequence in [s for s in self._local if s <= live]:
                    del self._local[sequence]
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None  # no await since the last check: a new stream starts one
                self._local.clear()

    def _take_local(self) -> list[_Row]:
        """The events committed here that directly follow the reader's position."""
        rows: list[_Row] = []
        while (row := self._local.pop(self._live + 1 + len(rows), None)) is not None:
            rows.append(row)
        return rows

    async def _read_live_page(self) -> tuple[int, list]:
        """The next page after the reader's position, unfiltered, with what the filters need."""
        c = self.events.c
        query = (
            select(c.sequence, c.envelope, c.event_type, c.account_id, c.region)
            .where(c.sequence > self._live)
            .order_by(c.sequence)
            .limit(PAGE)
        )
        return await self._read_rows(query)

    def _hand_out(self, live: int, rows) -> None:
        """Hand each subscriber its events of `rows`; every event up to `live` is in them."""
        for subscriber in list(self._subscribers):
            matching = [
                (row.sequence, row.envelope)
                for row in rows
                if row.sequence > subscriber.cursor and subscriber.wants(row)
            ]
            if len(subscriber.events) + len(matching) > self.queue_limit:
                # A slow caller: it reads on its own from its cursor once its queue is drained.
                subscriber.overflowed = True
                self._subscribers.discard(subscriber)
            else:
                subscriber.events.extend(matching)
                subscriber.cursor = max(subscriber.cursor, live)
            if matching or subscriber.overflowed:
                subscriber.ready.set()
        self._live = live

    def _fail(self, exc: Exception) -> None:
        for subscriber in self._subscribers:
            subscriber.error = exc
            subscriber.ready.set()
        self._subscribers.clear()


class _Row(NamedTuple):
    """An event as the reader hands it out (a row of `_read_live_page` or committed here)."""

    sequence: int
    envelope: bytes
    event_type: str
    account_id: str
    region: str


class _Subscriber:
    """A stream at the head: its filter (the same as `Outbox._query`'s), its cursor (every event
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
