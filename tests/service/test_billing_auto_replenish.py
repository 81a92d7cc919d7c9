"""Auto-replenish through real servers (docs/design/auto-replenish.md): one quota, two billing
replicas on one billing database following it, and a notification server where a test needs
delivery; manual clocks, SQLite or PostgreSQL.

The catalog sells passport-100-1y (100 calls, 1.00 USD) everywhere and general-text-100-1y of
another API. The setting buys passport-100-1y whenever 20 calls or fewer are left, at most twice
a month (billing time zone, UTC+08:00).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.notification.v1 import notification_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2
from sqlalchemy import select

from services.billing.adapters import tables as billing_tables
from tests.support.billing import (
    TEST_CATALOG,
    BillingCalls,
    BillingHandle,
    billing_settings,
    local,
    micros,
    running_billing,
)
from tests.support.calls import expect_error
from tests.support.events import THRESHOLD_CROSSED, AlertCalls, payloads
from tests.support.notification import (
    EMAIL,
    NotificationHandle,
    notification_settings,
    running_notification,
)
from tests.support.notification import until as read_until
from tests.support.quota import QuotaCalls, last_event_sequence, running_quota
from tests.support.quota import quota_settings as quota_settings_for
from tests.support.receivers import closed_port

REQ = billing_service_pb2
CATALOG = (
    TEST_CATALOG
    + """\
  - {id: general-text-100-1y, api: general-text, quantity: 100, validity_months: 12,
     price: "1.00"}
"""
)
START = "2024-01-10T00:00:00Z"  # 2024-01-10 08:00 in the billing time zone
HK = "ap-southeast-1"
API = "passport"
OFFER = "passport-100-1y"
ACCOUNT = "acme"
AUTO = billing_pb2.ORDER_KIND_AUTO_REPLENISH
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED
FAILED_TYPE = notification_pb2.MESSAGE_TYPE_AUTO_REPLENISH_FAILED
WITHIN = 30.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Suite:
    quota: QuotaCalls
    replicas: list[BillingHandle]
    notification: NotificationHandle | None = None

    @property
    def billing(self) -> BillingCalls:
        return self.replicas[0].calls

    async def move(self, text: str) -> None:
        """Every clock to a billing-time-zone instant; quota first, so billing's due work (the
        re-arm of a rule) meets quota at the new time."""
        at = local(text)
        await self.quota.set_time(at)
        for replica in self.replicas:
            await replica.calls.set_time(at)

    async def account(self, balance: str) -> None:
        await self.billing.create_account(ACCOUNT)
        await self.billing.top_up(ACCOUNT, balance)

    def set_replenish(self, request_id: str = "set-1", metadata=None, **fields):
        values = {
            "account_id": ACCOUNT,
            "region": HK,
            "api": API,
            "offer_id": OFFER,
            "below_quantity": 20,
            "max_per_month": 2,
            "enabled": True,
            **fields,
        }
        return self.billing.stub.SetAutoReplenish(
            REQ.SetAutoReplenishRequest(request_id=request_id, **values),
            metadata=metadata or self.billing.admin,
        )

    def get_replenish(self, metadata=None, **fields):
        values = {"account_id": ACCOUNT, "region": HK, "api": API, **fields}
        return self.billing.stub.GetAutoReplenish(
            REQ.GetAutoReplenishRequest(**values), metadata=metadata or self.billing.admin
        )

    async def remaining(self) -> tuple[int, int]:
        """(in force, remaining) of the account's passport packages in HK."""
        (item,) = (await self.quota.summary(ACCOUNT, region=HK, api=API)).items
        return item.total_quantity, item.remaining_quantity

    async def auto_orders(self) -> list[billing_pb2.Order]:
        return [o for o in await self.billing.orders(ACCOUNT) if o.kind == AUTO]

    async def caught_up(self) -> None:
        """Billing (whichever replica holds the lease) has taken every event quota has
        written so far, and no auto-replenish order is left pending."""
        # Billing asks its stream for these two types only: its cursor ends at the last of them.
        sequence = max(
            [
                await last_event_sequence(self.quota.handle, kind)
                for kind in ("pay_per_use_recorded", "threshold_crossed")
            ]
        )
        stream = f"quota@{self.quota.handle.addr}"
        cursors = billing_tables.consumer_cursors.c
        db = self.replicas[0].server.runtime.db

        async def cursor() -> int:
            rows = await db.read(
                lambda uow: uow.rows(select(cursors.sequence).where(cursors.stream == stream))
            )
            return rows[0].sequence if rows else 0

        await read_until(cursor, lambda at: at >= sequence, WITHIN, f"billing at {sequence}")
        await read_until(
            self.auto_orders,
            lambda found: all(o.state != billing_pb2.ORDER_STATE_PENDING for o in found),
            WITHIN,
            "no pending auto-replenish order",
        )

    async def failures(self) -> list[billing_pb2.AutoReplenishFailed]:
        events = await self.billing.events(types=("auto_replenish_failed",))
        return [e.auto_replenish_failed for e in events]

    async def report_concurrently(self, prefix: str, count: int) -> None:
        """`count` ReportUsage calls of one call each, all at once."""
        await asyncio.gather(
            *(self.quota.report(f"{prefix}-{i}", ACCOUNT, 1) for i in range(count))
        )


