"""Purchases through real billing and quota servers (in-process, SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import asyncpg
import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from allot.quota.v1 import quota_pb2, quota_service_pb2
from google.type import money_pb2

from services.billing.service import BillingService
from shared.server import Server, build_runtime
from shared.settings import Settings
from shared.status import error_info
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.notification import until
from tests.support.quota import quota_settings, running_quota
from tests.support.servers import TEST_SECRET, Tokens, free_port

REQ = billing_service_pb2
ADMIN = Tokens.md(Tokens().admin())
START = "2023-04-19T06:25:10Z"  # 2023-04-19 14:25:10 in UTC+08:00


@contextlib.asynccontextmanager
async def running_billing(database_url, tmp_path, quota_addr):
    settings = Settings.from_env(
        environ={},
        data_dir=str(tmp_path),
        billing_database_url=database_url,
        billing_addr="127.0.0.1:0",
        quota_addr=quota_addr,
        auth_secret=TEST_SECRET,
        shutdown_grace="2",
        clock="manual",
        clock_start=START,
    )
    runtime = build_runtime(settings, "billing")
    server = Server(runtime, BillingService(runtime), settings.billing_addr)
    await server.start()
    channel = grpc.aio.insecure_channel(server.bound_addr)
    try:
        yield billing_service_pb2_grpc.BillingServiceStub(channel)
    finally:
        await channel.close()
        await server.stop()


@contextlib.asynccontextmanager
async def second_database(kind, tmp_path):
    """Billing's own database, of the same dialect as quota's."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
        return
    url = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(url)


def dialect(database_url: str) -> str:
    return "sqlite" if database_url.startswith("sqlite") else "postgresql"


async def funded(billing, account_id: str, units: int) -> None:
    await billing.CreateAccount(
        REQ.CreateAccountRequest(account=billing_pb2.Account(account_id=account_id)),
        metadata=ADMIN,
    )
    await billing.TopUp(
        REQ.TopUpRequest(
            request_id=f"fund-{account_id}",
            account_id=account_id,
            amount=money_pb2.Money(currency_code="USD", units=units),
        ),
        metadata=ADMIN,
    )


def purchase(account_id: str, request_id: str = "buy-1", **fields):
    return REQ.PurchasePackageRequest(
        request_id=request_id,
        account_id=account_id,
        offer_id="passport-100k-1y",
        region="ap-southeast-1",
        **fields,
    )


async def balance(billing, account_id: str) -> tuple[int, int]:
    account = await billing.GetAccount(REQ.GetAccountRequest(account_id=account_id), metadata=ADMIN)
    return account.balance.units, account.balance.nanos


async def packages(quota, account_id: str) -> list[quota_pb2.Package]:
    listing = await quota.stub.ListPackages(
        quota_service_pb2.ListPackagesRequest(account_id=account_id), metadata=ADMIN
    )
    return list(listing.packages)


async def test_purchase_grants_a_year_to_the_last_second_and_charges_once(database_url, tmp_path):
    settings = quota_settings(database_url, tmp_path, clock="manual", clock_start=START)
    async with (
        running_quota(settings) as quota,
        second_database(dialect(database_url), tmp_path) as billing_url,
        running_billing(billing_url, tmp_path, quota.addr) as billing,
    ):
        await funded(billing, "acme", 200)
        order = await billing.PurchasePackage(purchase("acme"), metadata=ADMIN)
        assert order.state == billing_pb2.ORDER_STATE_FULFILLED
        assert (order.amount.units, order.amount.nanos) == (180, 0)
        again = await billing.PurchasePackage(purchase("acme"), metadata=ADMIN)
        assert again.order_id == order.order_id
        assert await balance(billing, "acme") == (20, 0)
        (package,) = await packages(quota, "acme")
        assert package.package_id == order.package_id
        assert package.order_id == order.order_id
        assert package.total_quantity == 100_000
        # 2024-04-19 23:59:59 in UTC+08:00.
        assert package.expire_time.ToJsonString() == "2024-04-19T15:59:59Z"
        assert package.state == quota_pb2.PACKAGE_STATE_ACTIVE

        with pytest.raises(grpc.aio.AioRpcError) as short:
            await billing.PurchasePackage(purchase("acme", "buy-2"), metadata=ADMIN)
        assert short.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(short.value).reason == "INSUFFICIENT_BALANCE"
        assert await balance(billing, "acme") == (20, 0)


