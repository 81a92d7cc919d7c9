"""The transactional outbox and the `WatchEvents` stream, once for every service.

A service stages events in the transaction that causes them. Right before that transaction
commits, the outbox takes the next sequence numbers from a one-row counter
(`UPDATE ... RETURNING`) and inserts the events. The counter row stays locked until commit, so
sequence order is commit order and the sequence has no gaps: a rolled-back transaction gives its
numbers back, and no reader can see sequence n+1 before n has committed. That is what lets a
reader page with `sequence > cursor` and never skip an event that commits late.

`watch()` streams history, then live events: it wakes at once for commits in this process and
polls for commits of other replicas.
"""

from __future__ import annotations

import asyncio
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
    insert,
    select,
    update,
)

from shared.db import Database, UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument
from shared.ids import new_id
from shared.timeutil import to_micros, to_timestamp

E = TypeVar("E", bound=Message)

COUNTER_ID = 1
PAGE = 500
# How often a live stream looks for events committed by other processes.
POLL_SECONDS = 0.5


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
        Index("ix_outbox_events_type_sequence", "event_type", "sequence"),
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

    def __init__(self, db: Database, events: Table, counter: Table, envelope: type[E]) -> None:
        self.db = db
        self.events = events
        self.counter = counter
        self.envelope = envelope
        self.event_types = frozenset(
            f.name for f in envelope.DESCRIPTOR.oneofs_by_name["payload"].fields
        )
        self._staged: dict[int, list[dict]] = {}
        self._committed = asyncio.Event()
        self._closed = False

    def add(self, uow: UnitOfWork, payload_field: str, payload: Message, now: datetime) -> str:
        """Stage one event in `uow`'s transaction; returns its event id."""
        if payload_field not in self.event_types:
            raise ValueError(f"{self.envelope.__name__} has no payload {payload_field!r}")
        event_id = new_id("evt")
        envelope = self.envelope(event_id=event_id, create_time=to_timestamp(now))
        getattr(envelope, payload_field).CopyFrom(payload)
        staged = self._staged.setdefault(id(uow), [])
        if not staged:
            uow.before_commit(self._flush)
            uow.after_commit(self._wake)
            uow.on_close(lambda: self._staged.pop(id(uow), None))
        staged.append(
            {
                "event_id": event_id,
                "event_type": payload_field,
                "envelope": envelope.SerializeToString(),
                "create_time_us": to_micros(now),
            }
        )
        return event_id

    async def _flush(self, uow: UnitOfWork) -> None:
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

    def close(self) -> None:
        """End every live stream (shutdown): consumers reconnect to another replica."""
        self._closed = True
        self._wake()

    async def last_sequence(self) -> int:
        async def work(uow: UnitOfWork) -> int:
            query = select(self.counter.c.last_sequence).where(self.counter.c.id == COUNTER_ID)
            return int((await uow.session.execute(query)).scalar_one())

        return await self.db.read(work)

    def _wake(self) -> None:
        # Wake every waiting stream; each re-reads from its own cursor.
        self._committed.set()
        self._committed = asyncio.Event()

    async def read(
        self, after_sequence: int, event_types: Iterable[str] = (), limit: int = PAGE
    ) -> list[E]:
        types = sorted(set(event_types))
        query = (
            select(self.events.c.sequence, self.events.c.envelope)
            .where(self.events.c.sequence > after_sequence)
            .order_by(self.events.c.sequence)
            .limit(limit)
        )
        if types:
            query = query.where(self.events.c.event_type.in_(types))

        async def work(uow: UnitOfWork) -> list[E]:
            rows = (await uow.session.execute(query)).all()
            out = []
            for row in rows:
                event = self.envelope.FromString(row.envelope)
                event.sequence = row.sequence
                out.append(event)
            return out

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
    ) -> AsyncIterator[E]:
        """History after `after_sequence`, then live events, until the caller goes away."""
        if after_sequence < 0:
            raise InvalidArgument("after_sequence", "after_sequence must not be negative")
        types = self.check_types(event_types)
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
            woken = self._committed
            batch = await self.read(cursor, types)
            for event in batch:
                cursor = event.sequence
                yield event
            if len(batch) == PAGE:
                continue
            try:
                await asyncio.wait_for(woken.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
