"""The outbox and the stream consumer on real databases (SQLite and PostgreSQL).

Producer side (docs/design/ownership-and-regions.md): events are numbered 1..N without gaps however
many transactions write at once, a rolled-back transaction's events never appear (also after it took
sequence numbers), and a reader paging with `sequence > cursor` never sees a later sequence before
an earlier one, even while a transaction that staged an event commits late.

Consumer side: `shared.streams.consumer.StreamConsumer` against an `Outbox.watch` stream applies
every event exactly once across stream failures, replays, failing effects, a lost lease and a second
replica. The database is migrated with quota's own migrations, so the tables are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from allot.quota.v1 import quota_pb2
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.exc import DBAPIError

from services.quota.adapters import tables
from services.quota.service import QuotaService
from shared import migrations
from shared.db import Database, UnitOfWork
from shared.fanout import POLL_SECONDS
from shared.outbox import Outbox
from shared.streams.consumer import StreamConsumer
from shared.streams.lease import LeaseLost, consumer_tables
from tests.support.notification import until

NOW = datetime(2024, 1, 1, tzinfo=UTC)
WAIT = 30.0  # bound on every wait for a consumer; a loaded 2-core machine is slow


class RolledBack(Exception):
    pass


@pytest.fixture
async def db(database_url):
    database = Database(database_url)
    await migrations.upgrade(database.engine, "quota", QuotaService.migrations_dir)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def outbox(db) -> Outbox[quota_pb2.QuotaEvent]:
    return Outbox(db, tables.outbox_events, tables.outbox_counter, quota_pb2.QuotaEvent)


def stage(outbox: Outbox, uow: UnitOfWork, tag: str) -> str:
    payload = quota_pb2.PayPerUseRecorded(usage_event_id=tag, account_id="acct", quantity=1)
    return outbox.add(uow, "pay_per_use_recorded", payload, NOW)


def tag_of(event: quota_pb2.QuotaEvent) -> str:
    return event.pay_per_use_recorded.usage_event_id


async def read_all(outbox: Outbox) -> list[quota_pb2.QuotaEvent]:
    events: list[quota_pb2.QuotaEvent] = []
    while batch := await outbox.read(events[-1].sequence if events else 0):
        events.extend(batch)
    return events


async def write(
    db: Database,
    outbox: Outbox,
    tags: list[str],
    *,
    fail: str = "",
    hold: asyncio.Event | None = None,
    held: asyncio.Event | None = None,
    hold_after_numbering: bool = False,
) -> None:
    """One transaction staging `tags`. fail="work" raises before commit (no numbers taken);
    fail="commit" raises after the outbox took its numbers. `hold` keeps the transaction open
    (before or after numbering) until set; `held` is set once it is being held."""

    async def wait_for_release(_uow: UnitOfWork | None = None) -> None:
        if held is not None:
            held.set()
        assert hold is not None
        await hold.wait()

    async def explode(_uow: UnitOfWork) -> None:
        raise RolledBack("rolled back after taking sequence numbers")

    async def work(uow: UnitOfWork) -> None:
        for tag in tags:
            stage(outbox, uow, tag)
            await asyncio.sleep(random.uniform(0, 0.003))  # interleave with other writers
        if hold is not None and hold_after_numbering:
            uow.before_commit(wait_for_release)  # runs after the outbox's numbering hook
        elif hold is not None:
            await wait_for_release()
        if fail == "work":
            raise RolledBack("rolled back before commit")
        if fail == "commit":
            uow.before_commit(explode)

    await db.transaction(work)


# --- producer ----------------------------------------------------------------------------------


async def test_concurrent_writers_number_events_without_gaps(db, outbox):
    rng = random.Random(7)
    plans = []
    for i in range(60):
        tags = [f"w{i}-{k}" for k in range(rng.randint(1, 4))]
        fail = rng.choice(["", "", "", "work", "commit"])
        plans.append((tags, fail))

    async def writer(tags: list[str], fail: str) -> None:
        try:
            await write(db, outbox, tags, fail=fail)
        except RolledBack:
            assert fail

    # A live watcher must see the same gap-free sequence as the final read.
    watched: list[quota_pb2.QuotaEvent] = []
    committed = [t for tags, fail in plans if not fail for t in tags]

    async def watch() -> None:
        async for event in outbox.watch(0):
            watched.append(event)
            if len(watched) == len(committed):
                return

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(writer(tags, fail) for tags, fail in plans))
    await asyncio.wait_for(watcher, WAIT)

    events = await read_all(outbox)
    assert [e.sequence for e in events] == list(range(1, len(committed) + 1))
    assert sorted(tag_of(e) for e in events) == sorted(committed)
    rolled_back = {t for tags, fail in plans if fail for t in tags}
    assert not rolled_back & {tag_of(e) for e in events}
    assert [e.sequence for e in watched] == [e.sequence for e in events]
    # The events of one transaction are numbered together, in the order they were staged.
    by_tag = {tag_of(e): e.sequence for e in events}
    for tags, fail in plans:
        if not fail:
            first = by_tag[tags[0]]
            assert [by_tag[t] for t in tags] == list(range(first, first + len(tags)))


@pytest.mark.parametrize("hold_after_numbering", [False, True], ids=["open", "numbered"])
async def test_a_late_commit_is_never_overtaken_by_a_reader(db, outbox, hold_after_numbering):
    """A transaction stages an event and stays open while others write; a reader polling
    `read(cursor)` the whole time must only ever see cursor+1, cursor+2, ... ."""
    release, held = asyncio.Event(), asyncio.Event()
    await write(db, outbox, ["before"])
    late = asyncio.create_task(
        write(
            db,
            outbox,
            ["late"],
            hold=release,
            held=held,
            hold_after_numbering=hold_after_numbering,
        )
    )
    await asyncio.wait_for(held.wait(), WAIT)
    others = [asyncio.create_task(write(db, outbox, [f"other-{i}"])) for i in range(12)]
    total = 1 + 1 + len(others)

    reads = 0
    seen: list[quota_pb2.QuotaEvent] = []

    async def reader() -> None:
        nonlocal reads
        cursor = 0
        while cursor < total:
            batch = await outbox.read(cursor)
            reads += 1
            assert [e.sequence for e in batch] == list(range(cursor + 1, cursor + 1 + len(batch)))
            seen.extend(batch)
            if batch:
                cursor = batch[-1].sequence
            await asyncio.sleep(0.002)

    polling = asyncio.create_task(reader())
    await asyncio.sleep(1.0)  # others commit (or queue) while the late one is held
    if hold_after_numbering:
        # The late transaction holds the sequence lock: nobody after it may be visible.
        assert [tag_of(e) for e in seen] == ["before"]
    release.set()
    await asyncio.wait_for(asyncio.gather(late, *others), WAIT)
    await asyncio.wait_for(polling, WAIT)
    assert reads > 10
    assert [e.sequence for e in seen] == list(range(1, total + 1))
    assert sorted(tag_of(e) for e in seen) == sorted(
        ["before", "late", *(f"other-{i}" for i in range(12))]
    )
    late_sequence = next(e.sequence for e in seen if tag_of(e) == "late")
    if hold_after_numbering or db.dialect == "sqlite":
        # Numbered first (or SQLite's single writer): everyone else queued behind it.
        assert late_sequence == 2
    else:
        # Still open, without a number: the others committed first and it comes last.
        assert late_sequence == total


async def test_watch_streams_history_then_live_events(db, outbox):
    for i in range(3):
        await write(db, outbox, [f"old-{i}"])
    got: list[str] = []

    async def watch() -> None:
        async for event in outbox.watch(1):
            got.append(tag_of(event))
            if len(got) == 4:
                return

    watcher = asyncio.create_task(watch())
    # Live for sure: written only once the stream has read its history and subscribed.
    await until(lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 1, WAIT, "stream")
    assert got == ["old-1", "old-2"]
    await write(db, outbox, ["live-0", "live-1"])
    await asyncio.wait_for(watcher, WAIT)
    assert got == ["old-1", "old-2", "live-0", "live-1"]


def stage_about(outbox: Outbox, uow: UnitOfWork, tag: str, account: str, region: str) -> str:
    payload = quota_pb2.PayPerUseRecorded(usage_event_id=tag, account_id=account, region=region)
    return outbox.add(uow, "pay_per_use_recorded", payload, NOW, account_id=account, region=region)


async def write_about(db: Database, outbox: Outbox, rows: list[tuple[str, str, str]]) -> None:
    """One transaction staging (tag, account, region) events."""

    async def work(uow: UnitOfWork) -> None:
        for row in rows:
            stage_about(outbox, uow, *row)

    await db.transaction(work)


async def test_read_and_watch_filter_by_account_and_region_in_sql(db, outbox):
    await write_about(
        db,
        outbox,
        [("a-east", "a", "east"), ("b-east", "b", "east"), ("a-west", "a", "west")],
    )
    await write_about(db, outbox, [("a-none", "a", ""), ("b-west", "b", "west")])

    async def tags(**filters) -> list[str]:
        return [tag_of(e) for e in await outbox.read(0, **filters)]

    assert await tags(account_id="a") == ["a-east", "a-west", "a-none"]
    # Events about no region are visible to every region.
    assert await tags(regions=["east"]) == ["a-east", "b-east", "a-none"]
    assert await tags(account_id="b", regions=["west", "north"]) == ["b-west"]
    assert await tags(regions=[]) == ["a-none"]
    # Sequences stay those of the whole outbox: a filtered cursor is a plain cursor.
    assert [e.sequence for e in await outbox.read(0, account_id="b")] == [2, 5]

    got: list[str] = []

    async def watch() -> None:
        async for event in outbox.watch(2, account_id="a", regions=["west"]):
            got.append(tag_of(event))
            if tag_of(event) == "a-live":
                return

    watcher = asyncio.create_task(watch())
    await until(lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 1, WAIT, "stream")
    assert got == ["a-west", "a-none"]  # history read; what follows is live
    await write_about(db, outbox, [("b-live", "b", "west"), ("a-live-east", "a", "east")])
    await write_about(db, outbox, [("a-live", "a", "west")])
    await asyncio.wait_for(watcher, WAIT)
    assert got == ["a-west", "a-none", "a-live"]


async def test_idle_streams_share_one_reader_and_wake_for_another_replicas_commit(db, outbox):
    """Forty idle streams cost one small query per POLL_SECONDS between them, not forty; a
    commit by another process (here: another Outbox on the same database, whose commits this
    one does not hear of) still reaches them within about POLL_SECONDS."""
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    replica = Outbox(db, tables.outbox_events, tables.outbox_counter, quota_pb2.QuotaEvent)
    received: dict[int, list[str]] = {i: [] for i in range(40)}

    async def watch(i: int) -> None:
        account = "a" if i % 2 == 0 else "b"
        async for event in outbox.watch(0, account_id=account):
            received[i].append(tag_of(event))
            return

    watchers = [asyncio.create_task(watch(i)) for i in range(40)]
    try:
        # Every stream has read its (empty) history and waits on the reader.
        await until(
            lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 40, WAIT, "streams"
        )
        sa_event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        try:
            await asyncio.sleep(POLL_SECONDS * 4)
        finally:
            sa_event.remove(db.engine.sync_engine, "before_cursor_execute", count)
        reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        assert len(reads) <= 6, reads  # the reader's look at the counter, about 4 times

        await write_about(db, replica, [("for-a", "a", "east")])
        await asyncio.wait_for(asyncio.gather(*watchers[::2]), WAIT)
        assert all(received[i] == ["for-a"] for i in range(0, 40, 2))
        assert all(received[i] == [] for i in range(1, 40, 2))
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


# --- the live reader: one per outbox per process, streams at the head subscribe to it --------

KINDS = ("pay_per_use_recorded", "package_expiring")
# Filters as the services pass them: types, account, regions (region "" is always visible).
FILTERS: list[dict] = [
    {},
    {"account_id": "a"},
    {"account_id": "b", "regions": ["east"]},
    {"regions": ["west"]},
    {"regions": []},
    {"event_types": ["package_expiring"]},
    {"event_types": ["pay_per_use_recorded"], "account_id": "a", "regions": ["east", "west"]},
    {"account_id": "nobody"},
]


def value(v):
    """An awaitable of `v`, for `until`'s read."""
    return asyncio.sleep(0, result=v)