@contextlib.asynccontextmanager
async def running_suite(
    urls, tmp_path, replicas: int = 2, with_notification: bool = False, overview: bool = False
):
    """Quota, billing replicas and, `with_notification`, notification following billing's
    stream too; with `overview` instead, notification follows quota alone and is started first,
    so billing's account overview can ask it who hears usage alerts."""
    quota_url, billing_url = urls
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    (tmp_path / "quota").mkdir()
    settings = quota_settings_for(
        quota_url, tmp_path / "quota", clock="manual", clock_start=START, catalog=str(catalog)
    )
    async with running_quota(settings) as quota, contextlib.AsyncExitStack() as stack:
        first = None
        extra = {}
        if overview:
            data = tmp_path / "notification"
            data.mkdir()
            values = notification_settings(
                f"sqlite+aiosqlite:///{data / 'n.db'}",
                data,
                quota.addr,
                clock_start=START,
                catalog=str(catalog),
            )
            first = await stack.enter_async_context(running_notification(values))
            extra["notification_addr"] = first.server.bound_addr
        handles = []
        for n in range(replicas):  # one after the other: the first migrates the database
            data = tmp_path / f"billing-{n}"
            data.mkdir()
            values = billing_settings(
                billing_url, data, quota.addr, START, catalog=str(catalog), **extra
            )
            handles.append(await stack.enter_async_context(running_billing(values)))
        suite = Suite(QuotaCalls(quota), handles, first)
        if with_notification:
            data = tmp_path / "notification"
            data.mkdir()
            values = notification_settings(
                f"sqlite+aiosqlite:///{data / 'n.db'}",
                data,
                quota.addr,
                billing_addr=handles[0].server.bound_addr,
                clock_start=START,
                catalog=str(catalog),
            )
            suite.notification = await stack.enter_async_context(running_notification(values))
        yield suite


@pytest.fixture
async def suite(quota_and_billing_urls, tmp_path):
    async with running_suite(quota_and_billing_urls, tmp_path) as s:
        yield s


async def buy_first_package(suite: Suite) -> None:
    order = await suite.billing.stub.PurchasePackage(
        REQ.PurchasePackageRequest(
            request_id="first", account_id=ACCOUNT, offer_id=OFFER, region=HK
        ),
        metadata=suite.billing.admin,
    )
    assert order.state == FULFILLED


# --- exactly once per crossing ---------------------------------------------------------------


