"""Renewals through real servers: a quota server and a billing server (in-process, manual
clocks, SQLite or PostgreSQL each). Manual renewal (docs/design/billing.md: until expiry and 15 days
after, counted from the original expiry) and the auto-renewal schedule (03:00 in the billing
time zone, 7 days before expiry, then daily while the balance is short).

Times are written in the billing time zone (Asia/Shanghai, UTC+08:00). The test catalog sells
passport-100-1y: 100 calls for 12 months at 1.00 USD.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2

from tests.support.billing import (
    BILLING_TZ,
    BillingCalls,
    billing_settings,
    local,
    micros,
    running_billing,
    write_catalog,
)
from tests.support.calls import expect_error
from tests.support.quota import QuotaCalls, running_quota
from tests.support.quota import quota_settings as quota_settings_for
from tests.support.servers import free_port

REQ = billing_service_pb2
TZ = BILLING_TZ
START = "2023-04-19T06:25:10Z"  # 2023-04-19 14:25:10 in the billing time zone
HK = "ap-southeast-1"
BKK = "ap-southeast-2"
OFFER = "passport-100-1y"
RENEWAL = billing_pb2.ORDER_KIND_RENEWAL
AUTO_RENEWAL = billing_pb2.ORDER_KIND_AUTO_RENEWAL
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED


def utc(stamp) -> str:
    return stamp.ToJsonString()


@dataclass
class Suite:
    quota: QuotaCalls
    billing: BillingCalls

    async def move(self, at: datetime) -> None:
        """Both clocks to `at`; billing's due work (auto-renewal) runs before this returns."""
        await self.quota.set_time(at)
        await self.billing.set_time(at)

    async def account(self, account_id: str, balance: str) -> None:
        await self.billing.create_account(account_id)
        if balance != "0":
            await self.billing.top_up(account_id, balance)

    async def buy(self, account_id: str, request_id: str = "buy", **fields) -> billing_pb2.Order:
        order = await self.billing.stub.PurchasePackage(
            REQ.PurchasePackageRequest(
                request_id=request_id, account_id=account_id, offer_id=OFFER, region=HK, **fields
            ),
            metadata=self.billing.admin,
        )
        assert order.state == FULFILLED
        return order

    def renew(self, account_id: str, package_id: str, request_id: str = "renew", periods=0):
        return self.billing.stub.RenewPackage(
            REQ.RenewPackageRequest(
                request_id=request_id,
                account_id=account_id,
                package_id=package_id,
                periods=periods,
            ),
            metadata=self.billing.admin,
        )

    def set_auto_renew(self, package_id: str, enabled: bool, lead_days: int = 0, metadata=None):
        return self.billing.stub.SetAutoRenew(
            REQ.SetAutoRenewRequest(
                request_id=f"auto-{package_id}-{enabled}-{lead_days}",
                package_id=package_id,
                enabled=enabled,
                lead_days=lead_days,
            ),
            metadata=metadata or self.billing.admin,
        )

    def get_auto_renew(self, package_id: str, metadata=None):
        return self.billing.stub.GetAutoRenew(
            REQ.GetAutoRenewRequest(package_id=package_id),
            metadata=metadata or self.billing.admin,
        )

    async def package(self, package_id: str) -> quota_pb2.Package:
        return await self.quota.get(package_id)

    async def balance(self, account_id: str) -> int:
        return micros((await self.billing.get_account(account_id)).balance)

    async def orders(self, account_id: str) -> list[billing_pb2.Order]:
        listing = await self.billing.stub.ListOrders(
            REQ.ListOrdersRequest(account_id=account_id), metadata=self.billing.admin
        )
        return list(listing.orders)

    async def failures(self) -> list[billing_pb2.AutoRenewFailed]:
        events = await self.billing.events(types=("auto_renew_failed",))
        return [e.auto_renew_failed for e in events]