async def test_purchase_waits_for_quota_and_is_granted_once(tmp_path):
    port = free_port()
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    async with running_billing(
        f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}", tmp_path, f"127.0.0.1:{port}"
    ) as billing:
        await funded(billing, "acme", 200)
        order = await billing.PurchasePackage(purchase("acme"), metadata=ADMIN)
        assert order.state == billing_pb2.ORDER_STATE_PENDING
        assert await balance(billing, "acme") == (20, 0)  # paid at once

        settings = quota_settings(
            database_url,
            tmp_path,
            clock="manual",
            clock_start=START,
            quota_addr=f"127.0.0.1:{port}",
        )
        async with running_quota(settings) as quota:
            for _ in range(100):  # bounded: ~20 s
                order = await billing.GetOrder(
                    REQ.GetOrderRequest(order_id=order.order_id), metadata=ADMIN
                )
                if order.state != billing_pb2.ORDER_STATE_PENDING:
                    break
                await asyncio.sleep(0.2)
            assert order.state == billing_pb2.ORDER_STATE_FULFILLED
            (package,) = await packages(quota, "acme")
            assert package.package_id == order.package_id
            # Effective from the payment instant, although granted later.
            assert package.effective_time.ToJsonString() == "2023-04-19T06:25:10Z"


async def test_a_future_order_can_be_cancelled_for_a_full_refund(database_url, tmp_path):
    settings = quota_settings(database_url, tmp_path, clock="manual", clock_start=START)
    async with (
        running_quota(settings) as quota,
        second_database(dialect(database_url), tmp_path) as billing_url,
        running_billing(billing_url, tmp_path, quota.addr) as billing,
    ):
        await funded(billing, "acme", 400)
        later = purchase("acme", "buy-later", effective_time={"seconds": 1700000000})
        order = await billing.PurchasePackage(later, metadata=ADMIN)
        assert order.state == billing_pb2.ORDER_STATE_FULFILLED
        cancelled = await billing.CancelOrder(
            REQ.CancelOrderRequest(request_id="c1", order_id=order.order_id), metadata=ADMIN
        )
        assert cancelled.state == billing_pb2.ORDER_STATE_CANCELLED
        assert await balance(billing, "acme") == (400, 0)
        (package,) = await packages(quota, "acme")
        assert package.state == quota_pb2.PACKAGE_STATE_REVOKED

        now = await billing.PurchasePackage(purchase("acme", "buy-now"), metadata=ADMIN)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await billing.CancelOrder(
                REQ.CancelOrderRequest(request_id="c2", order_id=now.order_id), metadata=ADMIN
            )
        assert error_info(refused.value).reason == "ORDER_NOT_CANCELLABLE"
        listing = await billing.ListOrders(REQ.ListOrdersRequest(account_id="acme"), metadata=ADMIN)
        assert {o.order_id for o in listing.orders} == {order.order_id, now.order_id}


