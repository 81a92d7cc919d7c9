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
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from typing import Generic, TypeVar

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
    bindparam,
    insert,
    or_,
    select,
    update,
)

from shared import tracing
from shared.db import Database, UnitOfWork
from shared.direct_sql import hot
from shared.errors import FailedPrecondition, InvalidArgument
from shared.fanout import PAGE, SUBSCRIBER_QUEUE, LiveFanOut
from shared.ids import new_id
from shared.timeutil import to_epoch_us, to_timestamp

E = TypeVar("E", bound=Message)

log = logging.getLogger("allot.outbox")

COUNTER_ID = 1
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
        self._carries_trace = "trace_parent" in envelope.DESCRIPTOR.fields_by_name
        self._take_sequences = hot(
            update(counter)
            .where(counter.c.id == COUNTER_ID)
            .values(last_sequence=counter.c.last_sequence + bindparam("step"))
            .returning(counter.c.last_sequence)
        )
        self._insert = insert(events)
        # The one live reader of this outbox in this process and the streams at the head.
        self.fanout = LiveFanOut(self._read_live_page, self.last_sequence, queue_limit)

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
        if self._carries_trace:  # the writer's trace, for the consumers' spans (shared/tracing.py)
            envelope.trace_parent = tracing.current_traceparent()
        getattr(envelope, payload_field).CopyFrom(payload)
        staged = self._staged.setdefault(id(uow), [])
        if not staged:
            numbered: list[dict] = []
            uow.before_commit(lambda u: self._flush(u, numbered))
            uow.after_commit(lambda: self.fanout.committed(numbered))
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
        # Both statements are built once (the counter's step is a parameter) and run on the
        # transaction's connection: this runs in every transaction that stages an event.
        connection = await uow.connection()
        last = (await connection.execute(self._take_sequences, {"step": len(staged)})).scalar_one()
        first = last - len(staged) + 1
        for offset, row in enumerate(staged):
            row["sequence"] = first + offset
        await connection.execute(self._insert, staged)
        numbered[:] = staged

    def close(self) -> None:
        """End every live stream (shutdown): consumers reconnect to another replica."""
        self.fanout.close()

    async def last_sequence(self) -> int:
        return await self.db.read(self._last_sequence)

    async def _last_sequence(self, uow: UnitOfWork) -> int:
        query = select(self.counter.c.last_sequence).where(self.counter.c.id == COUNTER_ID)
        return int((await uow.session.execute(query)).scalar_one())

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
        while not stopped() and not self.fanout.closed:
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
            self.fanout.advance(head)
            # At the head: hand over to the reader. No await between its check and the
            # subscription; when the reader is already past `cursor`, read that part first.
            subscriber = self.fanout.subscribe(cursor, types, account_id, regions)
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
                    if subscriber.overflowed or stopped() or self.fanout.closed:
                        break
                    subscriber.ready.clear()
                    # Waking up to look at `stopped` costs no query.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(subscriber.ready.wait(), STOPPED_CHECK_SECONDS)
            finally:
                self.fanout.unsubscribe(subscriber)
            # Overflowed (this stream's caller is slow): every event up to its cursor was
            # queued and yielded; read on from there and subscribe again at the head.
            cursor = subscriber.cursor

    async def _read_live_page(self, after: int) -> tuple[int, list]:
        """The next page after `after`, unfiltered, with what the filters need."""
        c = self.events.c
        query = (
            select(c.sequence, c.envelope, c.event_type, c.account_id, c.region)
            .where(c.sequence > after)
            .order_by(c.sequence)
            .limit(PAGE)
        )
        return await self._read_rows(query)
