"""`shared.streams.subscriptions.Subscriptions` against a real quota server: the stream a service
subscribes to reaches its database exactly once with the event types it asked for, over a
channel of its own and with an `internal` token naming it; `stop()` gives the lease up, and a
consumer stuck in its effect is abandoned (its lease left to expire) and cancelled within the
bound, so shutdown stays within its grace (docs/faults.md, "Streams")."""

from __future__ import annotations

import asyncio
import time

import pytest
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc
from sqlalchemy import Column, MetaData, String, Table, insert, select

from shared.channels import CHANNEL_OPTIONS
from shared.db import Database, UnitOfWork
from shared.streams.lease import consumer_tables
from shared.streams.subscriptions import STOP_SECONDS, Subscriptions
from shared.tls import Channels, TlsFiles
from shared.tokens import TokenSigner
from tests.support.notification import until
from tests.support.quota import QuotaCalls, last_event_sequence, quota_server
from tests.support.servers import TEST_SECRET

WAIT = 20.0
PAY_PER_USE = "pay_per_use_recorded"

metadata = MetaData()
tables = consumer_tables(metadata)
applied = Table(
    "applied",
    metadata,
    Column("event_id", String(64), nullable=False),
    Column("event_type", String(64), nullable=False),
)


@pytest.fixture
async def consumer_db(tmp_path):
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'consumer.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield db
    await db.dispose()


@pytest.fixture
async def quota(tmp_path):
    async with quota_server(f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}", tmp_path) as q:
        yield q


@pytest.fixture
async def channels():
    channels = Channels(TlsFiles(), CHANNEL_OPTIONS)
    yield channels
    await channels.close()


def subscriptions(db: Database, channels: Channels, caller: str) -> Subscriptions:
    return Subscriptions(db, channels, TokenSigner(TEST_SECRET), caller, tables, lease_ttl=3.0)


async def record(uow: UnitOfWork, event) -> None:
    await uow.session.execute(
        insert(applied).values(event_id=event.event_id, event_type=event.WhichOneof("payload"))
    )


async def current(value):
    return value


async def rows(db: Database, table: Table) -> list:
    async with db.engine.connect() as conn:
        return list((await conn.execute(select(table))).all())


async def pay_per_use(q: QuotaCalls, count: int, prefix: str = "ppu") -> None:
    """An enabled API without a package: every successful call is pay-per-use."""
    await q.enable()
    for i in range(count):
        await q.report(f"{prefix}-{i}")


def subscribe_to_quota(subs: Subscriptions, q: QuotaCalls, apply=record):
    return subs.subscribe(
        f"quota@{q.handle.addr}",
        q.handle.addr,
        quota_service_pb2_grpc.QuotaServiceStub,
        quota_service_pb2.WatchEventsRequest,
        [PAY_PER_USE],
        apply,
    )


async def test_a_subscription_applies_the_asked_events_once_and_releases_its_lease(
    quota, consumer_db, channels
):
    await pay_per_use(quota, 3)
    subs = subscriptions(consumer_db, channels, "billing")
    consumer = subscribe_to_quota(subs, quota)
    assert subs.consumers == [consumer] and consumer.lease_ttl == 3.0
    subs.start()
    subs.start()  # a second start runs nothing twice
    last = await last_event_sequence(quota.handle, PAY_PER_USE)
    assert last > 0
    assert await consumer.wait_for(last, WAIT)
    await pay_per_use(quota, 2, prefix="live")  # live events on the open stream
    assert await consumer.wait_for(await last_event_sequence(quota.handle, PAY_PER_USE), WAIT)
    subs.quiesce()
    await subs.stop()

    recorded = await rows(consumer_db, applied)
    assert len(recorded) == 5 and {r.event_type for r in recorded} == {PAY_PER_USE}
    assert len({r.event_id for r in recorded}) == 5
    assert consumer.connects == 1 and consumer.errors == 0
    (lease,) = await rows(consumer_db, tables[1])
    assert lease.stream == f"quota@{quota.handle.addr}" and lease.expire_us == 0


async def test_the_token_names_the_subscribing_service(quota, consumer_db, channels):
    """Quota's stream admits billing and notification only: a subscription made for quota
    itself is refused (its token says `quota`), retried with backoff, and applies nothing."""
    await pay_per_use(quota, 1)
    subs = subscriptions(consumer_db, channels, "quota")
    consumer = subscribe_to_quota(subs, quota)
    subs.start()
    await until(lambda: current(consumer.errors), lambda n: n >= 2, WAIT, "two refusals")
    await subs.stop()
    assert "PERMISSION_DENIED" in str(consumer.last_error.code())
    assert consumer.applied == 0 and await rows(consumer_db, applied) == []


async def test_a_consumer_stuck_in_its_effect_is_abandoned_within_the_bound(
    quota, consumer_db, channels
):
    await pay_per_use(quota, 1)
    entered = asyncio.Event()

    async def hangs(uow: UnitOfWork, event) -> None:
        entered.set()
        await asyncio.Event().wait()  # like a write waiting on a database locked elsewhere

    subs = subscriptions(consumer_db, channels, "billing")
    consumer = subscribe_to_quota(subs, quota, apply=hangs)
    subs.start()
    await asyncio.wait_for(entered.wait(), WAIT)
    subs.quiesce()
    started = time.monotonic()
    await subs.stop()
    took = time.monotonic() - started
    assert STOP_SECONDS <= took < 2 * STOP_SECONDS + 1.0
    assert consumer.applied == 0
    # Abandoned: the lease is left to expire rather than given up on a stuck database.
    (lease,) = await rows(consumer_db, tables[1])
    assert lease.holder == consumer.holder and lease.expire_us > 0
