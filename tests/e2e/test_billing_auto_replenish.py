"""Auto-replenish end to end (docs/design/auto-replenish.md): quota, two billing replicas on one
billing database and notification as processes (SQLite, manual clocks the test moves together),
a real SMTP server on loopback as the customer's inbox.

"acme" has 7.20 USD, buys passport-1k-1y (deploy/catalog.yaml: 1000 calls for 12 months at
2.40 USD) and asks for another one whenever 100 calls or fewer are left, at most once a month. A
contact of acme is subscribed by email to MESSAGE_TYPE_AUTO_REPLENISH_FAILED only.

- 20 concurrent reporters use 900 calls: one crossing, one AUTO_REPLENISH order, one package
  granted (1100 of 2000 left).
- 1000 more calls: the second crossing of January is over the limit: `auto_replenish_failed`
  (AUTO_REPLENISH_LIMIT_REACHED) and exactly one email.
- 2024-02-01 00:00 (billing time zone): the rule is re-armed, still at 100 left, and buys at
  once: 1100 of 3000 left, the balance is 0.

Times are in the billing time zone (Asia/Shanghai, UTC+08:00). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.notification.v1 import notification_pb2
from allot.testing.v1 import clock_service_pb2

from tests.support.billing import (
    BILLING_TZ,
    SETTLE_TIMEOUT,
    BillingCalls,
    billing_env,
    billing_process,
    local,
    micros,
    paired_env,
)
from tests.support.calls import ts
from tests.support.notification import (
    EMAIL,
    SENT,
    NotificationCalls,
    notification_env,
    notification_process,
    until,
)
from tests.support.quota import QuotaCalls, quota_calls, quota_process
from tests.support.receivers import SmtpInbox, smtp_receiver

TZ = BILLING_TZ
START = "2024-01-10T00:00:00Z"  # 2024-01-10 08:00 in the billing time zone
ACCOUNT = "acme"
ADDRESS = "ops+acme@example.com"
HK = "ap-southeast-1"
API = "passport"
OFFER = "passport-1k-1y"
PRICE = 2_400_000  # 2.40 USD in micros

FAILED_TYPE = notification_pb2.MESSAGE_TYPE_AUTO_REPLENISH_FAILED
AUTO = billing_pb2.ORDER_KIND_AUTO_REPLENISH
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED


@dataclass
class Suite:
    quota: QuotaCalls
    billing: list[BillingCalls]
    notification: NotificationCalls
    inbox: SmtpInbox

    async def move(self, at: datetime) -> None:
        """Every manual clock to `at`: quota's first (billing re-arms its rule there), the
        billing replicas' last, so their due work runs against the others' new time."""
        await self.quota.set_time(at)
        await self.notification.clock.SetTime(
            clock_service_pb2.SetTimeRequest(time=ts(at)),
            metadata=self.notification.admin,
            timeout=SETTLE_TIMEOUT,
        )
        for replica in self.billing:
            await replica.set_time(at)

    async def remaining(self) -> tuple[int, int]:
        (item,) = (await self.quota.summary(ACCOUNT, region=HK, api=API)).items
        return item.total_quantity, item.remaining_quantity

    async def auto_orders(self) -> list[billing_pb2.Order]:
        return [o for o in await self.billing[0].orders(ACCOUNT) if o.kind == AUTO]

    async def fulfilled(self, count: int) -> list[billing_pb2.Order]:
        """acme's auto-replenish orders once there are `count`, all FULFILLED, and quota shows
        their packages."""
        found = await until(
            self.auto_orders,
            lambda orders: len(orders) >= count and all(o.state == FULFILLED for o in orders),
            what=f"{count} fulfilled auto-replenish orders",
        )
        assert len(found) == count, found
        return found

    async def failures(self, count: int) -> list[billing_pb2.AutoReplenishFailed]:
        events = await until(
            lambda: self.billing[1].events(types=("auto_replenish_failed",)),
            lambda found: len(found) >= count,
            what=f"{count} auto_replenish_failed events",
        )
        return [e.auto_replenish_failed for e in events]


async def test_auto_replenish_buys_once_per_crossing_mails_the_limit_and_buys_next_month(
    tmp_path,
):
    q_env, b_env = paired_env(tmp_path, START)
    second = tmp_path / "billing-2"
    second.mkdir()
    n_data = tmp_path / "notification"
    n_data.mkdir()
    with smtp_receiver() as inbox, quota_process(q_env, tmp_path / "quota.log") as quota_proc:
        b_env["ALLOT_QUOTA_ADDR"] = quota_proc.addr
        b2_env = billing_env(b_env["ALLOT_BILLING_DATABASE_URL"], second, quota_proc.addr, START)
        n_env = notification_env(
            f"sqlite+aiosqlite:///{n_data / 'notification.db'}",
            n_data,
            quota_proc.addr,
            ALLOT_BILLING_ADDR=b_env["ALLOT_BILLING_ADDR"],
            ALLOT_CLOCK_START=START,
            ALLOT_SMTP_URL=inbox.url(),
        )
        # One after the other: the first migrates the shared database.
        with billing_process(b_env, tmp_path / "billing.log") as first_proc:
            with (
                billing_process(b2_env, second / "billing.log") as second_proc,
                notification_process(n_env, n_data / "notification.log") as notification_proc,
            ):
                async with (
                    grpc.aio.insecure_channel(quota_proc.addr) as qc,
                    grpc.aio.insecure_channel(first_proc.addr) as bc1,
                    grpc.aio.insecure_channel(second_proc.addr) as bc2,
                    grpc.aio.insecure_channel(notification_proc.addr) as nc,
                ):
                    suite = Suite(
                        quota_calls(qc),
                        [BillingCalls(bc1), BillingCalls(bc2)],
                        NotificationCalls(nc),
                        inbox,
                    )
                    await walk_through(suite)


async def walk_through(suite: Suite) -> None:
    first, second = suite.billing
    await suite.notification.create(ACCOUNT, EMAIL, ADDRESS, [FAILED_TYPE])
    await first.create_account(ACCOUNT)
    await first.top_up(ACCOUNT, "7.20", request_id="fund-1")
    placed = await first.stub.PurchasePackage(
        billing_service_pb2.PurchasePackageRequest(
            request_id="buy", account_id=ACCOUNT, offer_id=OFFER, region=HK
        ),
        metadata=first.admin,
    )
    await until(
        lambda: first.stub.GetOrder(
            billing_service_pb2.GetOrderRequest(order_id=placed.order_id), metadata=first.admin
        ),
        lambda o: o.state == FULFILLED,
        what="the purchase fulfilled",
    )
    # Set through the other replica, with the account's own token.
    own = second.tokens.md(second.tokens.account(ACCOUNT))
    setting = await second.stub.SetAutoReplenish(
        billing_service_pb2.SetAutoReplenishRequest(
            request_id="replenish",
            account_id=ACCOUNT,
            region=HK,
            api=API,
            offer_id=OFFER,
            below_quantity=100,
            max_per_month=1,
            enabled=True,
        ),
        metadata=own,
    )
    assert (setting.enabled, setting.month_purchases) == (True, 0)

    # 20 reporters at once, 45 calls each: 100 left, one crossing, one purchase.
    await asyncio.gather(*(suite.quota.report(f"burst-{i}", ACCOUNT, 45) for i in range(20)))
    (order,) = await suite.fulfilled(1)
    assert (order.offer_id, order.quantity, micros(order.amount)) == (OFFER, 1000, PRICE)
    assert await suite.remaining() == (2000, 1100)

    # 1000 more: the second crossing of January is over the limit of one.
    await suite.quota.report("more", ACCOUNT, 1000)
    (failed,) = await suite.failures(1)
    assert (failed.reason, failed.month_purchases, failed.remaining_quantity) == (
        "AUTO_REPLENISH_LIMIT_REACHED",
        1,
        100,
    )
    notified = await suite.notification.settled(ACCOUNT, 1, [FAILED_TYPE])
    assert [(d.channel, d.state) for n in notified for d in n.deliveries] == [(EMAIL, SENT)]
    mails = [m for m in suite.inbox.messages if ADDRESS in m.rcpt_tos]
    assert len(mails) == 1
    assert "AUTO_REPLENISH_LIMIT_REACHED" in mails[0].message.get_content()
    assert len(await suite.auto_orders()) == 1
    assert await suite.remaining() == (2000, 100)

    # February in the billing time zone: the rule is re-armed and buys at once.
    await suite.move(local("2024-02-01 00:00"))
    orders = await suite.fulfilled(2)
    assert await suite.remaining() == (3000, 1100)
    assert micros((await first.get_account(ACCOUNT)).balance) == 0
    assert {o.order_id for o in orders} >= {order.order_id}
    assert len(await suite.failures(1)) == 1
