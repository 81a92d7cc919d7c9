"""Pay-per-use settlement, arrears by the clock and bills, through real servers: a quota server
and a billing server (both in-process, manual clocks, SQLite or PostgreSQL each), billing
consuming quota's real `WatchEvents` stream.

Times are written in the billing time zone (Asia/Shanghai, UTC+08:00). Both clocks start at
2024-05-01 08:00 there. Quota's clock is moved to each call's time before it is reported;
billing's clock is moved once its consumer has caught up with quota's stream, so every
settlement happens at a known instant. The test catalog prices passport at 0.10 up to 10 calls
a month and 0.05 after; general-text the same after 3 free calls; id-card at 0.0025.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
import pytest
from allot.billing.v1 import billing_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2
from sqlalchemy import insert, select

from services.billing.adapters import tables as billing_tables
from services.billing.app import settlement, standing
from services.billing.app.usage import BACKLOG_LAG, MAX_WAIT, settlement_waits
from services.billing.domain.bills import CSV_COLUMNS
from shared.timeutil import to_epoch_us
from tests.support.billing import (
    BILLING_TZ,
    TIER_1_UP_TO,
    BillingHandle,
    billing_settings,
    local,
    micros,
    money_micros_of,
    running_billing,
    write_catalog,
)
from tests.support.calls import expect_error
from tests.support.quota import QuotaCalls, QuotaHandle, running_quota
from tests.support.quota import quota_settings as quota_settings_for
from tests.support.servers import free_port
from tests.support.standings import FROZEN, GOOD, GRACE, RELEASED

TZ = BILLING_TZ
START = "2024-05-01T00:00:00Z"  # 2024-05-01 08:00 in the billing time zone
HK, BKK = "ap-southeast-1", "ap-southeast-2"
PASSPORT, GENERAL, ID_CARD = "passport", "general-text", "id-card"

PAY_PER_USE = billing_pb2.BILL_LINE_KIND_PAY_PER_USE
TOP_UP = billing_pb2.BILL_LINE_KIND_TOP_UP
MASTER = billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER
MEMBER = billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER


@dataclass
class Suite:
    quota_handle: QuotaHandle
    quota: QuotaCalls
    billing_handle: BillingHandle
    quota_now: datetime

    @property
    def billing(self):
        return self.billing_handle.calls

    async def report(
        self,
        account: str,
        at: datetime,
        quantity: int = 1,
        *,
        api: str = PASSPORT,
        region: str = HK,
        project: str = "",
    ):
        """Report `quantity` calls at `at` (quota's clock moved there first)."""
        if at > self.quota_now:
            await self.quota.set_time(at)
            self.quota_now = at
        event_id = f"{account}-{region}-{api}-{project}-{to_epoch_us(at)}-{quantity}"
        return await self.quota.report(
            event_id, account, quantity, api=api, region=region, project=project, occur=at
        )

    async def move_quota(self, at: datetime) -> None:
        await self.quota.set_time(at)
        self.quota_now = at

    async def synced(self) -> None:
        """Wait until billing has taken in every pay-per-use event quota has written."""
        await self.billing_handle.caught_up_with(self.quota_handle)

    async def settle_at(self, at: datetime) -> None:
        """Move billing's clock to `at` once it has every event: due cycles settle there."""
        await self.synced()
        await self.billing.set_time(at)

    async def bill(self, account: str, month: str) -> billing_pb2.Bill:
        return await self.billing.get_bill(account, month)

    async def pay_per_use(self, account: str, month: str) -> list[billing_pb2.BillLine]:
        return [
            line for line in (await self.bill(account, month)).lines if line.kind == PAY_PER_USE
        ]

    async def balance(self, account: str) -> int:
        return micros((await self.billing.get_account(account)).balance)

    async def subscribe(self, account: str, region: str, api: str = PASSPORT) -> None:
        """What SubscribeApi does: quota enables the API and billing keeps its record."""
        await self.quota.enable(account, api, region, request_id=f"sub-{account}-{region}-{api}")
        now = to_epoch_us(self.quota_now)
        db = self.billing_handle.server.runtime.db

        async def work(uow):
            await uow.session.execute(
                insert(billing_tables.api_subscriptions).values(
                    account_id=account,
                    region=region,
                    api=api,
                    state=int(standing.SubscriptionState.ACTIVE),
                    create_time_us=now,
                    update_time_us=now,
                )
            )

        await db.transaction(work)

    async def subscription_states(self, account: str) -> dict[tuple[str, str], int]:
        s = billing_tables.api_subscriptions.c
        db = self.billing_handle.server.runtime.db

        async def work(uow):
            rows = await uow.session.execute(
                select(s.region, s.api, s.state).where(s.account_id == account)
            )
            return {(r.region, r.api): r.state for r in rows}

        return await db.read(work)


@contextlib.asynccontextmanager
async def running_suite(urls, tmp_path, **billing_overrides: str):
    quota_url, billing_url = urls
    catalog = str(write_catalog(tmp_path))
    (tmp_path / "quota").mkdir(exist_ok=True)
    (tmp_path / "billing").mkdir(exist_ok=True)
    quota_settings = quota_settings_for(
        quota_url, tmp_path / "quota", clock="manual", clock_start=START, catalog=catalog
    )
    async with running_quota(quota_settings) as quota:
        settings = billing_settings(
            billing_url,
            tmp_path / "billing",
            quota.addr,
            START,
            catalog=catalog,
            **billing_overrides,
        )
        async with running_billing(settings) as billing:
            yield Suite(quota, QuotaCalls(quota), billing, local("2024-05-01 08:00"))


@pytest.fixture
async def suite(quota_and_billing_urls, tmp_path):
    async with running_suite(quota_and_billing_urls, tmp_path) as s:
        yield s


def cycles(lines) -> list[tuple[datetime, datetime, int]]:
    return [
        (
            line.cycle_start_time.ToDatetime(tzinfo=TZ),
            line.cycle_end_time.ToDatetime(tzinfo=TZ),
            line.quantity,
        )
        for line in lines
    ]


def tiers(line) -> list[tuple[int, int, int]]:
    """(tier, quantity, unit price in micros) of a line."""
    return [(t.tier, t.quantity, micros(t.unit_price)) for t in line.tiers]


# --- hourly cycles --------------------------------------------------------------------------


async def test_calls_form_hourly_cycles_settled_after_they_end(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "100")
    for minute in (45, 47, 50, 52, 55):
        await suite.report("acme", local(f"2024-05-01 08:{minute}"))
    await suite.report("acme", local("2024-05-01 09:59:50"))
    await suite.report("acme", local("2024-05-01 10:00:10"))

    await suite.settle_at(local("2024-05-01 08:59:59"))
    assert await suite.pay_per_use("acme", "2024-05") == []  # the cycle has not ended
    await suite.settle_at(local("2024-05-01 09:00"))
    first = await suite.pay_per_use("acme", "2024-05")
    assert cycles(first) == [(local("2024-05-01 08:00"), local("2024-05-01 09:00"), 5)]
    assert first[0].occur_time.ToDatetime(tzinfo=TZ) == local("2024-05-01 09:00")

    await suite.settle_at(local("2024-05-01 11:00"))
    lines = await suite.pay_per_use("acme", "2024-05")
    assert cycles(lines) == [
        (local("2024-05-01 08:00"), local("2024-05-01 09:00"), 5),
        (local("2024-05-01 09:00"), local("2024-05-01 10:00"), 1),
        (local("2024-05-01 10:00"), local("2024-05-01 11:00"), 1),
    ]
    assert [micros(line.amount) for line in lines] == [
        money_micros_of("-0.50"),
        money_micros_of("-0.10"),
        money_micros_of("-0.10"),
    ]
    assert [line.region for line in lines] == [HK] * 3
    assert [line.api for line in lines] == [PASSPORT] * 3
    assert [line.enterprise_project_id for line in lines] == ["0"] * 3
    assert await suite.balance("acme") == money_micros_of("99.30")
    # Settling again (the clock moved, nothing new) books nothing more.
    await suite.settle_at(local("2024-05-01 12:00"))
    assert len(await suite.pay_per_use("acme", "2024-05")) == 3
    assert await suite.balance("acme") == money_micros_of("99.30")


# --- tiers ----------------------------------------------------------------------------------


async def test_tiers_count_the_months_calls_in_the_billing_time_zone(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "100")
    # Calls 1..10 of May are tier 1; call 11 (T+1) is tier 2.
    await suite.report("acme", local("2024-05-01 08:10"), TIER_1_UP_TO)
    await suite.settle_at(local("2024-05-01 09:00"))
    await suite.report("acme", local("2024-05-01 09:10"))
    await suite.settle_at(local("2024-05-01 10:00"))
    # The last hour of May (billing time zone) is still May: tier 2; the first call of June
    # (2024-05-31 16:10 UTC) is call 1 of June: tier 1 again.
    await suite.report("acme", local("2024-05-31 23:50"))
    await suite.settle_at(local("2024-06-01 00:00"))
    await suite.report("acme", local("2024-06-01 00:10"))
    await suite.settle_at(local("2024-06-01 01:00"))

    may = await suite.pay_per_use("acme", "2024-05")
    assert [tiers(line) for line in may] == [
        [(1, 10, money_micros_of("0.10"))],
        [(2, 1, money_micros_of("0.05"))],
        [(2, 1, money_micros_of("0.05"))],
    ]
    assert [micros(line.amount) for line in may] == [
        money_micros_of("-1.00"),
        money_micros_of("-0.05"),
        money_micros_of("-0.05"),
    ]
    # The May 31 23:00 cycle was settled at 00:00 on June 1 but is on May's bill.
    assert may[-1].occur_time.ToDatetime(tzinfo=TZ) == local("2024-06-01 00:00")
    june = await suite.pay_per_use("acme", "2024-06")
    assert [tiers(line) for line in june] == [[(1, 1, money_micros_of("0.10"))]]
    assert cycles(june) == [(local("2024-06-01 00:00"), local("2024-06-01 01:00"), 1)]


async def test_free_allowance_first_and_a_cycle_split_across_tiers(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "10")
    await suite.report("acme", local("2024-05-01 08:10"), 5, api=GENERAL)  # calls 1-5
    await suite.report("acme", local("2024-05-01 09:10"), 7, api=GENERAL)  # calls 6-12
    await suite.settle_at(local("2024-05-01 10:00"))
    first, second = await suite.pay_per_use("acme", "2024-05")
    assert (first.quantity, first.free_quantity, tiers(first)) == (
        5,
        3,
        [(1, 2, money_micros_of("0.10"))],
    )
    assert micros(first.amount) == money_micros_of("-0.20")
    assert (second.quantity, second.free_quantity) == (7, 0)
    assert tiers(second) == [(1, 5, money_micros_of("0.10")), (2, 2, money_micros_of("0.05"))]
    assert [micros(t.amount) for t in second.tiers] == [
        money_micros_of("0.50"),
        money_micros_of("0.10"),
    ]
    assert micros(second.amount) == money_micros_of("-0.60")
    assert await suite.balance("acme") == money_micros_of("9.20")


async def test_package_paid_calls_never_count_toward_tiers(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "10")
    await suite.quota.grant("acme", 15, region=BKK, effective=START)
    response = await suite.report("acme", local("2024-05-01 08:10"), 17, region=BKK)
    assert response.pay_per_use_quantity == 2
    await suite.settle_at(local("2024-05-01 09:00"))
    (line,) = await suite.pay_per_use("acme", "2024-05")
    # Calls 1 and 2 of the month's pay-per-use: tier 1, though 17 calls were made.
    assert (line.region, line.quantity, tiers(line)) == (BKK, 2, [(1, 2, money_micros_of("0.10"))])


async def test_each_cycle_is_rounded_half_up_to_the_cent(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "1")
    await suite.report("acme", local("2024-05-01 08:10"), 2, api=ID_CARD)  # 0.005
    await suite.report("acme", local("2024-05-01 09:10"), 1, api=ID_CARD)  # 0.0025
    await suite.report("acme", local("2024-05-01 10:10"), 3, api=ID_CARD)  # 0.0075
    await suite.settle_at(local("2024-05-01 11:00"))
    lines = await suite.pay_per_use("acme", "2024-05")
    assert [micros(line.amount) for line in lines] == [
        money_micros_of("-0.01"),
        0,
        money_micros_of("-0.01"),
    ]
    # The tier amounts stay exact.
    assert [micros(line.tiers[0].amount) for line in lines] == [5_000, 2_500, 7_500]
    assert await suite.balance("acme") == money_micros_of("0.98")


async def test_enterprise_projects_make_own_lines_but_share_the_tier_count(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "10")
    await suite.report("acme", local("2024-05-01 08:10"), 8, project="p-a")
    await suite.report("acme", local("2024-05-01 08:20"), 4, project="p-b")
    await suite.settle_at(local("2024-05-01 09:00"))
    lines = await suite.pay_per_use("acme", "2024-05")
    by_project = {line.enterprise_project_id: tiers(line) for line in lines}
    assert by_project == {
        "p-a": [(1, 8, money_micros_of("0.10"))],
        "p-b": [(1, 2, money_micros_of("0.10")), (2, 2, money_micros_of("0.05"))],
    }


# --- who pays -------------------------------------------------------------------------------


async def test_an_enterprise_members_pay_per_use_is_charged_to_its_master(suite):
    await suite.billing.create_account("corp", MASTER)
    await suite.billing.create_account("corp-dev", MEMBER, master_account_id="corp")
    await suite.billing.top_up("corp", "10")
    # The master's package is never used by the member: its calls are all pay-per-use.
    await suite.quota.grant("corp", 100, effective=START)
    response = await suite.report("corp-dev", local("2024-05-01 08:10"), 3)
    assert response.pay_per_use_quantity == 3
    await suite.settle_at(local("2024-05-01 09:00"))

    assert await suite.balance("corp") == money_micros_of("9.70")
    member_bill = await suite.bill("corp-dev", "2024-05")
    assert [
        (line.account_id, line.quantity, micros(line.amount)) for line in member_bill.lines
    ] == [("corp-dev", 3, money_micros_of("-0.30"))]
    assert not member_bill.HasField("opening_balance")  # a member has no balance of its own
    assert not member_bill.HasField("closing_balance")
    master_bill = await suite.bill("corp", "2024-05")
    # Ordered by bill time (the cycle's start for pay-per-use), then kind.
    assert [(line.kind, line.account_id) for line in master_bill.lines] == [
        (PAY_PER_USE, "corp-dev"),
        (TOP_UP, "corp"),
    ]
    assert micros(master_bill.opening_balance) == 0
    assert micros(master_bill.closing_balance) == money_micros_of("9.70")


# --- arrears --------------------------------------------------------------------------------


async def test_arrears_timeline_grace_frozen_released(suite):
    for account in ("late", "saved"):
        await suite.billing.create_account(account)
    await suite.billing.create_account("corp", MASTER)
    await suite.billing.create_account("corp-dev", MEMBER, master_account_id="corp")
    await suite.subscribe("late", HK)
    await suite.subscribe("late", BKK, GENERAL)
    await suite.subscribe("corp-dev", HK)
    await suite.subscribe("saved", HK)
    for account in ("late", "saved", "corp-dev"):
        await suite.report(account, local("2024-05-01 10:30"))
    events_before = len(await suite.billing.events())

    # Zero balance, pay-per-use settled at 11:00: GRACE from then.
    await suite.settle_at(local("2024-05-01 11:00"))
    for account in ("late", "saved", "corp", "corp-dev"):
        got = await suite.billing.get_account(account)
        assert got.standing == GRACE, account
        assert got.standing_change_time.ToDatetime(tzinfo=TZ) == local("2024-05-01 11:00")
        assert got.grace_end_time.ToDatetime(tzinfo=TZ) == local("2024-05-16 11:00")
        assert got.retention_end_time.ToDatetime(tzinfo=TZ) == local("2024-05-31 11:00")
    changed = [
        e.account_standing_changed
        for e in await suite.billing.events(events_before)
        if e.WhichOneof("payload") == "account_standing_changed"
    ]
    assert sorted((c.account_id, c.previous_standing, c.standing) for c in changed) == [
        ("corp", GOOD, GRACE),
        ("corp-dev", GOOD, GRACE),
        ("late", GOOD, GRACE),
        ("saved", GOOD, GRACE),
    ]

    # A top-up on 2024-05-10 that covers the debt: GOOD at once, and it stays good.
    await suite.billing.set_time(local("2024-05-10 09:00"))
    saved = await suite.billing.top_up("saved", "0.10")
    assert saved.standing == GOOD
    assert micros(saved.balance) == 0

    await suite.billing.set_time(local("2024-05-16 10:59:59"))
    assert (await suite.billing.get_account("late")).standing == GRACE
    await suite.billing.set_time(local("2024-05-16 11:00"))
    late = await suite.billing.get_account("late")
    assert late.standing == FROZEN
    assert late.standing_change_time.ToDatetime(tzinfo=TZ) == local("2024-05-16 11:00")
    assert (await suite.billing.get_account("corp-dev")).standing == FROZEN
    assert (await suite.billing.get_account("saved")).standing == GOOD

    await suite.billing.set_time(local("2024-05-31 10:59:59"))
    assert await suite.subscription_states("late") == {
        (HK, PASSPORT): standing.SubscriptionState.ACTIVE,
        (BKK, GENERAL): standing.SubscriptionState.ACTIVE,
    }
    await suite.billing.set_time(local("2024-05-31 11:00"))
    late = await suite.billing.get_account("late")
    assert late.standing == RELEASED
    assert late.standing_change_time.ToDatetime(tzinfo=TZ) == local("2024-05-31 11:00")
    # Released: the subscriptions of the account and of the master's member are gone, in
    # billing and at quota; the account that paid keeps its own.
    cancelled = standing.SubscriptionState.CANCELLED
    assert await suite.subscription_states("late") == {
        (HK, PASSPORT): cancelled,
        (BKK, GENERAL): cancelled,
    }
    assert await suite.subscription_states("corp-dev") == {(HK, PASSPORT): cancelled}
    assert await suite.subscription_states("saved") == {
        (HK, PASSPORT): standing.SubscriptionState.ACTIVE
    }
    at_quota = await suite.quota.subscriptions("late")
    assert {(s.region, s.api, s.state) for s in at_quota.api_subscriptions} == {
        (HK, PASSPORT, quota_pb2.API_SUBSCRIPTION_STATE_CANCELLED),
        (BKK, GENERAL, quota_pb2.API_SUBSCRIPTION_STATE_CANCELLED),
    }
    check = await suite.quota.check("late")
    assert (check.allowed, check.deny_reason) == (
        False,
        quota_service_pb2.DENY_REASON_API_NOT_SUBSCRIBED,
    )
    assert (await suite.quota.check("saved")).allowed

    # Every change announced once, in order.
    changed = [
        (e.account_standing_changed.previous_standing, e.account_standing_changed.standing)
        for e in await suite.billing.events(events_before)
        if e.WhichOneof("payload") == "account_standing_changed"
        and e.account_standing_changed.account_id == "late"
    ]
    assert changed == [(GOOD, GRACE), (GRACE, FROZEN), (FROZEN, RELEASED)]


async def test_a_clock_moved_past_both_ends_stamps_each_change_when_it_came_due(suite):
    await suite.billing.create_account("late")
    await suite.report("late", local("2024-05-01 10:30"))
    await suite.settle_at(local("2024-05-01 11:00"))
    before = len(await suite.billing.events())
    await suite.billing.set_time(local("2024-07-01 00:00"))
    late = await suite.billing.get_account("late")
    assert late.standing == RELEASED
    assert late.standing_change_time.ToDatetime(tzinfo=TZ) == local("2024-05-31 11:00")
    changes = [
        (e.account_standing_changed.previous_standing, e.account_standing_changed.standing)
        for e in await suite.billing.events(before)
        if e.WhichOneof("payload") == "account_standing_changed"
    ]
    assert changes == [(GRACE, FROZEN), (FROZEN, RELEASED)]
    # A top-up that covers the debt returns even a released account to GOOD.
    assert (await suite.billing.top_up("late", "1")).standing == GOOD


async def test_release_is_retried_while_a_regions_quota_is_unreachable(
    quota_and_billing_urls, tmp_path
):
    port = free_port()  # nothing listens here yet: BKK's quota is down
    async with running_suite(
        quota_and_billing_urls, tmp_path, quota_endpoints=f"{BKK}=127.0.0.1:{port}"
    ) as suite:
        releaser = standing.wire_standing(suite.billing_handle.service)
        releaser.retry_seconds = 0  # retry on every run of the due work
        await suite.billing.create_account("late")
        await suite.subscribe("late", HK)
        db = suite.billing_handle.server.runtime.db

        async def put_bkk(uow):  # BKK's record; its quota is told at release
            await uow.session.execute(
                insert(billing_tables.api_subscriptions).values(
                    account_id="late",
                    region=BKK,
                    api=PASSPORT,
                    state=int(standing.SubscriptionState.ACTIVE),
                    create_time_us=0,
                    update_time_us=0,
                )
            )

        await db.transaction(put_bkk)
        await suite.report("late", local("2024-05-01 10:30"))
        await suite.settle_at(local("2024-05-01 11:00"))
        await suite.billing.set_time(local("2024-05-31 11:00"))
        assert (await suite.billing.get_account("late")).standing == RELEASED
        assert await suite.subscription_states("late") == {
            (HK, PASSPORT): standing.SubscriptionState.CANCELLED,
            (BKK, PASSPORT): standing.SubscriptionState.RELEASING,  # pending: quota is down
        }
        # BKK's quota comes up (with the subscription it had); the next run tells it.
        (tmp_path / "bkk").mkdir()
        bkk_settings = quota_settings_for(
            f"sqlite+aiosqlite:///{tmp_path / 'bkk' / 'quota.db'}",
            tmp_path / "bkk",
            clock="manual",
            clock_start=START,
            catalog=str(tmp_path / "catalog.yaml"),
            quota_addr=f"127.0.0.1:{port}",
            quota_regions=BKK,
        )
        async with running_quota(bkk_settings) as bkk:
            bkk_calls = QuotaCalls(bkk)
            await bkk_calls.enable("late", PASSPORT, BKK)
            cancelled = standing.SubscriptionState.CANCELLED
            # Each move of the clock is a run; the channel may need a moment to reconnect.
            deadline = time.monotonic() + 30
            while (await suite.subscription_states("late"))[(BKK, PASSPORT)] != cancelled:
                assert time.monotonic() < deadline, "the release never reached BKK's quota"
                await suite.billing.advance(timedelta(minutes=1))
                await asyncio.sleep(0.1)
            assert await suite.subscription_states("late") == {
                (HK, PASSPORT): standing.SubscriptionState.CANCELLED,
                (BKK, PASSPORT): standing.SubscriptionState.CANCELLED,
            }
            found = await bkk_calls.subscriptions("late", BKK)
            assert [s.state for s in found.api_subscriptions] == [
                quota_pb2.API_SUBSCRIPTION_STATE_CANCELLED
            ]


# --- bills ----------------------------------------------------------------------------------


async def test_bill_lines_add_up_to_the_change_of_balance_and_export_as_csv(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "5")
    await suite.report("acme", local("2024-05-01 08:10"), 4)
    await suite.report("acme", local("2024-05-01 09:10"), 2, api=GENERAL)  # free
    await suite.settle_at(local("2024-05-01 10:00"))
    await suite.billing.top_up("acme", "1.25")
    # The last hour of May is settled in June but belongs to May's bill.
    await suite.report("acme", local("2024-05-31 23:30"), 3)
    await suite.settle_at(local("2024-06-01 00:00"))
    await suite.report("acme", local("2024-06-01 00:30"), 1)
    await suite.settle_at(local("2024-06-01 01:00"))

    may = await suite.bill("acme", "2024-05")
    # By bill time (a cycle's start, else the booking), then kind: the 08:00 cycle first.
    assert [(line.kind, line.quantity) for line in may.lines] == [
        (PAY_PER_USE, 4),
        (TOP_UP, 0),
        (PAY_PER_USE, 2),
        (TOP_UP, 0),
        (PAY_PER_USE, 3),
    ]
    total = sum(micros(line.amount) for line in may.lines)
    assert micros(may.opening_balance) == 0
    assert micros(may.closing_balance) == micros(may.opening_balance) + total
    assert (
        micros(may.total)
        == total
        == money_micros_of("5")
        - money_micros_of("0.40")
        + money_micros_of("1.25")
        - money_micros_of("0.30")
    )
    assert may.start_time.ToDatetime(tzinfo=TZ) == local("2024-05-01 00:00")
    assert may.end_time.ToDatetime(tzinfo=TZ) == local("2024-06-01 00:00")
    june = await suite.bill("acme", "2024-06")
    assert june.opening_balance == may.closing_balance
    assert micros(june.closing_balance) == await suite.balance("acme") == money_micros_of("5.45")
    assert sum(micros(line.amount) for line in june.lines) == money_micros_of("-0.10")

    exported = (await suite.billing.export_bill("acme", "2024-05")).csv
    rows = list(csv.reader(io.StringIO(exported)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 1 + len(may.lines)
    by_column = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert [row["kind"] for row in by_column] == [
        "PAY_PER_USE",
        "TOP_UP",
        "PAY_PER_USE",
        "TOP_UP",
        "PAY_PER_USE",
    ]
    assert by_column[0]["cycle_start_time"] == "2024-05-01T08:00:00+08:00"
    assert by_column[0]["balance_effect"] == "-0.40"
    assert by_column[2]["free_quantity"] == "2"
    assert sum(money_micros_of(row["balance_effect"]) for row in by_column) == total


async def test_bill_requests_are_checked(suite):
    await suite.billing.create_account("acme")
    await suite.billing.create_account("other")
    for month in ("2024-13", "2024-5", "May", "", "0000-01", "9999-12"):
        await expect_error(
            suite.billing.get_bill("acme", month), grpc.StatusCode.INVALID_ARGUMENT, field="month"
        )
    await expect_error(
        suite.billing.export_bill("acme", "2024/05"),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="month",
    )
    mine = suite.billing.account("acme", read_only=True)
    assert (await suite.billing.get_bill("acme", "2024-05", metadata=mine)).account_id == "acme"
    for account in ("other", "missing"):
        await expect_error(
            suite.billing.get_bill(account, "2024-05", metadata=mine),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await expect_error(
        suite.billing.get_bill("missing", "2024-05"),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    empty = await suite.bill("acme", "2024-05")
    assert (list(empty.lines), micros(empty.opening_balance), micros(empty.total)) == ([], 0, 0)
    assert (await suite.billing.export_bill("acme", "2024-05")).csv.count("\n") == 1


# --- balance alert, late usage, unknown accounts ----------------------------------------------


async def test_balance_alert_fires_once_when_a_charge_crosses_the_threshold(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "10")
    await suite.billing.set_balance_alert("acme", "9.85")
    before = len(await suite.billing.events())
    for hour in (8, 9, 10):  # 9.90, 9.80 (crosses), 9.70
        await suite.report("acme", local(f"2024-05-01 {hour:02d}:10"))
    await suite.settle_at(local("2024-05-01 11:00"))
    alerts = [
        e.balance_below_threshold
        for e in await suite.billing.events(before)
        if e.WhichOneof("payload") == "balance_below_threshold"
    ]
    assert [(a.account_id, micros(a.balance), micros(a.threshold)) for a in alerts] == [
        ("acme", money_micros_of("9.80"), money_micros_of("9.85"))
    ]
    # Back above the threshold re-arms it; the next crossing fires again.
    await suite.billing.top_up("acme", "1")
    # Calls 4-14 of the month: 7 at 0.10 and 4 at 0.05, so 10.70 - 0.90 = 9.80.
    await suite.report("acme", local("2024-05-01 11:10"), 11)
    await suite.settle_at(local("2024-05-01 12:00"))
    alerts = [
        e.balance_below_threshold
        for e in await suite.billing.events(before)
        if e.WhichOneof("payload") == "balance_below_threshold"
    ]
    assert len(alerts) == 2


async def test_late_usage_of_a_settled_cycle_is_billed_once_more(suite):
    await suite.billing.create_account("acme")
    await suite.billing.top_up("acme", "10")
    await suite.report("acme", local("2024-05-01 08:10"), 9)
    await suite.settle_at(local("2024-05-01 09:00"))
    # Reported at 09:30 for 08:20: the cycle was settled; its further calls are billed as soon
    # as they arrive, numbered after the 9 already rated (call 10 tier 1, call 11 tier 2).
    await suite.move_quota(local("2024-05-01 09:30"))
    await suite.quota.report("late-1", "acme", 2, occur=local("2024-05-01 08:20"))
    await suite.settle_at(local("2024-05-01 09:30"))
    lines = await suite.pay_per_use("acme", "2024-05")
    assert [(line.quantity, tiers(line)) for line in lines] == [
        (9, [(1, 9, money_micros_of("0.10"))]),
        (2, [(1, 1, money_micros_of("0.10")), (2, 1, money_micros_of("0.05"))]),
    ]
    assert cycles(lines) == [
        (local("2024-05-01 08:00"), local("2024-05-01 09:00"), 9),
        (local("2024-05-01 08:00"), local("2024-05-01 09:00"), 2),
    ]
    assert "late" in lines[1].description
    assert await suite.balance("acme") == money_micros_of("10") - money_micros_of(
        "0.90"
    ) - money_micros_of("0.15")


async def test_usage_of_an_unknown_account_waits_for_the_account(suite):
    await suite.report("ghost", local("2024-05-01 08:10"), 2)
    await suite.settle_at(local("2024-05-01 09:30"))
    await suite.billing.create_account("ghost")
    await suite.billing.top_up("ghost", "1")
    await suite.billing.advance(timedelta(minutes=1))
    (line,) = await suite.pay_per_use("ghost", "2024-05")
    assert (line.quantity, micros(line.amount)) == (2, money_micros_of("-0.20"))
    assert line.occur_time.ToDatetime(tzinfo=TZ) == local("2024-05-01 09:31")


def test_settlement_waits_only_while_a_backlog_is_read():
    backlog = BACKLOG_LAG + timedelta(seconds=1)
    assert settlement_waits(0.1, backlog, waited=0)  # reading old events: wait
    assert not settlement_waits(0.1, timedelta(seconds=1), waited=0)  # live traffic
    assert not settlement_waits(60, backlog, waited=0)  # the intake went quiet
    assert not settlement_waits(0.1, backlog, waited=MAX_WAIT)  # waited long enough


async def test_a_backlog_is_settled_in_bounded_steps(suite, monkeypatch):
    # Small pages and runs: the scheduler runs the due work again while it makes progress.
    monkeypatch.setattr(settlement, "PAGE", 2)
    monkeypatch.setattr(settlement, "MAX_PER_RUN", 3)
    monkeypatch.setattr(standing, "PAGE", 2)
    accounts = [f"acct-{i}" for i in range(3)]
    for account in accounts:
        await suite.billing.create_account(account)
    for hour in (8, 9, 10):
        for account in accounts:
            await suite.report(account, local(f"2024-05-01 {hour:02d}:10"))
    await suite.settle_at(local("2024-05-01 11:00"))  # 9 cycles, all due
    for account in accounts:
        lines = await suite.pay_per_use(account, "2024-05")
        assert [line.quantity for line in lines] == [1, 1, 1]
        assert (await suite.billing.get_account(account)).standing == GRACE
    await suite.billing.set_time(local("2024-06-01 00:00"))  # grace and retention ended
    for account in accounts:
        assert (await suite.billing.get_account(account)).standing == RELEASED


async def test_a_top_up_after_grace_ended_tells_the_freeze_first(suite):
    """Between the end of grace and the clock's next pass (the system clock looks every few
    seconds), a top-up first applies the freeze that came due, then returns to GOOD."""
    await suite.billing.create_account("late")
    await suite.report("late", local("2024-05-01 10:30"))
    await suite.settle_at(local("2024-05-01 11:00"))
    before = len(await suite.billing.events())
    # The clock moves without a pass of the due work.
    suite.billing_handle.server.runtime.clock.set(local("2024-05-16 12:00"))
    assert (await suite.billing.top_up("late", "1")).standing == GOOD
    changes = [
        e.account_standing_changed
        for e in await suite.billing.events(before)
        if e.WhichOneof("payload") == "account_standing_changed"
    ]
    assert [(c.previous_standing, c.standing) for c in changes] == [(GRACE, FROZEN), (FROZEN, GOOD)]
    assert changes[0].change_time.ToDatetime(tzinfo=TZ) == local("2024-05-16 11:00")
    assert changes[1].change_time.ToDatetime(tzinfo=TZ) == local("2024-05-16 12:00")
