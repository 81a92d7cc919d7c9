"""Orders of several packages through real servers (a quota server and a billing server,
in-process, manual clocks, SQLite or PostgreSQL each): a purchase of `quantity` packages of one
offer, and a batch renewal of several packages to one common expiry date, priced pro rata by
whole days (docs/design/billing.md, "Orders of several packages").

Times are written in the billing time zone (Asia/Shanghai, UTC+08:00). The test catalog sells
passport-100-1y: 100 calls for 12 months at 1.00 USD.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import date, datetime
from fractions import Fraction

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2
from google.type import date_pb2

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

REQ = billing_service_pb2
TZ = BILLING_TZ
START = "2023-04-19T06:25:10Z"  # 2023-04-19 14:25:10 in the billing time zone
HK = "ap-southeast-1"
BKK = "ap-southeast-2"
OFFER = "passport-100-1y"
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def day(text: str) -> date_pb2.Date:
    d = date.fromisoformat(text)
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def share(numerator: int, days: int, period_days: int) -> int:
    """The documented rule, written independently: numerator × days / period_days, rounded
    half up to a whole unit."""
    return int(Fraction(numerator * days, period_days) + Fraction(1, 2))


@dataclass
class Suite:
    quota: QuotaCalls
    billing: BillingCalls

    async def move(self, at: datetime) -> None:
        await self.quota.set_time(at)
        await self.billing.set_time(at)

    async def account(self, account_id: str, balance: str) -> None:
        await self.billing.create_account(account_id)
        await self.billing.top_up(account_id, balance)

    def buy(self, account_id: str, request_id: str, region: str = HK, **fields):
        return self.billing.stub.PurchasePackage(
            REQ.PurchasePackageRequest(
                request_id=request_id,
                account_id=account_id,
                offer_id=OFFER,
                region=region,
                **fields,
            ),
            metadata=self.billing.admin,
        )

    def renew_many(self, account_id: str, package_ids, request_id: str, expire_date=None):
        request = REQ.RenewPackagesRequest(
            request_id=request_id, account_id=account_id, package_ids=package_ids
        )
        if expire_date is not None:
            request.expire_date.CopyFrom(expire_date)
        return self.billing.stub.RenewPackages(request, metadata=self.billing.admin)

    async def balance(self, account_id: str) -> int:
        return micros((await self.billing.get_account(account_id)).balance)


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


# --- several packages of one offer ---------------------------------------------------------


async def test_an_order_of_three_packages_charges_once_and_grants_three(suite):
    await suite.account("acme", "5.00")
    order = await suite.buy("acme", "buy-3", quantity=3)
    assert order.state == FULFILLED
    assert order.package_count == 3
    assert len(set(order.package_ids)) == 3
    assert order.package_id == order.package_ids[0]  # what clients of one package read
    assert (micros(order.amount), order.quantity) == (3_000_000, 300)
    assert await suite.balance("acme") == 2_000_000

    for package_id in order.package_ids:
        package = await suite.quota.get(package_id)
        assert (package.account_id, package.region, package.total_quantity) == ("acme", HK, 100)
        assert package.expire_time == order.expire_time
        assert package.order_id == order.order_id
    assert sorted(await suite.quota.package_ids("acme")) == sorted(order.package_ids)

    # A repeat is the same order: no second charge, no further package.
    again = await suite.buy("acme", "buy-3", quantity=3)
    assert (again.order_id, list(again.package_ids)) == (order.order_id, list(order.package_ids))
    assert await suite.balance("acme") == 2_000_000
    assert len(await suite.quota.package_ids("acme")) == 3

    # One order, one payment: one bill line.
    bill = await suite.billing.get_bill("acme", "2023-04")
    (line,) = [x for x in bill.lines if x.kind == billing_pb2.BILL_LINE_KIND_PACKAGE_PURCHASE]
    assert (line.order_id, line.quantity, micros(line.amount)) == (
        order.order_id,
        300,
        -3_000_000,
    )
    (listed,) = await suite.billing.orders("acme")
    assert list(listed.package_ids) == list(order.package_ids)

    # Each package is renewable on its own, as any package billing sold.
    renewal = await suite.billing.stub.RenewPackage(
        REQ.RenewPackageRequest(
            request_id="renew-third", account_id="acme", package_id=order.package_ids[2]
        ),
        metadata=suite.billing.admin,
    )
    assert (renewal.state, list(renewal.package_ids)) == (FULFILLED, [order.package_ids[2]])


async def test_a_future_order_of_several_packages_is_cancelled_whole(suite):
    await suite.account("acme", "2.00")
    order = await suite.buy("acme", "future", quantity=2, effective_time={"seconds": 1700000000})
    assert order.state == FULFILLED and len(order.package_ids) == 2
    cancelled = await suite.billing.stub.CancelOrder(
        REQ.CancelOrderRequest(request_id="cancel", order_id=order.order_id),
        metadata=suite.billing.admin,
    )
    assert cancelled.state == billing_pb2.ORDER_STATE_CANCELLED
    for package_id in order.package_ids:
        assert (await suite.quota.get(package_id)).state == quota_pb2.PACKAGE_STATE_REVOKED
    assert await suite.balance("acme") == 2_000_000


async def test_quantity_outside_its_bounds_is_refused_and_charges_nothing(suite):
    await suite.account("acme", "2.00")
    for request_id, quantity in (("too-many", 101), ("negative", -1)):
        await expect_error(
            suite.buy("acme", request_id, quantity=quantity), INVALID, field="quantity"
        )
    await expect_error(suite.buy("acme", "short", quantity=3), PRECONDITION, "INSUFFICIENT_BALANCE")
    assert await suite.balance("acme") == 2_000_000
    assert await suite.billing.orders("acme") == []
    # 0 means one package.
    single = await suite.buy("acme", "default")
    assert (single.package_count, len(single.package_ids)) == (1, 1)


# --- renewal to a common expiry date -------------------------------------------------------


async def test_batch_renewal_gives_every_package_the_same_expiry_at_the_pro_rata_sum(suite):
    await suite.account("acme", "10.00")
    first = (await suite.buy("acme", "buy-1")).package_id  # to 2024-04-19 23:59:59
    await suite.move(local("2023-06-10 09:00"))
    second = (await suite.buy("acme", "buy-2")).package_id  # to 2024-06-10 23:59:59
    before = await suite.balance("acme")

    order = await suite.renew_many("acme", [first, second], "align", day("2024-12-31"))
    assert (order.kind, order.state) == (billing_pb2.ORDER_KIND_RENEWAL, FULFILLED)
    assert (list(order.package_ids), order.package_count) == ([first, second], 2)
    # 2024-04-19 -> 2024-12-31 is 256 days of a 365-day period; 2024-06-10 -> 2024-12-31 is
    # 204 days of 365: 701 369.86 and 558 904.11 micros, rounded half up.
    prices = [share(1_000_000, 256, 365), share(1_000_000, 204, 365)]
    assert prices == [701_370, 558_904]
    calls = [share(100, 256, 365), share(100, 204, 365)]
    assert calls == [70, 56]
    assert micros(order.amount) == sum(prices)
    assert order.quantity == sum(calls)
    assert before - await suite.balance("acme") == sum(prices)

    for package_id, added in zip((first, second), calls, strict=True):
        package = await suite.quota.get(package_id)
        assert package.expire_time.ToJsonString() == "2024-12-31T15:59:59Z"
        assert package.total_quantity == 100 + added

    # A repeat is the same order, charged once.
    again = await suite.renew_many("acme", [first, second], "align", day("2024-12-31"))
    assert again.order_id == order.order_id
    assert before - await suite.balance("acme") == sum(prices)

    bill = await suite.billing.get_bill("acme", "2023-06")
    (line,) = [x for x in bill.lines if x.kind == billing_pb2.BILL_LINE_KIND_PACKAGE_RENEWAL]
    assert (line.order_id, line.quantity, micros(line.amount)) == (
        order.order_id,
        sum(calls),
        -sum(prices),
    )

    # The packages now end together; a single renewal counts from the common expiry.
    single = await suite.billing.stub.RenewPackage(
        REQ.RenewPackageRequest(request_id="one-more", account_id="acme", package_id=second),
        metadata=suite.billing.admin,
    )
    assert single.expire_time.ToJsonString() == "2025-12-31T15:59:59Z"


async def test_batch_renewal_refused_by_quota_for_one_package_refunds_its_share(suite):
    await suite.account("acme", "10.00")
    bought = await suite.buy("acme", "buy-2", quantity=2)
    kept, revoked = bought.package_ids
    await suite.quota.revoke(revoked, request_id="revoke-in-quota")
    before = await suite.balance("acme")

    order = await suite.renew_many("acme", [kept, revoked], "align", day("2024-05-19"))
    # 2024-04-19 -> 2024-05-19: 30 days of the 365 from 2024-04-19 to 2025-04-19.
    price = share(1_000_000, 30, 365)
    assert order.state == FULFILLED
    assert revoked in order.failure_reason
    assert before - await suite.balance("acme") == price  # the refused share came back
    assert (await suite.quota.get(kept)).expire_time.ToJsonString() == "2024-05-19T15:59:59Z"


async def test_batch_renewal_refusals_name_the_field_or_reason(suite):
    await suite.account("acme", "1.20")
    await suite.account("other", "5.00")
    bought = await suite.buy("acme", "buy")  # to 2024-04-19 23:59:59
    package_id = bought.package_id
    foreign = (await suite.buy("other", "buy-other")).package_id
    elsewhere = (await suite.buy("other", "buy-bkk", region=BKK)).package_id
    other_hk = (await suite.buy("other", "buy-hk-2")).package_id
    later = day("2024-05-19")

    refusals = [
        (suite.renew_many("acme", [], "empty", later), INVALID, None, "package_ids"),
        (
            suite.renew_many("acme", [package_id, package_id], "twice", later),
            INVALID,
            None,
            "package_ids",
        ),
        (
            suite.renew_many("acme", [f"pkg_{i}" for i in range(101)], "many", later),
            INVALID,
            None,
            "package_ids",
        ),
        (suite.renew_many("acme", [package_id], "no-date"), INVALID, None, "expire_date"),
        (
            suite.renew_many("acme", [package_id], "bad-date", date_pb2.Date(year=2024, month=13)),
            INVALID,
            None,
            "expire_date",
        ),
        (
            suite.renew_many("acme", [package_id], "past", day("2023-01-01")),
            INVALID,
            None,
            "expire_date",
        ),
        (
            suite.renew_many("acme", [package_id], "not-after", day("2024-04-19")),
            PRECONDITION,
            "EXPIRE_DATE_NOT_AFTER_EXPIRY",
            "expire_date",
        ),
        (
            suite.renew_many("acme", [package_id, foreign], "foreign", later),
            grpc.StatusCode.NOT_FOUND,
            "PACKAGE_NOT_FOUND",
            None,
        ),
        (
            suite.renew_many("acme", ["pkg_missing"], "missing", later),
            grpc.StatusCode.NOT_FOUND,
            "PACKAGE_NOT_FOUND",
            None,
        ),
        (
            suite.renew_many("other", [other_hk, elsewhere], "regions", later),
            PRECONDITION,
            "PACKAGES_NOT_ALIKE",
            None,
        ),
        (
            # A whole period (365 days) costs 1.00; 0.20 is left.
            suite.renew_many("acme", [package_id], "short", day("2025-04-19")),
            PRECONDITION,
            "INSUFFICIENT_BALANCE",
            None,
        ),
    ]
    for call, code, reason, field in refusals:
        await expect_error(call, code, reason, field)

    # A package granted in quota without billing exists, but billing did not sell it.
    granted = await suite.quota.grant("acme", 10, api="passport", region=HK)
    await expect_error(
        suite.renew_many("acme", [granted.package_id], "granted", later),
        PRECONDITION,
        "PACKAGE_NOT_RENEWABLE",
    )
    # Nothing was taken, no renewal was placed.
    assert await suite.balance("acme") == 200_000
    assert [o.kind for o in await suite.billing.orders("acme")] == [billing_pb2.ORDER_KIND_PURCHASE]
    assert (await suite.quota.get(package_id)).expire_time == bought.expire_time
