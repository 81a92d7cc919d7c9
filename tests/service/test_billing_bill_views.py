"""The reporting views of a bill, through real servers (a quota server and a billing server,
in-process, manual clocks, SQLite or PostgreSQL each; billing follows quota's stream): the
per-project subtotals that add up to the total, the project filter of GetBill and ExportBill,
and the per-account subtotals of an enterprise master's bill.

Times are in the billing time zone (Asia/Shanghai). The test catalog prices passport at 0.10
a call up to 10 calls a month; its offer passport-100-1y costs 1.00.
"""

from __future__ import annotations

import contextlib
import csv
import io
from dataclasses import dataclass

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2

from shared.timeutil import to_epoch_us
from tests.support.billing import (
    BILLING_TZ,
    BillingHandle,
    billing_settings,
    local,
    micros,
    money_micros_of,
    running_billing,
    write_catalog,
)
from tests.support.calls import expect_error
from tests.support.quota import QuotaCalls, QuotaHandle, quota_settings, running_quota

TZ = BILLING_TZ
START = "2024-05-01T00:00:00Z"  # 2024-05-01 08:00 in the billing time zone
HK, BKK = "ap-southeast-1", "ap-southeast-2"
MASTER = billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER
MEMBER = billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER
PURCHASED = billing_pb2.ORDER_STATE_FULFILLED


@dataclass
class Suite:
    quota_handle: QuotaHandle
    quota: QuotaCalls
    billing_handle: BillingHandle

    @property
    def billing(self):
        return self.billing_handle.calls

    async def report(self, account: str, at: str, quantity: int, project: str = "") -> None:
        """`quantity` passport calls in Hong Kong at local time `at` (quota's clock there)."""
        when = local(at)
        await self.quota.set_time(when)
        event_id = f"{account}-{project}-{to_epoch_us(when)}"
        await self.quota.report(event_id, account, quantity, project=project, occur=when)

    async def settle_at(self, at: str) -> None:
        """Once billing has every pay-per-use event quota wrote, move its clock to `at`."""
        await self.billing_handle.caught_up_with(self.quota_handle)
        await self.billing.set_time(local(at))

    def bill(self, account: str, project: str = ""):
        return self.billing.stub.GetBill(
            billing_service_pb2.GetBillRequest(
                account_id=account, month="2024-05", enterprise_project_id=project
            ),
            metadata=self.billing.admin,
        )

    def export(self, account: str, project: str = ""):
        return self.billing.stub.ExportBill(
            billing_service_pb2.ExportBillRequest(
                account_id=account, month="2024-05", enterprise_project_id=project
            ),
            metadata=self.billing.admin,
        )


@pytest.fixture
async def suite(quota_and_billing_urls, tmp_path):
    quota_url, billing_url = quota_and_billing_urls
    catalog = str(write_catalog(tmp_path))
    for name in ("quota", "billing"):
        (tmp_path / name).mkdir()
    settings = quota_settings(
        quota_url, tmp_path / "quota", clock="manual", clock_start=START, catalog=catalog
    )
    async with contextlib.AsyncExitStack() as stack:
        quota = await stack.enter_async_context(running_quota(settings))
        billing = await stack.enter_async_context(
            running_billing(
                billing_settings(
                    billing_url, tmp_path / "billing", quota.addr, START, catalog=catalog
                )
            )
        )
        yield Suite(quota, QuotaCalls(quota), billing)


def subtotals(entries, key: str) -> list[tuple[str, int]]:
    return [(getattr(entry, key), micros(entry.total)) for entry in entries]