@contextlib.asynccontextmanager
async def running_suite(urls, tmp_path):
    quota_url, billing_url = urls
    catalog = str(write_catalog(tmp_path))
    (tmp_path / "quota").mkdir()
    (tmp_path / "billing").mkdir()
    quota_settings = quota_settings_for(
        quota_url, tmp_path / "quota", clock="manual", clock_start=START, catalog=catalog
    )
    async with running_quota(quota_settings) as quota:
        settings = billing_settings(
            billing_url, tmp_path / "billing", quota.addr, START, catalog=catalog
        )
        async with running_billing(settings) as billing:
            yield Suite(QuotaCalls(quota), billing.calls)


@pytest.fixture
async def suite(quota_and_billing_urls, tmp_path):
    async with running_suite(quota_and_billing_urls, tmp_path) as s:
        yield s


# --- manual renewal ------------------------------------------------------------------------


async def test_renewal_extends_from_the_expiry_and_adds_the_quantity_once(suite):
    await suite.account("acme", "3.00")
    bought = await suite.buy("acme")
    package_id = bought.package_id
    assert utc(bought.expire_time) == "2024-04-19T15:59:59Z"  # 2024-04-19 23:59:59 +08:00

    order = await suite.renew("acme", package_id, periods=2)
    assert (order.kind, order.state) == (RENEWAL, FULFILLED)
    assert order.package_id == package_id
    assert (order.quantity, order.periods, micros(order.amount)) == (200, 2, 2_000_000)
    # The added periods start where the package ended: 2024-04-20 00:00 +08:00.
    assert utc(order.effective_time) == "2024-04-19T16:00:00Z"
    assert utc(order.expire_time) == "2026-04-19T15:59:59Z"
    again = await suite.renew("acme", package_id, periods=2)
    assert again.order_id == order.order_id
    assert await suite.balance("acme") == 0  # 1.00 + 2 × 1.00, once

    package = await suite.package(package_id)
    assert utc(package.expire_time) == "2026-04-19T15:59:59Z"
    assert package.total_quantity == 300
    bill = await suite.billing.get_bill("acme", "2023-04")
    (line,) = [x for x in bill.lines if x.kind == billing_pb2.BILL_LINE_KIND_PACKAGE_RENEWAL]
    assert (line.order_id, line.region, line.api, line.quantity) == (
        order.order_id,
        HK,
        "passport",
        200,
    )
    assert micros(line.amount) == -2_000_000
    assert sum(micros(line.amount) for line in bill.lines) == micros(bill.closing_balance) - micros(
        bill.opening_balance
    )

    # A renewal is not a purchase: it cannot be cancelled.
    await expect_error(
        suite.billing.stub.CancelOrder(
            REQ.CancelOrderRequest(request_id="c", order_id=order.order_id),
            metadata=suite.billing.admin,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ORDER_NOT_CANCELLABLE",
    )


async def test_renewal_within_15_days_after_expiry_forfeits_the_remainder(suite):
    await suite.account("acme", "4.00")
    late = (await suite.buy("acme", "buy-late")).package_id
    too_late = (await suite.buy("acme", "buy-too-late")).package_id

    # Expired at 2024-04-19 23:59:59; the window ends 15 days later.
    await suite.move(local("2024-05-04 23:59:59"))
    order = await suite.renew("acme", late, "renew-late")
    assert order.state == FULFILLED
    assert utc(order.expire_time) == "2025-04-19T15:59:59Z"  # from the original expiry
    package = await suite.package(late)
    assert package.state == quota_pb2.PACKAGE_STATE_ACTIVE
    # The 100 calls left at expiry are gone; the renewal's 100 remain.
    assert package.total_quantity - package.used_quantity == 100

    await suite.move(local("2024-05-05 00:00:00"))
    await expect_error(
        suite.renew("acme", too_late, "renew-too-late"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACKAGE_NOT_RENEWABLE",
    )
    assert await suite.balance("acme") == 1_000_000  # the refused renewal took nothing


async def test_renewal_refusals_name_the_reason(suite):
    await suite.account("acme", "1.00")
    await suite.account("other", "5.00")
    package_id = (await suite.buy("acme")).package_id

    await expect_error(
        suite.renew("acme", package_id, "short"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_BALANCE",
    )
    await expect_error(
        suite.renew("acme", package_id, "bad-periods", periods=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="periods",
    )
    await expect_error(
        suite.renew("acme", "pkg_missing", "missing"),
        grpc.StatusCode.NOT_FOUND,
        "PACKAGE_NOT_FOUND",
    )
    # Another account's package is not found for it (and hidden from its own token).
    await expect_error(
        suite.renew("other", package_id, "not-mine"),
        grpc.StatusCode.NOT_FOUND,
        "PACKAGE_NOT_FOUND",
    )
    mine = suite.billing.account("other")
    await expect_error(
        suite.billing.stub.RenewPackage(
            REQ.RenewPackageRequest(request_id="x", account_id="other", package_id=package_id),
            metadata=mine,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # A package granted in quota without billing exists, but billing did not sell it.
    granted = await suite.quota.grant("acme", 10, api="passport", region=HK)
    await expect_error(
        suite.renew("acme", granted.package_id, "granted"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACKAGE_NOT_RENEWABLE",
    )
    # A cancelled purchase's package is revoked: not renewable.
    future = await suite.buy("other", "future", effective_time={"seconds": 1700000000})
    await suite.billing.stub.CancelOrder(
        REQ.CancelOrderRequest(request_id="cancel", order_id=future.order_id),
        metadata=suite.billing.admin,
    )
    await expect_error(
        suite.renew("other", future.package_id, "cancelled"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACKAGE_NOT_RENEWABLE",
    )
    await expect_error(
        suite.set_auto_renew(package_id, True, lead_days=28),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="lead_days",
    )
    await expect_error(
        suite.set_auto_renew(package_id, True, metadata=mine),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert await suite.balance("acme") == 0
    assert [o.kind for o in await suite.orders("acme")] == [billing_pb2.ORDER_KIND_PURCHASE]


# --- auto-renewal ---------------------------------------------------------------------------


async def test_auto_renewal_tries_seven_days_before_at_three_then_daily(suite):
    await suite.account("acme", "1.00")
    bought = await suite.buy("acme", auto_renew=True)
    package_id = bought.package_id
    assert await suite.balance("acme") == 0

    await suite.move(local("2024-04-12 02:59:59"))
    assert await suite.failures() == []

    # First attempt: 2024-04-12 03:00, 7 days before the expiry date; the balance is short.
    await suite.move(local("2024-04-12 03:00"))
    (first,) = await suite.failures()
    assert (first.account_id, first.package_id, first.region) == ("acme", package_id, HK)
    assert first.reason == "INSUFFICIENT_BALANCE"
    assert first.next_attempt_time.ToDatetime(tzinfo=TZ) == local("2024-04-13 03:00")
    assert utc(first.expire_time) == "2024-04-19T15:59:59Z"

    after_failure = await suite.get_auto_renew(package_id)
    assert after_failure.last_failure_reason == "INSUFFICIENT_BALANCE"
    assert after_failure.next_attempt_time == first.next_attempt_time
    await suite.move(local("2024-04-13 02:00"))
    assert len(await suite.failures()) == 1
    await suite.move(local("2024-04-13 03:00"))
    assert len(await suite.failures()) == 2

    await suite.billing.top_up("acme", "1.00")
    await suite.move(local("2024-04-14 03:00"))
    assert len(await suite.failures()) == 2
    renewal, purchase = await suite.orders("acme")  # newest first
    assert purchase.order_id == bought.order_id
    assert (renewal.kind, renewal.state) == (AUTO_RENEWAL, FULFILLED)
    assert (renewal.package_id, renewal.quantity, renewal.periods) == (package_id, 100, 1)
    assert utc(renewal.expire_time) == "2025-04-19T15:59:59Z"
    assert await suite.balance("acme") == 0
    package = await suite.package(package_id)
    assert utc(package.expire_time) == "2025-04-19T15:59:59Z"
    assert package.total_quantity == 200

    # Done for this expiry: no more attempts until 7 days before the new one.
    await suite.move(local("2024-04-20 03:00"))
    assert len(await suite.orders("acme")) == 2
    assert len(await suite.failures()) == 2
    schedule = await suite.get_auto_renew(package_id)
    assert schedule.enabled and schedule.lead_days == 7
    assert schedule.next_attempt_time.ToDatetime(tzinfo=TZ) == local("2025-04-12 03:00")
    assert schedule.last_failure_reason == ""
    # The owner reads it too; another account does not learn the package exists.
    mine = await suite.get_auto_renew(package_id, suite.billing.account("acme", read_only=True))
    assert mine == schedule
    await expect_error(
        suite.get_auto_renew(package_id, suite.billing.account("other", read_only=True)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        suite.get_auto_renew("pkg_missing"), grpc.StatusCode.NOT_FOUND, "PACKAGE_NOT_FOUND"
    )


async def test_auto_renew_replies_go_only_to_callers_that_may_see_the_package(suite):
    """Regression: another account sending the owner's exact SetAutoRenew (same request_id)
    got the owner's setting back; a token of the owner limited to another region must not
    read it by a replay either."""
    await suite.account("acme", "1.00")
    await suite.account("other", "0")
    package_id = (await suite.buy("acme")).package_id
    tokens = suite.billing.tokens
    own = suite.billing.account("acme")
    elsewhere = tokens.md(tokens.account("acme", regions=["ap-southeast-2"]))

    set_once = await suite.set_auto_renew(package_id, True, metadata=own)
    assert set_once.enabled and set_once.account_id == "acme"
    assert await suite.set_auto_renew(package_id, True, metadata=own) == set_once
    await expect_error(
        suite.set_auto_renew(package_id, True, metadata=suite.billing.account("other")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        suite.set_auto_renew(package_id, True, metadata=elsewhere),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REGION_MISMATCH",
    )
    await expect_error(
        suite.get_auto_renew(package_id, elsewhere),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REGION_MISMATCH",
    )
    assert await suite.get_auto_renew(package_id) == set_once


async def test_region_limited_tokens_see_only_their_regions_orders_and_bill_lines(suite):
    """Regression: a token limited to ap-southeast-1 listed orders and bill lines of other
    regions (while GetOrder on the same order was refused). Orders are filtered in the query,
    so pages stay full; the bill shows the token's regions' lines and those of no region
    (top-ups), its total is theirs, and the account-wide balances are left unset."""
    await suite.account("acme", "4.00")

    async def buy(region: str, request_id: str) -> billing_pb2.Order:
        order = await suite.billing.stub.PurchasePackage(
            REQ.PurchasePackageRequest(
                request_id=request_id, account_id="acme", offer_id=OFFER, region=region
            ),
            metadata=suite.billing.admin,
        )
        assert order.state == FULFILLED
        return order

    h1 = await buy(HK, "h1")
    await buy(BKK, "b1")
    h2 = await buy(HK, "h2")
    await buy(BKK, "b2")
    tokens = suite.billing.tokens
    hk = tokens.md(tokens.account("acme", read_only=True, regions=[HK]))

    seen, sizes, token = [], [], ""
    for _ in range(10):
        page = await suite.billing.stub.ListOrders(
            REQ.ListOrdersRequest(page_size=1, page_token=token), metadata=hk
        )
        sizes.append(len(page.orders))
        seen.extend(o.order_id for o in page.orders)
        token = page.next_page_token
        if not token:
            break
    assert (seen, sizes) == ([h2.order_id, h1.order_id], [1, 1])
    assert len(await suite.orders("acme")) == 4

    full = await suite.billing.get_bill("acme", "2023-04")
    assert {line.region for line in full.lines} == {"", HK, BKK}
    assert full.HasField("closing_balance")
    bill = await suite.billing.get_bill("acme", "2023-04", hk)
    assert sorted((line.region, line.order_id) for line in bill.lines) == sorted(
        [("", ""), (HK, h1.order_id), (HK, h2.order_id)]
    )
    assert micros(bill.total) == 4_000_000 - 2_000_000
    assert not bill.HasField("opening_balance") and not bill.HasField("closing_balance")
    csv = (await suite.billing.export_bill("acme", "2023-04", hk)).csv
    assert HK in csv and BKK not in csv
    assert len(csv.strip().splitlines()) == 1 + 3


async def test_auto_renewal_gives_up_when_the_package_expires(suite):
    await suite.account("acme", "1.00")
    package_id = (await suite.buy("acme")).package_id
    schedule = await suite.set_auto_renew(package_id, True, lead_days=2)
    assert schedule.next_attempt_time.ToDatetime(tzinfo=TZ) == local("2024-04-17 03:00")

    # The clock jumps past the 17th and 18th: the attempt due since the 17th is made once, now,
    # and the next (the 20th, 03:00) would come after the expiry: none is left.
    await suite.move(local("2024-04-19 03:00"))
    (failure,) = await suite.failures()
    assert failure.reason == "INSUFFICIENT_BALANCE"
    assert not failure.HasField("next_attempt_time")
    await suite.billing.top_up("acme", "5.00")
    await suite.move(local("2024-04-25 03:00"))
    assert [o.kind for o in await suite.orders("acme")] == [billing_pb2.ORDER_KIND_PURCHASE]

    # Switched off, nothing is attempted; an expired package cannot be switched on.
    await expect_error(
        suite.set_auto_renew(package_id, True),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACKAGE_NOT_RENEWABLE",
    )


async def test_renewals_paid_while_quota_is_away_are_applied_in_order(tmp_path):
    """Two renewals paid while quota is down stay PENDING; when quota is back, asking for the
    later one first still applies the earlier one first (quota never moves an expiry back)."""
    catalog = str(write_catalog(tmp_path))
    (tmp_path / "quota").mkdir()
    quota_addr = f"127.0.0.1:{free_port()}"
    quota_settings = quota_settings_for(
        f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}",
        tmp_path / "quota",
        clock="manual",
        clock_start=START,
        catalog=catalog,
        quota_addr=quota_addr,
    )
    settings = billing_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        tmp_path,
        quota_addr,
        START,
        catalog=catalog,
    )
    async with running_billing(settings) as billing:
        async with running_quota(quota_settings) as quota:
            suite = Suite(QuotaCalls(quota), billing.calls)
            await suite.account("acme", "4.00")
            package_id = (await suite.buy("acme")).package_id
        first = await suite.renew("acme", package_id, "renew-1")
        second = await suite.renew("acme", package_id, "renew-2", periods=2)
        assert [first.state, second.state] == [billing_pb2.ORDER_STATE_PENDING] * 2
        assert utc(first.expire_time) == "2025-04-19T15:59:59Z"
        assert utc(second.expire_time) == "2027-04-19T15:59:59Z"
        assert await suite.balance("acme") == 0  # paid at once

        async with running_quota(quota_settings) as quota:
            suite.quota = QuotaCalls(quota)
            # Ask for the later renewal (again) until quota answers (billing's channel to quota
            # reconnects with a backoff; the background retry may get there too).
            for _ in range(200):  # bounded: ~20 s
                later = await suite.renew("acme", package_id, "renew-2", periods=2)
                if later.state != billing_pb2.ORDER_STATE_PENDING:
                    break
                await asyncio.sleep(0.1)
            assert later.state == FULFILLED
            orders = await suite.orders("acme")
            assert [o.state for o in orders] == [FULFILLED] * 3
            package = await suite.package(package_id)
            assert utc(package.expire_time) == "2027-04-19T15:59:59Z"
            assert package.total_quantity == 400


async def test_purchases_and_renewals_cross_the_balance_alert_like_pay_per_use(suite):
    await suite.account("acme", "3.00")
    await suite.billing.set_balance_alert("acme", "2.50")
    package_id = (await suite.buy("acme")).package_id  # 3.00 -> 2.00: crosses
    await suite.renew("acme", package_id, "renew-1")  # 2.00 -> 1.00: already below
    await suite.billing.top_up("acme", "5.00")  # 6.00: re-armed
    await suite.renew("acme", package_id, "renew-2", periods=4)  # 6.00 -> 2.00: crosses again
    alerts = [
        e.balance_below_threshold
        for e in await suite.billing.events(types=("balance_below_threshold",))
    ]
    assert [(micros(a.balance), micros(a.threshold)) for a in alerts] == [
        (2_000_000, 2_500_000),
        (2_000_000, 2_500_000),
    ]