async def test_subscribing_through_billing_enables_the_api_in_quota(database_url, tmp_path):
    settings = quota_settings(database_url, tmp_path, clock="manual", clock_start=START)
    async with (
        running_quota(settings) as quota,
        second_database(dialect(database_url), tmp_path) as billing_url,
        running_billing(billing_url, tmp_path, quota.addr) as billing,
    ):
        await funded(billing, "acme", 1)
        request = REQ.SubscribeApiRequest(
            request_id="sub-1", account_id="acme", region="ap-southeast-1", api="passport"
        )
        subscription = await billing.SubscribeApi(request, metadata=ADMIN)
        assert subscription.state == billing_pb2.API_SUBSCRIPTION_STATE_ACTIVE
        check = quota_service_pb2.CheckQuotaRequest(
            account_id="acme", region="ap-southeast-1", api="passport"
        )
        assert (await quota.stub.CheckQuota(check, metadata=ADMIN)).allowed
        await billing.UnsubscribeApi(
            REQ.UnsubscribeApiRequest(
                request_id="unsub-1", account_id="acme", region="ap-southeast-1", api="passport"
            ),
            metadata=ADMIN,
        )
        denied = await quota.stub.CheckQuota(check, metadata=ADMIN)
        assert denied.deny_reason == quota_service_pb2.DENY_REASON_API_NOT_SUBSCRIBED
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await billing.SubscribeApi(
                REQ.SubscribeApiRequest(
                    request_id="sub-2", account_id="acme", region="ap-southeast-1", api="nope"
                ),
                metadata=ADMIN,
            )
        assert error_info(unknown.value).reason == "UNKNOWN_API"


async def test_subscriptions_without_request_id_each_reach_quota(database_url, tmp_path):
    """Regression: quota's key was derived from the account alone, so the second subscribe of
    another API was answered from the first one's stored reply: billing said ACTIVE while quota
    denied."""
    settings = quota_settings(database_url, tmp_path, clock="manual", clock_start=START)
    async with (
        running_quota(settings) as quota,
        second_database(dialect(database_url), tmp_path) as billing_url,
        running_billing(billing_url, tmp_path, quota.addr) as billing,
    ):
        await funded(billing, "acme", 1)
        own = Tokens.md(Tokens().account("acme"))

        def check(api):
            return quota.stub.CheckQuota(
                quota_service_pb2.CheckQuotaRequest(
                    account_id="acme", region="ap-southeast-1", api=api
                ),
                metadata=ADMIN,
            )

        def change(rpc, api, request_id=""):
            request = getattr(REQ, f"{rpc}Request")(
                request_id=request_id, account_id="acme", region="ap-southeast-1", api=api
            )
            return getattr(billing, rpc)(request, metadata=own)

        for api in ("passport", "id-card"):
            subscribed = await change("SubscribeApi", api)
            assert (subscribed.api, subscribed.state) == (
                api,
                billing_pb2.API_SUBSCRIPTION_STATE_ACTIVE,
            )
        assert (await check("passport")).allowed and (await check("id-card")).allowed

        cancelled = await change("UnsubscribeApi", "passport")
        assert cancelled.state == billing_pb2.API_SUBSCRIPTION_STATE_CANCELLED
        denied = await check("passport")
        assert denied.deny_reason == quota_service_pb2.DENY_REASON_API_NOT_SUBSCRIBED
        assert (await check("id-card")).allowed
        # Without a request_id every call is a command of its own: subscribing again works.
        assert (await change("SubscribeApi", "passport")).state == (
            billing_pb2.API_SUBSCRIPTION_STATE_ACTIVE
        )
        assert (await check("passport")).allowed

        # With a request_id: two subscriptions never share quota's key, and a replay answers
        # the first reply without telling quota anything (billing and quota stay agreed).
        first = await change("SubscribeApi", "general-text", "sub-1")
        assert first.state == billing_pb2.API_SUBSCRIPTION_STATE_ACTIVE
        await change("UnsubscribeApi", "general-text")
        assert await change("SubscribeApi", "general-text", "sub-1") == first
        denied = await check("general-text")
        assert denied.deny_reason == quota_service_pb2.DENY_REASON_API_NOT_SUBSCRIBED
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await change("SubscribeApi", "passport", "sub-1")
        assert error_info(reused.value).reason == "REQUEST_ID_REUSED"
        listing = await quota.stub.ListApiSubscriptions(
            quota_service_pb2.ListApiSubscriptionsRequest(account_id="acme"), metadata=ADMIN
        )
        assert {(s.api, s.state) for s in listing.api_subscriptions} == {
            ("passport", quota_pb2.API_SUBSCRIPTION_STATE_ACTIVE),
            ("id-card", quota_pb2.API_SUBSCRIPTION_STATE_ACTIVE),
            ("general-text", quota_pb2.API_SUBSCRIPTION_STATE_CANCELLED),
        }