async def test_project_subtotals_add_up_to_the_total_and_the_filter_keeps_one_project(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "10")
    order = await suite.billing.stub.PurchasePackage(
        billing_service_pb2.PurchasePackageRequest(
            request_id="buy-p-a",
            account_id="acme",
            offer_id="passport-100-1y",
            region=BKK,  # Bangkok: it pays for none of the Hong Kong calls below
            enterprise_project_id="p-a",
        ),
        metadata=suite.billing.admin,
        timeout=10,
    )
    assert order.state == PURCHASED
    await suite.report("acme", "2024-05-01 08:10", 2, project="p-a")
    await suite.report("acme", "2024-05-01 08:20", 3, project="p-b")
    await suite.report("acme", "2024-05-01 08:30", 1)  # no project: the default project "0"
    await suite.settle_at("2024-05-01 09:00")

    bill = await suite.bill("acme")
    # The top-up has no project: it counts under "".
    assert subtotals(bill.project_subtotals, "enterprise_project_id") == [
        ("", money_micros_of("10")),
        ("0", money_micros_of("-0.10")),
        ("p-a", money_micros_of("-1.20")),
        ("p-b", money_micros_of("-0.30")),
    ]
    assert sum(micros(s.total) for s in bill.project_subtotals) == micros(bill.total)
    assert (
        micros(bill.total)
        == sum(micros(line.amount) for line in bill.lines)
        == money_micros_of("8.40")
    )
    assert list(bill.member_subtotals) == []  # not an enterprise master

    only_a = await suite.bill("acme", "p-a")
    assert {line.enterprise_project_id for line in only_a.lines} == {"p-a"}
    # Both are placed at 08:00 (the cycle's start, the payment): by kind then.
    assert [line.kind for line in only_a.lines] == [
        billing_pb2.BILL_LINE_KIND_PAY_PER_USE,
        billing_pb2.BILL_LINE_KIND_PACKAGE_PURCHASE,
    ]
    assert micros(only_a.total) == money_micros_of("-1.20")
    assert subtotals(only_a.project_subtotals, "enterprise_project_id") == [
        ("p-a", money_micros_of("-1.20"))
    ]
    # One project's lines do not explain the account's balance: the balances are unset.
    assert not only_a.HasField("opening_balance") and not only_a.HasField("closing_balance")
    assert bill.HasField("closing_balance")
    assert list((await suite.bill("acme", "p-none")).lines) == []

    rows = list(csv.DictReader(io.StringIO((await suite.export("acme", "p-a")).csv)))
    assert [row["enterprise_project_id"] for row in rows] == ["p-a", "p-a"]
    everything = list(csv.DictReader(io.StringIO((await suite.export("acme")).csv)))
    assert sorted(row["enterprise_project_id"] for row in everything) == [
        "",
        "0",
        "p-a",
        "p-a",
        "p-b",
    ]

    for call in (suite.bill("acme", "not a project"), suite.export("acme", "x" * 65)):
        await expect_error(
            call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "enterprise_project_id"
        )


async def test_a_masters_bill_sums_each_members_spending(suite):
    await suite.billing.create_account("corp", MASTER)
    for member in ("corp-dev", "corp-ops"):
        await suite.billing.create_account(member, MEMBER, master_account_id="corp")
    await suite.billing.top_up("corp", "10")
    await suite.report("corp-dev", "2024-05-01 08:10", 3, project="p-a")
    await suite.report("corp-ops", "2024-05-01 08:20", 2)
    await suite.report("corp-dev", "2024-05-01 09:10", 1)
    await suite.settle_at("2024-05-01 10:00")

    bill = await suite.bill("corp")
    assert subtotals(bill.member_subtotals, "account_id") == [
        ("corp", money_micros_of("10")),  # the master's own lines: its top-up
        ("corp-dev", money_micros_of("-0.40")),
        ("corp-ops", money_micros_of("-0.20")),
    ]
    assert sum(micros(s.total) for s in bill.member_subtotals) == micros(bill.total)
    assert sum(micros(s.total) for s in bill.project_subtotals) == micros(bill.total)
    assert micros(bill.closing_balance) == money_micros_of("9.40")
    # Filtered by project, the member subtotals are those of the lines shown.
    only_a = await suite.bill("corp", "p-a")
    assert subtotals(only_a.member_subtotals, "account_id") == [
        ("corp-dev", money_micros_of("-0.30"))
    ]

    member_bill = await suite.bill("corp-dev")
    assert list(member_bill.member_subtotals) == []  # only a master's bill has them
    assert subtotals(member_bill.project_subtotals, "enterprise_project_id") == [
        ("0", money_micros_of("-0.10")),
        ("p-a", money_micros_of("-0.30")),
    ]