async def test_one_purchase_per_crossing_with_20_reporters_and_two_replicas_up_to_the_month_limit(
    suite,
):
    await suite.account("10.00")
    await buy_first_package(suite)
    setting = await suite.set_replenish()
    assert (setting.enabled, setting.month_purchases, setting.below_quantity) == (True, 0, 20)
    assert setting.alert_id

    # 79 calls leave 21: nothing. 20 concurrent calls cross 20 once (on the call leaving 20).
    await suite.quota.report("warm-up", ACCOUNT, 79)
    await suite.caught_up()
    assert await suite.auto_orders() == []
    await suite.report_concurrently("first", 20)
    await suite.caught_up()
    (order,) = await suite.auto_orders()
    assert (order.state, order.offer_id, order.region, order.api) == (FULFILLED, OFFER, HK, API)
    assert micros(order.amount) == 1_000_000
    # Granted once in quota: 1 call left + 100 bought, of 200 in force.
    assert await suite.remaining() == (200, 101)
    assert len(await suite.quota.package_ids(ACCOUNT)) == 2

    # Used down again: it buys again (the grant re-armed the rule).
    await suite.report_concurrently("second", 20)
    await suite.quota.report("down-2", ACCOUNT, 61)  # 101 - 81 = 20 left
    await suite.caught_up()
    assert len(await suite.auto_orders()) == 2
    assert await suite.remaining() == (300, 120)

    # The third crossing this month is over the limit of 2: announced, nothing bought.
    await suite.quota.report("down-3", ACCOUNT, 100)
    await suite.caught_up()
    assert len(await suite.auto_orders()) == 2
    (failed,) = await suite.failures()
    assert (failed.account_id, failed.region, failed.api, failed.offer_id) == (
        ACCOUNT,
        HK,
        API,
        OFFER,
    )
    assert (failed.reason, failed.month_purchases, failed.max_per_month) == (
        "AUTO_REPLENISH_LIMIT_REACHED",
        2,
        2,
    )
    assert failed.remaining_quantity == 20
    now = await suite.get_replenish()
    assert (now.month_purchases, now.last_failure_reason) == (2, "AUTO_REPLENISH_LIMIT_REACHED")
    assert await suite.remaining() == (300, 20)

    # A new month in the billing time zone: the rule is re-armed and buys at once.
    await suite.move("2024-01-31 23:59:59")
    await suite.caught_up()
    assert len(await suite.auto_orders()) == 2
    await suite.move("2024-02-01 00:00:00")
    await suite.caught_up()
    orders = await suite.auto_orders()
    assert len(orders) == 3 and all(o.state == FULFILLED for o in orders)
    assert await suite.remaining() == (400, 120)
    now = await suite.get_replenish()
    assert (now.month_purchases, now.last_failure_reason) == (1, "")
    assert len(await suite.failures()) == 1
    # 10.00 - the first package - three auto-replenish purchases.
    assert micros((await suite.billing.get_account(ACCOUNT)).balance) == 6_000_000


async def test_a_disabled_setting_buys_nothing(suite):
    await suite.account("10.00")
    await buy_first_package(suite)
    setting = await suite.set_replenish(enabled=False)
    assert not setting.enabled
    await suite.quota.report("down", ACCOUNT, 90)
    await suite.caught_up()
    assert await suite.auto_orders() == []
    assert await suite.failures() == []

    # Switched on while already below: the rule is evaluated at once and buys.
    await suite.set_replenish("set-2", enabled=True)
    await suite.caught_up()
    (order,) = await suite.auto_orders()
    assert order.state == FULFILLED
    assert await suite.remaining() == (200, 110)


# --- failures --------------------------------------------------------------------------------


async def test_insufficient_balance_is_announced_and_delivered(quota_and_billing_urls, tmp_path):
    async with running_suite(
        quota_and_billing_urls, tmp_path, replicas=1, with_notification=True
    ) as suite:
        notification = suite.notification.calls
        await notification.create(ACCOUNT, EMAIL, "ops@acme.test", [FAILED_TYPE])
        await suite.account("1.00")  # the first package takes it all
        await buy_first_package(suite)
        await suite.set_replenish()
        await suite.quota.report("down", ACCOUNT, 85)
        await suite.caught_up()
        assert await suite.auto_orders() == []
        (failed,) = await suite.failures()
        assert (failed.reason, failed.month_purchases, failed.remaining_quantity) == (
            "INSUFFICIENT_BALANCE",
            0,
            15,
        )
        assert (await suite.get_replenish()).last_failure_reason == "INSUFFICIENT_BALANCE"

        (sent,) = await notification.settled(
            ACCOUNT,
            1,
            [FAILED_TYPE],
            done=lambda d: d.state == notification_pb2.DELIVERY_STATE_SENT,
        )
        assert "INSUFFICIENT_BALANCE" in sent.body and OFFER in sent.body


# --- the RPCs --------------------------------------------------------------------------------


