"""Quota's database connections dropped under load: every call answers OK or a code the caller
can retry, a retry with the same event ids completes what failed, and nothing is counted twice.

PostgreSQL only (SQLite has no connections to drop). The test terminates every backend of
quota's database once a second (`pg_terminate_backend`, what a failover or an administrator
does) while gateways report usage one by one and in batches. A dropped connection is retried
on a fresh one inside the service, then answered UNAVAILABLE (docs/faults.md "Database
faults"); never INTERNAL or UNKNOWN. The gateway retries what failed with the same event ids:
afterwards the package's used quantity is exactly the sum of the events, and every event, sent
once more, is a duplicate. The process serves throughout, without a restart.
"""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from allot.billing.v1 import billing_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from sqlalchemy import text

from shared.db import Database
from shared.errors import Unavailable
from shared.settings import DatabaseBounds
from tests.support.billing import BillingCalls, billing_env, billing_process, micros
from tests.support.databases import (
    POSTGRES_ADMIN_URL,
    create_postgres_database,
    drop_postgres_database,
)
from tests.support.quota import QuotaCalls, quota_env, quota_process
from tests.support.servers import Tokens

ACCOUNT = "acct-db-faults"
REGION = "ap-southeast-1"
API = "passport"
PACKAGE_SIZE = 10_000_000  # never exhausted: used quantity counts every recorded unit
LOAD_SECONDS = 10.0
KILL_EVERY = 1.0
SINGLE_TASKS = 3
BATCH_TASKS = 1
BATCH_SIZE = 10
CALL_TIMEOUT = 10.0
RETRY_WITHIN = 30.0
FULFIL_WITHIN = 60.0
BUYER = "acct-db-faults-buyer"
BUYER_TASKS = 2
OFFER = "passport-1k-1y"  # deploy/catalog.yaml: 1000 calls for 12 months at 2.40 USD
OFFER_QUANTITY = 1000
PRICE_MICROS = 2_400_000
TOP_UP = "10000.00"  # enough for every purchase the load can make
TOP_UP_MICROS = 10_000_000_000
START = "2024-05-01T00:00:00Z"  # quota's and billing's manual clocks
PENDING = billing_pb2.ORDER_STATE_PENDING
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())


async def fresh_postgres_database():
    url = await create_postgres_database()  # skips when PostgreSQL is unreachable (not on CI)
    try:
        yield url
    finally:
        await drop_postgres_database(url)


postgres_url = pytest.fixture(fresh_postgres_database, name="postgres_url")
# Billing's own database, beside quota's.
billing_postgres_url = pytest.fixture(fresh_postgres_database, name="billing_postgres_url")


def usage(event_id: str, quantity: int) -> quota_service_pb2.ReportUsageRequest:
    return QuotaCalls.usage(event_id, ACCOUNT, quantity, region=REGION, api=API)


def quantity_of(event_id: str) -> int:
    return 1 + zlib.crc32(event_id.encode()) % 3


@dataclass
class Load:
    acknowledged: dict[str, int] = field(default_factory=dict)  # event id -> units deducted
    failed: dict[str, grpc.StatusCode] = field(default_factory=dict)
    calls: int = 0

    def answered(self, event_id: str, response: quota_service_pb2.ReportUsageResponse) -> None:
        assert not response.HasField("error"), response
        self.acknowledged[event_id] = sum(d.quantity for d in response.deductions)
        self.failed.pop(event_id, None)