def internal_errors(caplog: pytest.LogCaptureFixture) -> int:
    """How many INTERNAL answers the in-process servers logged (shared/status.py)."""
    return sum(r.getMessage().startswith("internal error ") for r in caplog.records)


class MovedTable:
    """Quota's `packages` table renamed away under the running server, and back: every grant
    then fails inside quota with an error it cannot classify, which it answers INTERNAL."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url

    async def _execute(self, statement: str) -> None:
        if self.url.startswith("sqlite"):
            path = self.url.split(":///", 1)[1]

            def run() -> None:
                with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
                    conn.execute(statement)
                    conn.commit()

            await asyncio.to_thread(run)
            return
        conn = await asyncpg.connect(self.url.replace("+asyncpg", ""), timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def away(self) -> None:
        await self._execute("ALTER TABLE packages RENAME TO packages_away")

    async def back(self) -> None:
        await self._execute("ALTER TABLE packages_away RENAME TO packages")


async def test_purchase_stays_pending_while_quota_answers_internal(database_url, tmp_path, caplog):
    """INTERNAL from quota says nothing about the request (docs/faults.md, "Callers classify
    codes"): the order stays PENDING, paid and not refunded, and is granted exactly once when
    quota works again."""
    settings = quota_settings(database_url, tmp_path, clock="manual", clock_start=START)
    table = MovedTable(database_url)
    async with (
        running_quota(settings) as quota,
        second_database(dialect(database_url), tmp_path) as billing_url,
        running_billing(billing_url, tmp_path, quota.addr) as billing,
    ):
        await funded(billing, "acme", 200)
        await table.away()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as broken:  # the fault is real
                await quota.stub.GrantPackage(
                    quota_service_pb2.GrantPackageRequest(
                        request_id="probe",
                        package=quota_pb2.Package(
                            account_id="acme",
                            region="ap-southeast-1",
                            api="passport",
                            source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                            total_quantity=1,
                            expire_time={"seconds": 4102444799},
                        ),
                    ),
                    metadata=ADMIN,
                )
            assert broken.value.code() == grpc.StatusCode.INTERNAL

            order = await billing.PurchasePackage(purchase("acme"), metadata=ADMIN)
            assert order.state == billing_pb2.ORDER_STATE_PENDING
            # Billing offers pending orders again (every 2 s): still pending after a retry
            # reached quota, each attempt one more INTERNAL that quota logs.
            retried = internal_errors(caplog) + 1
            await until(
                lambda: asyncio.sleep(0, internal_errors(caplog)),
                lambda seen: seen >= retried,
                within=30,
                what="a retried grant reaching quota",
            )
            order = await billing.GetOrder(
                REQ.GetOrderRequest(order_id=order.order_id), metadata=ADMIN
            )
            assert order.state == billing_pb2.ORDER_STATE_PENDING
            assert await balance(billing, "acme") == (20, 0)  # paid, not refunded
        finally:
            await table.back()

        for _ in range(100):  # bounded: ~20 s
            order = await billing.GetOrder(
                REQ.GetOrderRequest(order_id=order.order_id), metadata=ADMIN
            )
            if order.state != billing_pb2.ORDER_STATE_PENDING:
                break
            await asyncio.sleep(0.2)
        assert order.state == billing_pb2.ORDER_STATE_FULFILLED
        (package,) = await packages(quota, "acme")
        assert package.order_id == order.order_id
        assert await balance(billing, "acme") == (20, 0)