async def test_bad_input_names_the_field(suite):
    await suite.account("10.00")
    cases = [
        ({"offer_id": "no-such-offer"}, "UNKNOWN_OFFER", "offer_id"),
        ({"offer_id": "general-text-100-1y"}, "OFFER_NOT_FOR_API", "offer_id"),
        ({"offer_id": ""}, "INVALID_FIELD", "offer_id"),
        ({"region": "nowhere-1"}, "UNKNOWN_REGION", "region"),
        ({"api": "no-such-api"}, "UNKNOWN_API", "api"),
        ({"below_quantity": -1}, "INVALID_FIELD", "below_quantity"),
        ({"below_quantity": 100}, "INVALID_FIELD", "below_quantity"),  # not < the offer's 100
        ({"max_per_month": 0}, "INVALID_FIELD", "max_per_month"),
        ({"max_per_month": 101}, "INVALID_FIELD", "max_per_month"),
    ]
    for n, (fields, reason, field) in enumerate(cases):
        await expect_error(suite.set_replenish(f"bad-{n}", **fields), INVALID, reason, field)
    await expect_error(suite.get_replenish(), grpc.StatusCode.NOT_FOUND, "AUTO_REPLENISH_NOT_FOUND")
    await expect_error(
        suite.set_replenish(account_id="nobody"), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"
    )