async def single_gateway(stub, task: int, load: Load, until: float) -> None:
    i = 0
    while time.monotonic() < until:
        event_id = f"s{task}-{i:05d}"
        i += 1
        load.calls += 1
        try:
            response = await stub.ReportUsage(
                usage(event_id, quantity_of(event_id)), metadata=GATEWAY, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            load.failed[event_id] = error.code()
            continue
        load.answered(event_id, response)


async def batch_gateway(stub, task: int, load: Load, until: float) -> None:
    i = 0
    while time.monotonic() < until:
        ids = [f"b{task}-{i:05d}-{k:02d}" for k in range(BATCH_SIZE)]
        i += 1
        load.calls += 1
        request = quota_service_pb2.BatchReportUsageRequest(
            requests=[usage(e, quantity_of(e)) for e in ids]
        )
        try:
            response = await stub.BatchReportUsage(request, metadata=GATEWAY, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            for event_id in ids:
                load.failed[event_id] = error.code()
            continue
        for event_id, item in zip(ids, response.responses, strict=True):
            load.answered(event_id, item)


async def killer(databases: tuple[str, ...], until: float) -> int:
    """Terminates every backend of `databases` once a second; how many it terminated."""
    killed = 0
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        while time.monotonic() < until:
            rows = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid()",
                list(databases),
            )
            killed += sum(1 for row in rows if row[0])
            await asyncio.sleep(KILL_EVERY)
    finally:
        await admin.close()
    return killed


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def grant_usage_package(stub) -> quota_pb2.Package:
    """The package the usage load deducts from (never exhausted)."""
    package = QuotaCalls.package(
        ACCOUNT, PACKAGE_SIZE, region=REGION, api=API, expire="2099-12-31T23:59:59Z"
    )
    return await stub.GrantPackage(
        quota_service_pb2.GrantPackageRequest(request_id="grant-db-faults", package=package),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )


def usage_load(stub, load: Load, until: float) -> list:
    """The gateways' calls until `until`: one by one and in batches."""
    return [
        *(single_gateway(stub, t, load, until) for t in range(SINGLE_TASKS)),
        *(batch_gateway(stub, t, load, until) for t in range(BATCH_TASKS)),
    ]


async def retry_usage(stub, load: Load) -> None:
    """The gateway retries what failed, with the same ids, until it is acknowledged."""
    deadline = time.monotonic() + RETRY_WITHIN
    while load.failed:
        assert time.monotonic() < deadline, f"still failing: {load.failed}"
        for event_id in sorted(load.failed):
            try:
                response = await stub.ReportUsage(
                    usage(event_id, quantity_of(event_id)),
                    metadata=GATEWAY,
                    timeout=CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() in RETRYABLE, error
                await asyncio.sleep(0.2)
                continue
            load.answered(event_id, response)


async def counted_once(stub, load: Load, package_id: str) -> None:
    """What was acknowledged is what was used, each event once."""
    expected = sum(quantity_of(e) for e in load.acknowledged)
    assert sum(load.acknowledged.values()) == expected
    used = (
        await stub.GetPackage(
            quota_service_pb2.GetPackageRequest(package_id=package_id),
            metadata=ADMIN,
            timeout=CALL_TIMEOUT,
        )
    ).used_quantity
    assert used == expected
    events = sorted(load.acknowledged)
    for start in range(0, len(events), 500):
        chunk = events[start : start + 500]
        again = await stub.BatchReportUsage(
            quota_service_pb2.BatchReportUsageRequest(
                requests=[usage(e, quantity_of(e)) for e in chunk]
            ),
            metadata=GATEWAY,
            timeout=CALL_TIMEOUT,
        )
        assert all(r.duplicate for r in again.responses)
    summary = await stub.GetQuotaSummary(
        quota_service_pb2.GetQuotaSummaryRequest(account_id=ACCOUNT),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )
    assert sum(item.used_quantity for item in summary.items) == expected, summary


async def test_dropped_connections_answer_retryable_and_lose_or_double_nothing(
    postgres_url, tmp_path
):
    with quota_process(quota_env(postgres_url, tmp_path), tmp_path / "quota.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
            package = await grant_usage_package(stub)

            load = Load()
            until = time.monotonic() + LOAD_SECONDS
            killed, *_ = await asyncio.gather(
                killer((database_of(postgres_url),), until), *usage_load(stub, load, until)
            )
            assert killed > 0, "no connection was terminated"
            codes = set(load.failed.values())
            assert codes <= RETRYABLE, (codes, process.log_text()[-4000:])
            assert process.proc is not None and process.proc.poll() is None, "quota died"
            print(
                f"\n{load.calls} calls, {len(load.acknowledged)} events acknowledged, "
                f"{len(load.failed)} failed ({sorted(c.name for c in codes)}), "
                f"{killed} backends terminated"
            )
            await retry_usage(stub, load)
            await counted_once(stub, load, package.package_id)

        assert process.terminate(timeout=20) == 0


@dataclass
class Purchases:
    orders: dict[str, billing_pb2.Order] = field(default_factory=dict)  # request id -> order
    failed: dict[str, grpc.StatusCode] = field(default_factory=dict)
    calls: int = 0

    def answered(self, request_id: str, order: billing_pb2.Order) -> None:
        assert order.state in (PENDING, FULFILLED), order
        self.orders[request_id] = order
        self.failed.pop(request_id, None)


async def buyer(billing: BillingCalls, task: int, purchases: Purchases, until: float) -> None:
    """Buys one package after the other, each with its own request id."""
    i = 0
    while time.monotonic() < until:
        request_id = f"buy{task}-{i:04d}"
        i += 1
        purchases.calls += 1
        try:
            order = await billing.purchase(BUYER, OFFER, REGION, request_id, CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            purchases.failed[request_id] = error.code()
            continue
        purchases.answered(request_id, order)


async def retry_purchases(billing: BillingCalls, purchases: Purchases) -> None:
    """The buyer retries what failed, with the same request ids, until it is answered."""
    deadline = time.monotonic() + RETRY_WITHIN
    while purchases.failed:
        assert time.monotonic() < deadline, f"still failing: {purchases.failed}"
        for request_id in sorted(purchases.failed):
            try:
                order = await billing.purchase(BUYER, OFFER, REGION, request_id, CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                assert error.code() in RETRYABLE, error
                await asyncio.sleep(0.2)
                continue
            purchases.answered(request_id, order)


async def all_fulfilled(billing: BillingCalls, count: int) -> list[billing_pb2.Order]:
    """The buyer's orders once all `count` of them are FULFILLED (pending ones are granted in
    the background every 2 s of wall time)."""
    deadline = time.monotonic() + FULFIL_WITHIN
    while True:
        orders = await billing.orders(BUYER)
        assert not [o for o in orders if o.state not in (PENDING, FULFILLED)], orders
        if len(orders) == count and all(o.state == FULFILLED for o in orders):
            return orders
        assert time.monotonic() < deadline, (
            f"{sum(o.state == FULFILLED for o in orders)} of {len(orders)} orders FULFILLED,"
            f" {count} bought, within {FULFIL_WITHIN} s"
        )
        await asyncio.sleep(0.5)


async def test_purchases_beside_usage_with_both_databases_dropped_are_fulfilled_once(
    postgres_url, billing_postgres_url, tmp_path
):
    """Quota and billing as processes on their own databases, every backend of both
    terminated once a second while gateways report usage and a buyer purchases packages:
    every call answers OK or a retryable code; retried with the same ids, every purchase is
    FULFILLED, granted once in quota and charged once, nothing is refunded, usage is counted
    once, and both processes serve on without a restart."""
    quota_dir, billing_dir = tmp_path / "quota", tmp_path / "billing"
    quota_dir.mkdir()
    billing_dir.mkdir()
    q_env = quota_env(postgres_url, quota_dir, ALLOT_CLOCK="manual", ALLOT_CLOCK_START=START)
    with quota_process(q_env, tmp_path / "quota.log") as quota:
        b_env = billing_env(billing_postgres_url, billing_dir, quota.addr, START)
        with billing_process(b_env, tmp_path / "billing.log") as billing_proc:
            pids = (quota.proc.pid, billing_proc.proc.pid)
            async with (
                grpc.aio.insecure_channel(quota.addr) as quota_channel,
                grpc.aio.insecure_channel(billing_proc.addr) as billing_channel,
            ):
                stub = quota_service_pb2_grpc.QuotaServiceStub(quota_channel)
                billing = BillingCalls(billing_channel)
                package = await grant_usage_package(stub)
                await billing.create_account(BUYER)
                await billing.top_up(BUYER, TOP_UP, request_id="top-up-buyer")

                load, purchases = Load(), Purchases()
                until = time.monotonic() + LOAD_SECONDS
                killed, *_ = await asyncio.gather(
                    killer((database_of(postgres_url), database_of(billing_postgres_url)), until),
                    *usage_load(stub, load, until),
                    *(buyer(billing, t, purchases, until) for t in range(BUYER_TASKS)),
                )
                logs = quota.log_text()[-3000:] + billing_proc.log_text()[-3000:]
                assert killed > 0, "no connection was terminated"
                codes = set(load.failed.values()) | set(purchases.failed.values())
                assert codes <= RETRYABLE, (codes, logs)
                print(
                    f"\n{load.calls} usage calls ({len(load.failed)} events failed), "
                    f"{purchases.calls} purchases ({len(purchases.failed)} failed), "
                    f"{sorted(c.name for c in codes)}, {killed} backends terminated"
                )
                assert purchases.orders or purchases.failed, "no purchase was made"

                await retry_usage(stub, load)
                await retry_purchases(billing, purchases)
                await counted_once(stub, load, package.package_id)

                # One order per request id, each FULFILLED, none refunded.
                bought = {o.order_id for o in purchases.orders.values()}
                assert len(bought) == len(purchases.orders)
                orders = await all_fulfilled(billing, len(bought))
                assert {o.order_id for o in orders} == bought
                # Quota holds exactly one package per order, of the offer's size.
                packages = (
                    await stub.ListPackages(
                        quota_service_pb2.ListPackagesRequest(account_id=BUYER, page_size=1000),
                        metadata=ADMIN,
                        timeout=CALL_TIMEOUT,
                    )
                ).packages
                assert sorted(p.order_id for p in packages) == sorted(bought)
                assert {p.total_quantity for p in packages} == {OFFER_QUANTITY}
                assert {o.package_id for o in orders} == {p.package_id for p in packages}
                # Charged exactly once per order: the balance and the bill's lines.
                account = await billing.get_account(BUYER)
                assert micros(account.balance) == TOP_UP_MICROS - len(bought) * PRICE_MICROS
                bill = await billing.get_bill(BUYER, START[:7])
                kinds = [line.kind for line in bill.lines]
                assert billing_pb2.BILL_LINE_KIND_REFUND not in kinds, bill
                purchase_lines = [
                    line
                    for line in bill.lines
                    if line.kind == billing_pb2.BILL_LINE_KIND_PACKAGE_PURCHASE
                ]
                assert sorted(line.order_id for line in purchase_lines) == sorted(bought)
                assert {micros(line.amount) for line in purchase_lines} == {-PRICE_MICROS}

            # The same processes served throughout.
            for process, pid in zip((quota, billing_proc), pids, strict=True):
                assert process.proc.pid == pid and process.proc.poll() is None
            assert billing_proc.terminate(timeout=20) == 0
        assert quota.terminate(timeout=20) == 0


async def test_a_connection_that_keeps_dying_or_a_statement_that_outlasts_its_bound_is_unavailable(
    postgres_url,
):
    """The bounds themselves, on the shared Database: a transaction whose connection dies on
    every attempt is tried ALLOT_DB_RETRY_ATTEMPTS times, then UNAVAILABLE; a statement longer
    than ALLOT_DB_COMMAND_TIMEOUT_SECONDS is cut off by then and UNAVAILABLE; the pool is left
    with live connections only and serves the next transaction."""
    bounds = DatabaseBounds(command_timeout=1, retry_attempts=3)
    db = Database(postgres_url, bounds)
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    attempts = 0

    async def killed_every_time(uow):
        nonlocal attempts
        attempts += 1
        pid = (await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await uow.session.execute(text("SELECT 1"))

    try:
        with pytest.raises(Unavailable) as raised:
            await db.transaction(killed_every_time)
        assert raised.value.reason == "DATABASE_UNAVAILABLE"
        assert attempts == bounds.retry_attempts

        started = time.monotonic()
        with pytest.raises(Unavailable):
            await db.read(lambda uow: uow.session.execute(text("SELECT pg_sleep(30)")))
        assert time.monotonic() - started < bounds.command_timeout + 2

        assert await db.read(lambda uow: uow.rows(text("SELECT 1"))) == [(1,)]

        # Our end of the socket probes a silent peer (asyncpg has no option for it).
        async with db.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            sock = raw.driver_connection._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == bounds.keepalive
    finally:
        await admin.close()
        await db.dispose()
