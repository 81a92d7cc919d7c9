"""The transactional outbox and the `WatchEvents` stream, once for every service.

A service stages events in the transaction that causes them. Right before that transaction
commits, the outbox takes the next sequence numbers from a one-row counter
(`UPDATE ... RETURNING`) and inserts the events. The counter row stays locked until commit, so
sequence order is commit order and the sequence has no gaps: a rolled-back transaction gives its
numbers back, and no reader can see sequence n+1 before n has committed. That is what lets a
reader page with `sequence > cursor` and never skip an event that commits late.

`watch()` streams history, then live events, filtered in SQL by type, account and region (each
event row carries the account and region it is about). Idle streams cost nothing: they wake at
once for commits in this process, and one shared tail per outbox looks at the last sequence
every POLL_SECONDS for commits of other replicas and wakes them only when it advanced
(docs/security.md, "Bounded resources").
"""

from __future__ import annotations

import asyncio
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
    insert,
    or_,
    select,
    update,
)

from shared.db import Database, UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument
from shared.ids import new_id
from shared.timeutil import to_micros, to_timestamp

E = TypeVar("E", bound=Message)

log = logging.getLogger("allot.outbox")

COUNTER_ID = 1
PAGE = 500
# How often the shared tail looks for events committed by other processes.
POLL_SECONDS = 0.5
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

    def __init__(self, db: Database, events: Table, counter: Table, envelope: type[E]) -> None:
        self.db = db
        self.events = events
        self.counter = counter
        self.envelope = envelope
        self.event_types = frozenset(
            f.name for f in envelope.DESCRIPTOR.oneofs_by_name["payload"].fields
        )
        self._staged: dict[int, list[dict]] = {}
        # Set (and replaced) whenever waiting streams should look again: a commit in this
        # process, or `_head` advanced. Invariant: `_head` never grows without a wake.
        self._committed = asyncio.Event()
        # The highest last sequence anyone here has seen committed.
        self._head = 0
        self._waiting = 0
        self._tail: asyncio.Task | None = None
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
            numbered: list[int] = []
            uow.before_commit(lambda u: self._flush(u, numbered))
            uow.after_commit(lambda: self._wake(numbered[0] if numbered else 0))
            uow.on_close(lambda: self._staged.pop(id(uow), None))
        staged.append(
            {
                "event_id": event_id,
                "event_type": payload_field,
                "envelope": envelope.SerializeToString(),
                "create_time_us": to_micros(now),
                "account_id": account_id,
                "region": region,
            }
        )
        return event_id

    async def _flush(self, uow: UnitOfWork, numbered: list[int]) -> None:
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
        numbered[:] = [last]

    def close(self) -> None:
        """End every live stream (shutdown): consumers reconnect to another replica."""
        self._closed = True
        self._wake()
        if self._tail is not None:
            self._tail.cancel()
            self._tail = None

    async def last_sequence(self) -> int:
        return await self.db.read(self._last_sequence)

    async def _last_sequence(self, uow: UnitOfWork) -> int:
        query = select(self.counter.c.last_sequence).where(self.counter.c.id == COUNTER_ID)
        return int((await uow.session.execute(query)).scalar_one())

    def _wake(self, head: int = 0) -> None:
        # Wake every waiting stream; each re-reads from its own cursor.
        self._head = max(self._head, head)
        self._committed.set()
        self._committed = asyncio.Event()

    def _advance(self, head: int) -> None:
        """`head` is committed: wake the streams if nobody here knew it yet."""
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
        """The last committed sequence, then a page: every event up to that sequence is
        visible to the page's statement (it starts later), whatever the isolation level."""

        async def work(uow: UnitOfWork) -> tuple[int, list[E]]:
            head = await self._last_sequence(uow)
            return head, self._events((await uow.session.execute(query)).all())

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
            woken = self._committed
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
            await self._wait(woken, head, stopped)

    async def _wait(self, woken: asyncio.Event, known: int, stopped: Callable[[], bool]) -> None:
        """Until a commit here, or the tail saw one past `known` (the tail sets `woken` then).
        Waking up to look at `stopped` costs no query."""
        self._waiting += 1
        if self._tail is None:
            self._tail = asyncio.get_running_loop().create_task(self._follow())
        try:
            while not (woken.is_set() or self._head > known or stopped() or self._closed):
                try:
                    await asyncio.wait_for(woken.wait(), STOPPED_CHECK_SECONDS)
                except TimeoutError:
                    pass
        finally:
            self._waiting -= 1

    async def _follow(self) -> None:
        """The one tail of this outbox: while streams wait, look at the last sequence every
        POLL_SECONDS (one indexed row) and wake them when another process committed."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self._waiting == 0 or self._closed:
                self._tail = None  # no await since the check: a new waiter starts a new tail
                return
            try:
                self._advance(await self.last_sequence())
            except Exception as exc:  # the database is away: the streams' reads will say so
                log.warning("outbox tail cannot read the last sequence: %s", exc)
