"""Extreme but well-formed input is INVALID_ARGUMENT naming the field, never INTERNAL, and
writes nothing (docs/security.md, "Hostile input"): the cases issue 9 found, one table per
service, through real quota, billing and notification servers.

Ranges: timestamps 2000-01-01T00:00:00Z .. 9000-01-01T00:00:00Z; usage at most 45 days old and
at most 5 minutes ahead; money and quantities below 2^63 micro-units / int64; months YYYY-MM in
ASCII digits.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.notification.v1 import notification_pb2, notification_service_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2
from google.protobuf import duration_pb2, timestamp_pb2
from google.type import money_pb2

from tests.support.billing import BillingCalls, billing_settings, running_billing, write_catalog
from tests.support.calls import expect_error, status_details, ts
from tests.support.notification import notification_settings, running_notification
from tests.support.quota import ACCOUNT, API, REGION, START, QuotaCalls, running_quota
from tests.support.quota import quota_settings as quota_settings_for
from tests.support.receivers import closed_port

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CLOCK_START = "2024-01-01T00:00:00Z"
YEAR_9999 = "9999-06-01T00:00:00Z"
NEAR_INT64 = 2**63 - 1
OFFER = "passport-100-1y"


def stamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


# --- quota --------------------------------------------------------------------------------------

YEAR_1 = stamp(-62135596800)  # 0001-01-01T00:00:00Z


def _package(**fields) -> quota_pb2.Package:
    return QuotaCalls.package(**fields)


QUOTA_CASES = {
    "grant effective in year 9999": (
        lambda q: q.grant_package(_package(effective=YEAR_9999, expire=None)),
        "package.effective_time",
    ),
    "grant expiring in year 9999": (
        lambda q: q.grant_package(_package(expire=YEAR_9999)),
        "package.expire_time",
    ),
    "grant expiring in 1999": (
        lambda q: q.grant_package(_package(expire="1999-12-31T23:59:59Z")),
        "package.expire_time",
    ),
    "grant of 2^63-1 calls": (
        lambda q: q.grant_package(_package(quantity=NEAR_INT64)),
        "package.total_quantity",
    ),
    "usage in year 1": (
        lambda q: q.report_request(q.usage("e-year-1", occur=YEAR_1)),
        "occur_time",
    ),
    "usage older than 45 days": (
        lambda q: q.report_request(q.usage("e-old", occur=START - timedelta(days=46))),
        "occur_time",
    ),
    "usage more than 5 minutes ahead": (
        lambda q: q.report_request(q.usage("e-ahead", occur=START + timedelta(minutes=6))),
        "occur_time",
    ),
    "usage of 2^63-1 calls": (
        lambda q: q.report_request(q.usage("e-huge", quantity=NEAR_INT64)),
        "quantity",
    ),
    "check of 2^63-1 calls": (
        lambda q: q.stub.CheckQuota(
            quota_service_pb2.CheckQuotaRequest(
                account_id=ACCOUNT, region=REGION, api=API, quantity=NEAR_INT64
            ),
            metadata=q.gateway,
        ),
        "quantity",
    ),
    "event id of 10,000 characters": (
        lambda q: q.report_request(q.usage("e" * 10_000)),
        "event_id",
    ),
    "account id with a trailing newline": (
        lambda q: q.report_request(q.usage("e-newline", account_id=ACCOUNT + "\n")),
        "account_id",
    ),
    "revocation reason of 10,000 characters": (
        lambda q: q.revoke("pkg-none", reason="r" * 10_000),
        "reason",
    ),
    "package id with a NUL character": (lambda q: q.get("pkg-\x00"), "package_id"),
    "event id with a NUL character": (
        lambda q: q.explain("e-\x00"),
        "event_id",
    ),
    "unknown package source": (
        lambda q: q.grant_package(_package(source=99)),
        "package.source",
    ),
    "alert at NaN percent": (
        lambda q: q.stub.CreateUsageAlert(
            quota_service_pb2.CreateUsageAlertRequest(
                usage_alert=quota_pb2.UsageAlert(
                    account_id=ACCOUNT, region=REGION, api=API, remaining_percent=float("nan")
                )
            ),
            metadata=q.admin,
        ),
        "usage_alert.remaining_percent",
    ),
    "alert at 2^63-1 calls left": (
        lambda q: q.stub.CreateUsageAlert(
            quota_service_pb2.CreateUsageAlertRequest(
                usage_alert=quota_pb2.UsageAlert(
                    account_id=ACCOUNT, region=REGION, api=API, remaining_quantity=NEAR_INT64
                )
            ),
            metadata=q.admin,
        ),
        "usage_alert.remaining_quantity",
    ),
    "stats from year 1": (
        lambda q: q.stub.GetUsageStats(
            quota_service_pb2.GetUsageStatsRequest(account_id=ACCOUNT, start_time=YEAR_1),
            metadata=q.admin,
        ),
        "start_time",
    ),
}


@pytest.mark.parametrize("case", list(QUOTA_CASES))
async def test_quota_refuses_extreme_input(quota, case):
    calls = QuotaCalls(quota)
    call, field = QUOTA_CASES[case]
    await expect_error(call(calls), INVALID, field=field)
    assert await calls.package_ids() == []


async def test_quota_renewal_past_the_range_names_the_field(quota):
    """A package expiring 8999-12-31 renewed by a year would end past 9000-01-01."""
    calls = QuotaCalls(quota)
    package = await calls.grant(expire="8999-12-31T00:00:00Z")
    await expect_error(
        calls.renew(package.package_id, expire="9000-12-31T00:00:00Z"), INVALID, field="expire_time"
    )
    await expect_error(
        calls.renew(package.package_id, add=NEAR_INT64), INVALID, field="add_quantity"
    )
    assert (await calls.get(package.package_id)).total_quantity == 10


async def test_a_bad_item_of_a_batch_fails_only_its_slot(quota):
    calls = QuotaCalls(quota)
    await calls.grant(quantity=10)
    batch = await calls.batch(
        [
            calls.usage("good-1"),
            calls.usage("year-1", occur=YEAR_1),
            calls.usage("unknown-api", api="no-such-api"),
            calls.usage("too-old", occur=START - timedelta(days=50)),
            calls.usage("good-2"),
            calls.usage("nul-\x00"),
        ]
    )
    slots = [status_details(r.error) if r.HasField("error") else None for r in batch.responses]
    assert slots[0] is None and slots[4] is None
    assert slots[1] == ("INVALID_FIELD", ["requests[1].occur_time"])
    assert slots[2][1] == ["requests[2].api"]
    assert slots[3] == ("INVALID_FIELD", ["requests[3].occur_time"])
    assert slots[5] == ("INVALID_FIELD", ["requests[5].event_id"])
    assert batch.responses[4].remaining_quantity == 8
    await expect_error(calls.explain("year-1"), grpc.StatusCode.NOT_FOUND, "USAGE_EVENT_NOT_FOUND")


# --- billing ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def billing_suite(urls, tmp_path):
    quota_url, billing_url = urls
    catalog = str(write_catalog(tmp_path))
    (tmp_path / "quota").mkdir()
    (tmp_path / "billing").mkdir()
    quota_settings = quota_settings_for(
        quota_url, tmp_path / "quota", clock="manual", clock_start=CLOCK_START, catalog=catalog
    )
    async with running_quota(quota_settings) as quota:
        settings = billing_settings(
            billing_url, tmp_path / "billing", quota.addr, CLOCK_START, catalog=catalog
        )
        async with running_billing(settings) as billing:
            yield QuotaCalls(quota), billing.calls


def usd(units: int, nanos: int = 0) -> money_pb2.Money:
    return money_pb2.Money(currency_code="USD", units=units, nanos=nanos)


def _top_up(b: BillingCalls, amount: money_pb2.Money, request_id: str = "t"):
    return b.stub.TopUp(
        billing_service_pb2.TopUpRequest(request_id=request_id, account_id="a", amount=amount),
        metadata=b.admin,
    )


def _alert(b: BillingCalls, threshold: money_pb2.Money):
    return b.stub.SetBalanceAlert(
        billing_service_pb2.SetBalanceAlertRequest(
            request_id="alert", account_id="a", threshold=threshold
        ),
        metadata=b.admin,
    )


def _purchase(b: BillingCalls, effective: str):
    return b.stub.PurchasePackage(
        billing_service_pb2.PurchasePackageRequest(
            request_id="buy",
            account_id="a",
            offer_id=OFFER,
            region=REGION,
            effective_time=ts(effective),
        ),
        metadata=b.admin,
    )


def _bill(b: BillingCalls, month: str):
    return b.get_bill("a", month)


def _create(b: BillingCalls, **fields):
    return b.stub.CreateAccount(
        billing_service_pb2.CreateAccountRequest(
            account=billing_pb2.Account(account_id="b", **fields)
        ),
        metadata=b.admin,
    )


BILLING_CASES = {
    "account of an unknown kind": (lambda b: _create(b, kind=99), "account.kind"),
    "grace period of 10,000 years": (
        lambda b: _create(b, grace_period=duration_pb2.Duration(seconds=315576000000)),
        "account.grace_period",
    ),
    "display name of 10,000 characters": (
        lambda b: _create(b, display_name="x" * 10_000),
        "account.display_name",
    ),
    "top-up of 2^63-1 units": (lambda b: _top_up(b, usd(NEAR_INT64)), "amount"),
    "top-up of 2^63 micro-units": (
        lambda b: _top_up(b, usd(9_223_372_036_854, 775_808_000)),
        "amount",
    ),
    "top-up with nanos of the other sign": (lambda b: _top_up(b, usd(1, -5000)), "amount"),
    "top-up with nanos out of range": (lambda b: _top_up(b, usd(0, 1_000_000_000)), "amount"),
    "balance alert at 2^63-1 units": (lambda b: _alert(b, usd(NEAR_INT64)), "threshold"),
    "balance alert at -2^63 units": (lambda b: _alert(b, usd(-(2**63))), "threshold"),
    "purchase effective in year 9999": (lambda b: _purchase(b, YEAR_9999), "effective_time"),
    "purchase effective 8999-06-01 (ends past the range)": (
        lambda b: _purchase(b, "8999-06-01T00:00:00Z"),
        "effective_time",
    ),
    "bill of 9999-12": (lambda b: _bill(b, "9999-12"), "month"),
    "bill of 0000-01": (lambda b: _bill(b, "0000-01"), "month"),
    "bill in Arabic-Indic digits": (lambda b: _bill(b, "٢٠٢٤-٠١"), "month"),
    "bill in full-width digits": (lambda b: _bill(b, "２０２４-０１"), "month"),
    "export of 9999-12": (lambda b: b.export_bill("a", "9999-12"), "month"),
}


@pytest.mark.parametrize("case", list(BILLING_CASES))
async def test_billing_refuses_extreme_input(quota_and_billing_urls, tmp_path, case):
    async with billing_suite(quota_and_billing_urls, tmp_path) as (quota, billing):
        await billing.create_account("a")
        await billing.top_up("a", "10")
        call, field = BILLING_CASES[case]
        await expect_error(call(billing), INVALID, field=field)
        account = await billing.get_account("a")
        assert (account.balance.units, account.balance.nanos) == (10, 0)
        assert not account.HasField("balance_alert_threshold")
        assert await quota.package_ids("a") == []
        await expect_error(
            billing.stub.GetAccount(
                billing_service_pb2.GetAccountRequest(account_id="b"), metadata=billing.admin
            ),
            grpc.StatusCode.NOT_FOUND,
        )


async def test_a_balance_topped_up_to_the_limit_refuses_more(quota_and_billing_urls, tmp_path):
    async with billing_suite(quota_and_billing_urls, tmp_path) as (_quota, billing):
        await billing.create_account("a")
        limit_units = 10**12
        await _top_up(billing, usd(limit_units - 100), "first")
        await expect_error(
            _top_up(billing, usd(200), "second"),
            grpc.StatusCode.FAILED_PRECONDITION,
            reason="BALANCE_LIMIT",
        )
        assert (await billing.get_account("a")).balance.units == limit_units - 100


# --- notification -------------------------------------------------------------------------------


NOTIFICATION_CASES = {
    "unknown channel": (dict(channel=99, address="ops@example.com"), "contact.channel"),
    "unknown message type": (
        dict(channel=notification_pb2.CHANNEL_EMAIL, address="ops@example.com", message_types=[99]),
        "contact.message_types",
    ),
    "address of 10,000 characters": (
        dict(channel=notification_pb2.CHANNEL_EMAIL, address="a" * 10_000 + "@example.com"),
        "contact.address",
    ),
}


@pytest.mark.parametrize("case", list(NOTIFICATION_CASES))
async def test_notification_refuses_extreme_input(database_url, tmp_path, case):
    fields, field = dict(NOTIFICATION_CASES[case][0]), NOTIFICATION_CASES[case][1]
    settings = notification_settings(database_url, tmp_path, f"127.0.0.1:{closed_port()}")
    async with running_notification(settings) as notification:
        calls = notification.calls
        request = notification_service_pb2.CreateContactRequest(
            contact=notification_pb2.Contact(
                account_id="a", message_types=fields.pop("message_types", [1]), **fields
            )
        )
        await expect_error(
            calls.stub.CreateContact(request, metadata=calls.admin), INVALID, field=field
        )
        listing = await calls.stub.ListContacts(
            notification_service_pb2.ListContactsRequest(account_id="a"), metadata=calls.admin
        )
        assert list(listing.contacts) == []


async def test_a_renewal_past_the_range_is_refused_before_it_is_paid(
    quota_and_billing_urls, tmp_path
):
    """A package bought to run until 8999-06 cannot be renewed for another year: the request
    is well-formed, the package's expiry makes it impossible (FAILED_PRECONDITION)."""
    async with billing_suite(quota_and_billing_urls, tmp_path) as (_quota, billing):
        await billing.create_account("a")
        await billing.top_up("a", "10")
        order = await _purchase(billing, "8998-06-01T00:00:00Z")
        renewal = billing.stub.RenewPackage(
            billing_service_pb2.RenewPackageRequest(
                request_id="renew", account_id="a", package_id=order.package_id
            ),
            metadata=billing.admin,
        )
        await expect_error(
            renewal, grpc.StatusCode.FAILED_PRECONDITION, reason="VALIDITY_OUT_OF_RANGE"
        )
        assert (await billing.get_account("a")).balance.units == 9


async def test_notifications_of_an_unknown_type_are_refused(database_url, tmp_path):
    settings = notification_settings(database_url, tmp_path, f"127.0.0.1:{closed_port()}")
    async with running_notification(settings) as notification:
        calls = notification.calls
        request = notification_service_pb2.ListNotificationsRequest(
            account_id="a", message_types=[99]
        )
        await expect_error(
            calls.stub.ListNotifications(request, metadata=calls.admin),
            INVALID,
            field="message_types",
        )