async def write_kinds(db: Database, outbox: Outbox, rows: list[tuple[str, str, str]]) -> None:
    """One transaction staging (type, account, region) events."""

    async def work(uow: UnitOfWork) -> None:
        for kind, account, region in rows:
            payload = (
                quota_pb2.PayPerUseRecorded(account_id=account, region=region)
                if kind == "pay_per_use_recorded"
                else quota_pb2.PackageExpiring(days_left=1)
            )
            outbox.add(uow, kind, payload, NOW, account_id=account, region=region)

    await db.transaction(work)


async def read_filtered(outbox: Outbox, after: int, filters: dict) -> list[tuple[int, str]]:
    """What the SQL filter gives: the reference for what a stream must yield."""
    types = filters.get("event_types", ())
    others = {k: v for k, v in filters.items() if k != "event_types"}
    out: list[tuple[int, str]] = []
    while batch := await outbox.read(out[-1][0] if out else after, types, **others):
        out.extend((e.sequence, e.event_id) for e in batch)
    return out


async def collect(stream: AsyncIterator[quota_pb2.QuotaEvent], into: list) -> None:
    async for event in stream:
        into.append((event.sequence, event.event_id))


async def stopped_tasks(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_every_stream_gets_exactly_its_events_in_order_under_concurrent_commits(db, outbox):
    """Streams with different filters, started before, at and during concurrent commits of
    this process and of another (a second Outbox on the same database), each yield exactly what
    the SQL filter gives from their cursor: in order, none twice, none missing."""
    replica = Outbox(db, tables.outbox_events, tables.outbox_counter, quota_pb2.QuotaEvent)
    rng = random.Random(11)

    def rows() -> list[tuple[str, str, str]]:
        return [
            (rng.choice(KINDS), rng.choice("ab"), rng.choice(["east", "west", ""]))
            for _ in range(rng.randint(1, 3))
        ]

    for _ in range(10):
        await write_kinds(db, outbox, rows())
    streams: dict[str, tuple[int, dict, list]] = {}
    tasks: list[asyncio.Task] = []

    def start(name: str, after: int, filters: dict) -> None:
        received: list[tuple[int, str]] = []
        streams[name] = (after, filters, received)
        tasks.append(asyncio.create_task(collect(outbox.watch(after, **filters), received)))

    try:
        for n, filters in enumerate(FILTERS):
            start(f"history-{n}", 0, filters)
            start(f"middle-{n}", 5, filters)
        writes = [
            asyncio.create_task(write_kinds(db, outbox if i % 3 else replica, rows()))
            for i in range(40)
        ]
        await asyncio.sleep(0.05)
        for n, filters in enumerate(FILTERS):  # these catch up while commits land
            start(f"late-{n}", 0, filters)
        await asyncio.wait_for(asyncio.gather(*writes), WAIT)
        expected = {
            name: await read_filtered(outbox, after, filters)
            for name, (after, filters, _) in streams.items()
        }
        assert sum(map(len, expected.values())) > 200
        await until(
            lambda: value({n: len(s[2]) for n, s in streams.items()}),
            lambda counts: all(counts[n] >= len(expected[n]) for n in streams),
            WAIT,
            "every stream's events",
        )
        await asyncio.sleep(POLL_SECONDS * 2)  # nothing more (nothing twice) arrives
        for name, (_, _, received) in streams.items():
            assert received == expected[name], name
    finally:
        await stopped_tasks(tasks)


async def test_the_live_reader_reads_each_commit_at_most_once_for_every_stream(db, outbox):
    """Fifty streams at the head cost at most one read of new events per commit between them:
    none for a commit in this process (the reader is handed what it committed), one for a
    commit of another process (here: another Outbox on the same database)."""
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    def event_reads() -> int:
        return sum(
            1
            for s in statements
            if s.lstrip().upper().startswith("SELECT") and "FROM outbox_events" in s
        )

    replica = Outbox(db, tables.outbox_events, tables.outbox_counter, quota_pb2.QuotaEvent)
    every: list[tuple[int, str]] = []
    others: list[tuple[int, str]] = []
    tasks = [asyncio.create_task(collect(outbox.watch(0), every))] + [
        asyncio.create_task(collect(outbox.watch(0, account_id=f"other-{i}"), others))
        for i in range(50)
    ]
    commits = 6
    try:
        await until(
            lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 51, WAIT, "streams"
        )
        sa_event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        try:
            for i in range(commits):
                await write_about(db, outbox, [(f"here-{i}", "a", "east")])
                await until(lambda: value(len(every)), lambda n, i=i: n == i + 1, WAIT, "event")
            assert event_reads() == 0
            for i in range(commits):
                await write_about(db, replica, [(f"there-{i}", "a", "east")])
                n = commits + i + 1
                await until(lambda: value(len(every)), lambda k, n=n: k == n, WAIT, "event")
            assert 1 <= event_reads() <= commits, statements
        finally:
            sa_event.remove(db.engine.sync_engine, "before_cursor_execute", count)
        assert others == []
        assert [s for s, _ in every] == list(range(1, 2 * commits + 1))
    finally:
        await stopped_tasks(tasks)


async def test_streams_catching_up_while_the_reader_moves_on_miss_nothing(db, outbox):
    """The hand-over: a stream reaches the head of its own reads while commits land and the
    reader (serving a stream already at the head) has moved past it; it must read that part
    itself before subscribing, and never get an event twice."""
    await produce(db, outbox, 1200)  # more than two pages of history
    start = await outbox.last_sequence()
    at_head: list[tuple[int, str]] = []
    tasks = [asyncio.create_task(collect(outbox.watch(start), at_head))]
    got: dict[int, list[int]] = {k: [] for k in range(6)}

    async def catch_up(k: int) -> None:
        async for event in outbox.watch(0):
            got[k].append(event.sequence)
            if k % 2 and event.sequence % 100 == 0:
                await asyncio.sleep(0.05)  # a slow caller: the reader gets ahead meanwhile

    stop = asyncio.Event()

    async def keep_committing() -> None:
        i = 0
        while not stop.is_set():
            await write(db, outbox, [f"live-{i}", f"live-{i}b"])
            i += 1
            await asyncio.sleep(0.005)

    try:
        await until(lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 1, WAIT, "stream")
        writer = asyncio.create_task(keep_committing())
        tasks += [asyncio.create_task(catch_up(k)) for k in got]
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.wait_for(writer, WAIT)
        last = await outbox.last_sequence()
        assert last > start + 20
        await until(
            lambda: value([len(g) for g in got.values()] + [len(at_head)]),
            lambda counts: counts == [last] * len(got) + [last - start],
            WAIT,
            "every event on every stream",
        )
        for k in got:
            assert got[k] == list(range(1, last + 1)), k
        assert [s for s, _ in at_head] == list(range(start + 1, last + 1))
    finally:
        await stopped_tasks(tasks)


async def test_a_slow_stream_overflows_its_queue_and_reads_on_its_own(db):
    outbox = Outbox(
        db, tables.outbox_events, tables.outbox_counter, quota_pb2.QuotaEvent, queue_limit=20
    )
    fast: list[tuple[int, str]] = []
    slow: list[int] = []
    go = asyncio.Event()

    async def slow_watch() -> None:
        async for event in outbox.watch(0):
            slow.append(event.sequence)
            if len(slow) == 1:
                await go.wait()  # the caller stops reading

    tasks = [asyncio.create_task(collect(outbox.watch(0), fast)), asyncio.create_task(slow_watch())]
    try:
        await until(
            lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 2, WAIT, "streams"
        )
        await write(db, outbox, ["first"])
        await until(lambda: value((len(fast), len(slow))), lambda n: n == (1, 1), WAIT, "first")
        for i in range(6):
            await write(db, outbox, [f"b{i}-{k}" for k in range(10)])
        await until(lambda: value(len(fast)), lambda n: n == 61, WAIT, "the fast stream")
        # The slow stream's queue (20) overflowed: the reader let it go.
        assert len(outbox.fanout.subscribers) == 1
        go.set()
        await until(lambda: value(len(slow)), lambda n: n == 61, WAIT, "the slow stream")
        await until(
            lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 2, WAIT, "resubscribed"
        )
        await write(db, outbox, ["after"])
        await until(lambda: value((len(fast), len(slow))), lambda n: n == (62, 62), WAIT, "after")
        assert slow == [s for s, _ in fast] == list(range(1, 63))
    finally:
        await stopped_tasks(tasks)


async def test_close_ends_streams_and_the_reader_ends_with_its_last_stream(db, outbox):
    tasks = [
        asyncio.create_task(collect(outbox.watch(0, account_id=f"x{i}"), [])) for i in range(10)
    ]
    await until(lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 10, WAIT, "streams")
    reader = outbox.fanout.reader
    assert reader is not None
    await stopped_tasks(tasks[:5])  # callers gone: unsubscribed at once
    assert len(outbox.fanout.subscribers) == 5 and not reader.done()
    outbox.close()
    await asyncio.wait_for(asyncio.gather(*tasks[5:]), 2.0)  # ended, not cancelled
    assert reader.done() and outbox.fanout.reader is None

    other = Outbox(db, tables.outbox_events, tables.outbox_counter, quota_pb2.QuotaEvent)
    tasks = [asyncio.create_task(collect(other.watch(0), [])) for _ in range(10)]
    await until(lambda: value(len(other.fanout.subscribers)), lambda n: n == 10, WAIT, "streams")
    reader = other.fanout.reader
    assert reader is not None
    await stopped_tasks(tasks)
    await asyncio.wait_for(reader, 2.0)  # no stream left: the reader ends without a poll
    assert other.fanout.reader is None


async def test_a_failing_read_of_the_reader_ends_its_streams_with_the_error(db, outbox):
    """The reader cannot read new events (here: the table is gone): its streams end with the
    error, as their own reads would (a call ends with it; consumers reconnect), and none hangs."""
    received: list[tuple[int, str]] = []
    tasks = [asyncio.create_task(collect(outbox.watch(0), received)) for _ in range(3)]
    await until(lambda: value(len(outbox.fanout.subscribers)), lambda n: n == 3, WAIT, "streams")
    async with db.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE outbox_events RENAME TO outbox_events_gone"))
        # Another process "committed": the reader's poll sees the counter move and reads.
        await conn.execute(update(tables.outbox_counter).values(last_sequence=1))
    done, _ = await asyncio.wait(tasks, timeout=WAIT)
    assert len(done) == 3
    assert all(isinstance(t.exception(), DBAPIError) for t in tasks)
    assert received == [] and outbox.fanout.reader is None and not outbox.fanout.subscribers


# --- consumer ----------------------------------------------------------------------------------

consumer_metadata = MetaData()
cursors, leases = consumer_tables(consumer_metadata)
applied = Table(
    "applied",
    consumer_metadata,
    Column("seq", BigInteger, nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("tag", String(64), nullable=False),
    Column("holder", String(64), nullable=False),
)
STREAM = "quota:test"


@pytest.fixture
async def consumer_db(db):
    """The consumer's tables, beside quota's in the same test database (no names collide)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(consumer_metadata.create_all)
    return db


def make_consumer(
    consumer_db: Database,
    open_stream,
    holder: str = "a",
    *,
    apply=None,
    lease_ttl: float = 3.0,
    max_batch: int = 20,
) -> StreamConsumer:
    async def record(uow: UnitOfWork, event: quota_pb2.QuotaEvent) -> None:
        await uow.session.execute(
            insert(applied).values(
                seq=event.sequence, event_id=event.event_id, tag=tag_of(event), holder=holder
            )
        )

    return StreamConsumer(
        STREAM,
        consumer_db,
        cursors,
        leases,
        open_stream,
        apply or record,
        holder=holder,
        lease_ttl=lease_ttl,
        backoff_initial=0.02,
        backoff_max=0.2,
        max_batch=max_batch,
    )


async def applied_rows(db: Database) -> list[tuple[int, str]]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(applied.c.seq, applied.c.holder))).all()
    return sorted((r.seq, r.holder) for r in rows)


@contextlib.asynccontextmanager
async def running(consumer: StreamConsumer):
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        consumer.stop()
        await asyncio.wait_for(task, WAIT)


async def produce(db: Database, outbox: Outbox, count: int, prefix: str = "e") -> None:
    for start in range(0, count, 50):
        await write(db, outbox, [f"{prefix}-{i}" for i in range(start, min(count, start + 50))])


async def test_consumer_survives_flaky_streams_and_replays(consumer_db, outbox, seed):
    rng = random.Random(seed)
    await produce(consumer_db, outbox, 300)
    failures = {"left": 5}

    async def flaky(after: int) -> AsyncIterator[quota_pb2.QuotaEvent]:
        # Replays a little before the cursor (a producer may resend) and breaks off at random.
        breaking = failures["left"] > 0
        budget = rng.randint(5, 40)
        async for event in outbox.watch(max(0, after - 10)):
            if breaking and budget == 0:
                failures["left"] -= 1
                raise ConnectionError("stream broke")
            budget -= 1
            yield event

    consumer = make_consumer(consumer_db, flaky)
    async with running(consumer):
        assert await consumer.wait_for(300, WAIT)
        await produce(consumer_db, outbox, 20, prefix="live")
        assert await consumer.wait_for(320, WAIT)
    rows = await applied_rows(consumer_db)
    assert [seq for seq, _ in rows] == list(range(1, 321))
    assert consumer.errors == 5 and consumer.connects == 6
    assert consumer.skipped > 0
    assert consumer.applied == 320
    assert not consumer.connected and not consumer.holding


async def test_a_failing_effect_is_retried_and_never_skipped(consumer_db, outbox):
    await produce(consumer_db, outbox, 60)
    attempts: dict[int, int] = {}

    async def fails_twice_on_33(uow: UnitOfWork, event: quota_pb2.QuotaEvent) -> None:
        await uow.session.execute(
            insert(applied).values(
                seq=event.sequence, event_id=event.event_id, tag=tag_of(event), holder="a"
            )
        )
        attempts[event.sequence] = attempts.get(event.sequence, 0) + 1
        if event.sequence == 33 and attempts[33] <= 2:
            raise RuntimeError("effect failed")

    consumer = make_consumer(consumer_db, outbox.watch, apply=fails_twice_on_33, max_batch=50)
    async with running(consumer):
        assert await consumer.wait_for(60, WAIT)
    assert [seq for seq, _ in await applied_rows(consumer_db)] == list(range(1, 61))
    assert attempts[33] == 3
    assert consumer.errors >= 1


async def test_only_the_lease_holder_applies_and_a_replica_takes_over(consumer_db, outbox):
    await produce(consumer_db, outbox, 100)
    a = make_consumer(consumer_db, outbox.watch, "a", lease_ttl=1.5)
    b = make_consumer(consumer_db, outbox.watch, "b", lease_ttl=1.5)
    task_a = asyncio.create_task(a.run())
    assert await a.wait_for(100, WAIT)
    async with running(b):
        await asyncio.sleep(1.0)  # b polls for the lease and must keep waiting
        assert not b.holding and b.applied == 0
        await produce(consumer_db, outbox, 50, prefix="more")
        assert await a.wait_for(150, WAIT)
        a.stop()  # releases the lease: b takes over without waiting for the ttl
        await asyncio.wait_for(task_a, WAIT)
        await produce(consumer_db, outbox, 50, prefix="after")
        assert await b.wait_for(200, WAIT)
    rows = await applied_rows(consumer_db)
    assert [seq for seq, _ in rows] == list(range(1, 201))
    assert {holder for seq, holder in rows if seq <= 150} == {"a"}
    assert {holder for seq, holder in rows if seq > 150} == {"b"}


async def test_a_holder_that_lost_its_lease_applies_nothing(consumer_db, outbox):
    """A replica paused past its ttl while another took over must not apply on waking."""
    await produce(consumer_db, outbox, 10)
    consumer = make_consumer(consumer_db, outbox.watch, "a", lease_ttl=60)
    async with running(consumer):
        assert await consumer.wait_for(10, WAIT)
        async with consumer_db.engine.begin() as conn:
            await conn.execute(
                update(leases).where(leases.c.stream == STREAM).values(holder="intruder")
            )
        await produce(consumer_db, outbox, 5, prefix="late")
        # The next applying transaction finds the lease gone and rolls back; a lease of 60 s
        # then keeps this replica waiting.
        for _ in range(200):
            if not consumer.holding:
                break
            await asyncio.sleep(0.05)
        assert not consumer.holding
        await asyncio.sleep(0.3)
    assert [seq for seq, _ in await applied_rows(consumer_db)] == list(range(1, 11))
    assert consumer.last_sequence == 10
    with pytest.raises(LeaseLost):
        await consumer_db.transaction(consumer.lease.extend)


async def test_an_unreachable_producer_is_retried_with_growing_pauses(consumer_db):
    opened: list[float] = []

    async def unreachable(after: int) -> AsyncIterator[quota_pb2.QuotaEvent]:
        opened.append(asyncio.get_running_loop().time())
        raise ConnectionError("connection refused")
        yield  # an async generator that fails on its first read

    consumer = make_consumer(consumer_db, unreachable)
    async with running(consumer):
        await asyncio.sleep(1.5)
    # Pauses of 0.01-0.02, 0.02-0.04, ... then 0.1-0.2 s: about a dozen tries, never a spin.
    assert 4 <= len(opened) <= 25, len(opened)
    gaps = [b - a for a, b in zip(opened, opened[1:], strict=False)]
    assert min(gaps) >= 0.009
    assert max(gaps[-3:]) >= 0.09
    assert len(opened) - 1 <= consumer.errors <= len(opened)
    assert consumer.applied == 0


async def test_stop_releases_the_lease(consumer_db, outbox):
    consumer = make_consumer(consumer_db, outbox.watch, "a", lease_ttl=60)
    async with running(consumer):
        for _ in range(100):
            if consumer.connected:
                break
            await asyncio.sleep(0.05)
        assert consumer.holding and consumer.connected
    async with consumer_db.engine.connect() as conn:
        lease = (await conn.execute(select(leases))).one()
        count = (await conn.execute(select(func.count()).select_from(applied))).scalar_one()
    assert (lease.holder, lease.expire_us, count) == ("a", 0, 0)