async def test_account_tokens_see_and_set_only_their_own(suite):
    await suite.account("10.00")
    await suite.billing.create_account("other")
    tokens = suite.billing.tokens
    own = tokens.md(tokens.account(ACCOUNT))
    other = tokens.md(tokens.account("other"))
    reader = tokens.md(tokens.account(ACCOUNT, read_only=True))

    first = await suite.set_replenish("mine", metadata=own)
    assert (await suite.set_replenish("mine", metadata=own)) == first  # idempotent
    assert (await suite.get_replenish(metadata=own)).alert_id == first.alert_id
    assert (await suite.get_replenish(metadata=reader)).offer_id == OFFER
    await expect_error(
        suite.set_replenish("theirs", metadata=other), grpc.StatusCode.PERMISSION_DENIED
    )
    await expect_error(suite.get_replenish(metadata=other), grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(
        suite.set_replenish("read-only", metadata=reader), grpc.StatusCode.PERMISSION_DENIED
    )

    # Setting it again keeps one rule in quota and changes it.
    changed = await suite.set_replenish("mine-2", metadata=own, below_quantity=50)
    assert (changed.alert_id, changed.below_quantity) == (first.alert_id, 50)
    rules = await suite.quota.stub.ListUsageAlerts(
        quota_service_pb2.ListUsageAlertsRequest(account_id=ACCOUNT),
        metadata=suite.quota.admin,
    )
    (rule,) = rules.usage_alerts
    assert (rule.alert_id, rule.remaining_quantity, rule.enabled) == (first.alert_id, 50, True)


async def test_a_rule_deleted_in_quota_is_replaced_by_the_next_set(suite):
    await suite.account("10.00")
    await buy_first_package(suite)
    first = await suite.set_replenish()
    # The rule is auto-replenish's: the account's own tokens may not delete it; an admin may.
    own = suite.quota.tokens.md(suite.quota.tokens.account(ACCOUNT))
    delete = quota_service_pb2.DeleteUsageAlertRequest(alert_id=first.alert_id)
    await expect_error(
        suite.quota.stub.DeleteUsageAlert(delete, metadata=own),
        grpc.StatusCode.FAILED_PRECONDITION,
        "USAGE_ALERT_OWNED",
    )
    await suite.quota.stub.DeleteUsageAlert(delete, metadata=suite.quota.admin)

    # The reply is the setting as written; the rule is found gone (and replaced) right after.
    await suite.set_replenish("set-2", below_quantity=30)
    again = await suite.get_replenish()
    assert again.alert_id and again.alert_id != first.alert_id
    assert (again.below_quantity, again.last_failure_reason) == (30, "")
    rules = await suite.quota.stub.ListUsageAlerts(
        quota_service_pb2.ListUsageAlertsRequest(account_id=ACCOUNT), metadata=suite.quota.admin
    )
    (rule,) = rules.usage_alerts
    assert (rule.alert_id, rule.remaining_quantity, rule.enabled) == (again.alert_id, 30, True)
    assert rule.owner == "auto_replenish"  # the replacement is owned too

    await suite.quota.report("down", ACCOUNT, 70)
    await suite.caught_up()
    (order,) = await suite.auto_orders()
    assert order.state == FULFILLED
    assert await suite.remaining() == (200, 130)


async def test_quota_away_sets_nothing(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    settings = billing_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
        tmp_path,
        f"127.0.0.1:{closed_port()}",
        START,
        catalog=str(catalog),
    )
    async with running_billing(settings) as handle:
        suite = Suite(quota=None, replicas=[handle])  # type: ignore[arg-type]
        await suite.account("10.00")
        await expect_error(suite.set_replenish(), grpc.StatusCode.UNAVAILABLE, "QUOTA_UNAVAILABLE")
        await expect_error(
            suite.get_replenish(), grpc.StatusCode.NOT_FOUND, "AUTO_REPLENISH_NOT_FOUND"
        )


# --- the rule is auto-replenish's (UsageAlert.owner) -----------------------------------------

OWNER = "auto_replenish"
USAGE_ALERT = notification_pb2.MESSAGE_TYPE_USAGE_ALERT


async def test_the_rule_is_owned_silent_for_contacts_and_not_among_the_customers_alerts(
    quota_and_billing_urls, tmp_path
):
    async with running_suite(quota_and_billing_urls, tmp_path, replicas=1, overview=True) as suite:
        notification = suite.notification.calls
        alerts = AlertCalls(suite.quota)
        own = suite.quota.tokens.md(suite.quota.tokens.account(ACCOUNT))
        overview = REQ.GetAccountOverviewRequest(account_id=ACCOUNT)
        await suite.account("10.00")
        await buy_first_package(suite)
        setting = await suite.set_replenish()

        # The rule is shown, with its owner, to the account's own tokens.
        rule = await alerts.get_alert(setting.alert_id, metadata=own)
        assert (rule.owner, rule.remaining_quantity, rule.enabled) == (OWNER, 20, True)
        listed = await alerts.list_alerts(ACCOUNT, metadata=own)
        assert [(r.alert_id, r.owner) for r in listed.usage_alerts] == [(setting.alert_id, OWNER)]

        # Nobody hears usage alerts yet: the overview flags the customer's own rule, not the
        # setting's.
        mine = await alerts.create(ACCOUNT, region=HK, api=API, quantity=5, metadata=own)
        seen = await suite.billing.stub.GetAccountOverview(overview, metadata=suite.billing.admin)
        assert seen.notification_available
        assert [a.alert_id for a in seen.unheard_alerts] == [mine.alert_id]
        await notification.create(ACCOUNT, EMAIL, "alerts@acme.test", [USAGE_ALERT])
        seen = await suite.billing.stub.GetAccountOverview(overview, metadata=suite.billing.admin)
        assert list(seen.unheard_alerts) == []

        # The setting's crossing buys once, and is marked as the setting's in quota's stream.
        await suite.quota.report("down", ACCOUNT, 85)  # 15 left
        await suite.caught_up()
        (order,) = await suite.auto_orders()
        assert order.state == FULFILLED
        assert await suite.remaining() == (200, 115)
        crossings = payloads(await alerts.events(types=(THRESHOLD_CROSSED,)), THRESHOLD_CROSSED)
        assert [(c.alert_id, c.owner) for c in crossings] == [(setting.alert_id, OWNER)]

        # A later crossing, of the customer's own rule (changed to 200: it fires at once), is
        # the known position: once notification has made it a message, it has read the
        # setting's crossing before it, and made nothing of it.
        change = quota_pb2.UsageAlert(alert_id=mine.alert_id, remaining_quantity=200)
        await alerts.update_alert(change, ["remaining_quantity"], metadata=own)
        events = await alerts.events(types=(THRESHOLD_CROSSED,))
        later = [e for e in events if e.threshold_crossed.alert_id == mine.alert_id]
        assert len(later) == 1 and not later[0].threshold_crossed.owner
        found = await read_until(
            lambda: notification.notifications(ACCOUNT, [USAGE_ALERT]),
            lambda found: len(found) >= 1,
            WITHIN,
            "the usage alert notification of the customer's own rule",
        )
        assert [n.source_event_id for n in found] == [later[0].event_id]
