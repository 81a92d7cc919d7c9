"""The console's account-wide views through real servers (docs/design/billing.md, "Account
overview"): two regional quota servers (HK and BKK, each its own SQLite database and region),
a notification server following HK's stream, and billing reading them all.

GetAccountOverview shows both regions' packages in force and billing's own pay-per-use; a
region whose quota is stopped, or hangs, is `available=false` within the read deadline while
the other answers; ListAccountPackages pages across regions; a usage alert no contact hears is
flagged; and a crossing that reaches nobody is kept, marked unheard, in ListNotifications.
"""

from __future__ import annotations

import contextlib
import socket
import time
from datetime import UTC, datetime

import grpc
import pytest
from allot.billing.v1 import billing_service_pb2
from allot.notification.v1 import notification_service_pb2
from allot.quota.v1 import quota_pb2
from sqlalchemy import insert

from services.billing.adapters import tables as billing_tables
from services.billing.app import overview as overview_app
from services.billing.domain.bills import BillLineKind
from shared.timeutil import to_epoch_us
from tests.support.billing import billing_settings, micros, running_billing, write_catalog
from tests.support.calls import expect_error
from tests.support.events import AlertCalls
from tests.support.notification import (
    ARREARS,
    EMAIL,
    USAGE_ALERT,
    notification_settings,
    running_notification,
    until,
)
from tests.support.quota import END_OF_YEAR, regional_quota, sqlite_in
from tests.support.receivers import closed_port
from tests.support.servers import Tokens

HK, BKK = "ap-southeast-1", "ap-southeast-2"
PASSPORT, ID_CARD = "passport", "id-card"
ACCOUNT, OTHER = "acct-1", "acct-2"
START = "2024-01-01T00:00:00Z"
ACTIVE = quota_pb2.PACKAGE_STATE_ACTIVE
EXHAUSTED = quota_pb2.PACKAGE_STATE_EXHAUSTED
# What the tests let a region's read take (the service's own bound is READ_TIMEOUT).
DEADLINE = 1.0


@contextlib.asynccontextmanager
async def _billing(tmp_path, catalog: str, endpoints: str, notification_addr: str):
    settings = billing_settings(
        sqlite_in(tmp_path / "billing"),
        tmp_path / "billing",
        "",
        START,
        catalog=catalog,
        quota_endpoints=endpoints,
        notification_addr=notification_addr,
    )
    async with running_billing(settings) as handle:
        await handle.calls.create_account(ACCOUNT)
        yield handle


@pytest.fixture
def catalog(tmp_path) -> str:
    return str(write_catalog(tmp_path))


@pytest.fixture(autouse=True)
def short_deadline(monkeypatch):
    monkeypatch.setattr(overview_app, "READ_TIMEOUT", DEADLINE)


@pytest.fixture
async def suite(tmp_path, catalog):
    """(hk, bkk, notification calls, billing handle), all running."""
    async with (
        regional_quota(tmp_path / "hk", HK, catalog, START) as hk,
        regional_quota(tmp_path / "bkk", BKK, catalog, START) as bkk,
    ):
        n_settings = notification_settings(
            sqlite_in(tmp_path / "notification"), tmp_path / "notification", hk.handle.addr
        )
        async with running_notification(n_settings) as notification:
            async with _billing(
                tmp_path,
                catalog,
                f"{HK}={hk.handle.addr},{BKK}={bkk.handle.addr}",
                notification.server.bound_addr,
            ) as billing:
                yield hk, bkk, notification.calls, billing


def _overview(billing, account_id: str = ACCOUNT, metadata=None):
    return billing.calls.stub.GetAccountOverview(
        billing_service_pb2.GetAccountOverviewRequest(account_id=account_id),
        metadata=metadata or billing.calls.admin,
    )


def _packages(billing, page_token: str = "", metadata=None, **fields):
    return billing.calls.stub.ListAccountPackages(
        billing_service_pb2.ListAccountPackagesRequest(
            account_id=fields.pop("account_id", ACCOUNT), page_token=page_token, **fields
        ),
        metadata=metadata or billing.calls.admin,
    )


def _apis(region) -> dict:
    return {
        a.api: (a.packages_in_force, a.remaining_quantity, a.total_quantity) for a in region.apis
    }


async def test_overview_shows_every_regions_packages_and_billings_pay_per_use(suite):
    hk, bkk, _, billing = suite
    await hk.grant(ACCOUNT, 100, region=HK, api=PASSPORT)
    soon = await hk.grant(ACCOUNT, 20, region=HK, api=PASSPORT, expire="2024-06-30T15:59:59Z")
    await hk.grant(OTHER, 7, region=HK, api=PASSPORT)  # another account's: not shown
    await bkk.grant(ACCOUNT, 50, region=BKK, api=PASSPORT)
    used_up = await bkk.grant(ACCOUNT, 5, region=BKK, api=ID_CARD)
    await bkk.report("e1", ACCOUNT, 5, region=BKK, api=ID_CARD)  # exhausted, still in force
    await hk.report("e2", ACCOUNT, 10, region=HK, api=PASSPORT)
    # Billing's own record of this month's pay-per-use in HK: 30 calls, 12 of them settled
    # for 1.20 (an exact ledger line); the rest of the current hour is not settled yet.
    hour = to_epoch_us(datetime(2024, 1, 1, tzinfo=UTC))

    async def ppu(uow):
        await uow.session.execute(
            insert(billing_tables.usage_cycles).values(
                account_id=ACCOUNT,
                region=HK,
                api=ID_CARD,
                enterprise_project_id="",
                cycle_start_us=hour,
                cycle_end_us=hour + 3_600_000_000,
                quantity=30,
                settled=False,
            )
        )
        await uow.session.execute(
            insert(billing_tables.ledger).values(
                entry_id="ppu-1",
                account_id=ACCOUNT,
                paying_account_id=ACCOUNT,
                kind=int(BillLineKind.PAY_PER_USE),
                amount_micros=-1_200_000,
                region=HK,
                api=ID_CARD,
                cycle_start_us=hour,
                cycle_end_us=hour + 3_600_000_000,
                quantity=12,
                occur_time_us=hour + 3_600_000_000,
            )
        )

    await billing.server.runtime.db.transaction(ppu)

    seen = await _overview(billing)
    assert seen.account.account_id == ACCOUNT and seen.notification_available
    assert [(r.region, r.available) for r in seen.regions] == [(HK, True), (BKK, True)]
    hk_region, bkk_region = seen.regions
    assert _apis(hk_region) == {PASSPORT: (2, 110, 120), ID_CARD: (0, 0, 0)}
    hk_passport = hk_region.apis[1]
    assert hk_passport.api == PASSPORT
    assert hk_passport.next_expire_time == soon.expire_time  # the earliest with calls left
    hk_id_card = hk_region.apis[0]
    assert hk_id_card.pay_per_use_quantity_month == 30
    assert micros(hk_id_card.pay_per_use_amount_month) == 1_200_000
    assert _apis(bkk_region) == {PASSPORT: (1, 50, 50), ID_CARD: (1, 0, 5)}
    bkk_id_card = next(a for a in bkk_region.apis if a.api == ID_CARD)
    assert not bkk_id_card.HasField("next_expire_time")  # nothing left to expire
    assert used_up.package_id  # granted, exhausted, counted above

    # An account token sees its own overview only; a region-limited one its regions only.
    tokens = Tokens()
    own = tokens.md(tokens.account(ACCOUNT, read_only=True))
    assert len((await _overview(billing, metadata=own)).regions) == 2
    hk_only = tokens.md(tokens.account(ACCOUNT, regions=[HK]))
    assert [r.region for r in (await _overview(billing, metadata=hk_only)).regions] == [HK]
    await expect_error(_overview(billing, OTHER, metadata=own), grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(_overview(billing, "nobody"), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_a_stopped_or_silent_region_is_unavailable_and_the_rest_answers(tmp_path, catalog):
    silent = socket.socket()  # accepts connections, never speaks: a hanging quota
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent_addr = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        async with regional_quota(tmp_path / "hk", HK, catalog, START) as hk:
            await hk.grant(ACCOUNT, 100, region=HK, api=PASSPORT)
            async with regional_quota(tmp_path / "bkk", BKK, catalog, START) as bkk:
                await bkk.grant(ACCOUNT, 50, region=BKK, api=PASSPORT)
                bkk_addr = bkk.handle.addr
            # BKK's quota is stopped now; notification is not running at all.
            for bkk_endpoint in (bkk_addr, silent_addr):
                async with _billing(
                    tmp_path / bkk_endpoint.replace(":", "_"),
                    catalog,
                    f"{HK}={hk.handle.addr},{BKK}={bkk_endpoint}",
                    f"127.0.0.1:{closed_port()}",
                ) as billing:
                    began = time.monotonic()
                    seen = await _overview(billing)
                    took = time.monotonic() - began
                    assert took < DEADLINE + 2.0, f"the overview took {took:.1f} s"
                    assert [(r.region, r.available) for r in seen.regions] == [
                        (HK, True),
                        (BKK, False),
                    ]
                    assert _apis(seen.regions[0]) == {PASSPORT: (1, 100, 100)}
                    assert _apis(seen.regions[1]) == {}
                    # Notification did not answer: who hears alerts is unknown, not "nobody".
                    assert not seen.notification_available and not seen.unheard_alerts

                    listed = await _packages(billing)
                    assert [p.region for p in listed.packages] == [HK]
                    assert list(listed.unavailable_regions) == [BKK]
                    assert listed.next_page_token == ""
    finally:
        silent.close()


async def test_account_packages_page_across_regions(suite):
    hk, bkk, _, billing = suite
    hk_ids = [(await hk.grant(ACCOUNT, 10 + i, region=HK)).package_id for i in range(3)]
    bkk_ids = [(await bkk.grant(ACCOUNT, 20 + i, region=BKK)).package_id for i in range(2)]
    await bkk.grant(ACCOUNT, 9, region=BKK, api=ID_CARD, project="proj-a")
    await hk.grant(OTHER, 1, region=HK)

    pages, token = [], ""
    for _ in range(10):  # bounded: five packages, two a page
        page = await _packages(billing, token, page_size=2, api=PASSPORT)
        assert len(page.packages) <= 2 and not page.unavailable_regions
        pages.append([p.package_id for p in page.packages])
        token = page.next_page_token
        if not token:
            break
    assert token == "", "ListAccountPackages never ended"
    listed = [pid for page in pages for pid in page]
    # Region by region in catalog order, each region's packages in quota's (id) order.
    assert listed == sorted(hk_ids) + sorted(bkk_ids)
    assert len(pages) == 3

    # Filters: one region, states, the enterprise project (quota's rule: the packages
    # designated to it and those for every project, which can pay its calls).
    only_bkk = await _packages(billing, region=BKK)
    assert len(only_bkk.packages) == 3
    project = await _packages(billing, enterprise_project_id="proj-a", api=ID_CARD)
    assert [(p.region, p.api) for p in project.packages] == [(BKK, ID_CARD)]
    every_project = await _packages(billing, enterprise_project_id="proj-b")
    assert sorted(p.package_id for p in every_project.packages) == sorted(hk_ids + bkk_ids)
    exhausted = await _packages(billing, states=[EXHAUSTED])
    assert list(exhausted.packages) == []
    # A token is only good for its own query.
    first = await _packages(billing, page_size=1)
    await expect_error(
        _packages(billing, first.next_page_token, page_size=1, region=BKK),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="page_token",
    )
    await expect_error(
        _packages(billing, region="nowhere"), grpc.StatusCode.INVALID_ARGUMENT, field="region"
    )
    await expect_error(
        _packages(billing, states=[42]), grpc.StatusCode.INVALID_ARGUMENT, field="states"
    )


async def test_an_alert_no_contact_hears_is_flagged(suite):
    hk, bkk, notification, billing = suite
    await hk.grant(ACCOUNT, 100, region=HK)
    heard_nowhere = await AlertCalls(hk).create(ACCOUNT, region=HK, api="passport", quantity=10)
    in_bkk = await AlertCalls(bkk).create(ACCOUNT, region=BKK, percent=10)
    await AlertCalls(bkk).create(ACCOUNT, region=BKK, percent=5, enabled=False)  # off: fine

    seen = await _overview(billing)
    assert seen.notification_available
    assert sorted(a.alert_id for a in seen.unheard_alerts) == sorted(
        [heard_nowhere.alert_id, in_bkk.alert_id]
    )
    # A contact for another message type does not help; one for usage alerts does.
    await notification.create(ACCOUNT, EMAIL, "ops@example.com", [ARREARS])
    assert len((await _overview(billing)).unheard_alerts) == 2
    await notification.create(ACCOUNT, EMAIL, "alerts@example.com", [USAGE_ALERT])
    assert list((await _overview(billing)).unheard_alerts) == []

    # CheckAudience is for the suite's services and admins, not for account tokens.
    tokens = Tokens()
    request = notification_service_pb2.CheckAudienceRequest(account_id=ACCOUNT)
    answer = await notification.stub.CheckAudience(request, metadata=notification.admin)
    assert {a.message_type: a.contact_count for a in answer.audiences}[USAGE_ALERT] == 1
    await expect_error(
        notification.stub.CheckAudience(request, metadata=tokens.md(tokens.account(ACCOUNT))),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_a_crossing_that_reaches_no_contact_is_listed_as_unheard(suite):
    hk, _, notification, _ = suite
    await hk.grant(ACCOUNT, 10, region=HK, expire=END_OF_YEAR)
    rule = await AlertCalls(hk).create(ACCOUNT, region=HK, quantity=5)
    await hk.report("cross", ACCOUNT, 6, region=HK)  # 4 left: below 5

    found = await until(
        lambda: notification.notifications(ACCOUNT, [USAGE_ALERT]),
        lambda found: len(found) == 1,
        what="the unheard usage alert notification",
    )
    (unheard,) = found
    assert unheard.unheard and list(unheard.deliveries) == []
    assert unheard.source_event_id  # quota's threshold_crossed event
    assert unheard.account_id == ACCOUNT and rule.alert_id

    # With a contact for usage alerts, the next crossing is heard: a delivery, not unheard.
    await notification.create(ACCOUNT, EMAIL, "alerts@example.com", [USAGE_ALERT])
    await hk.grant(ACCOUNT, 10, region=HK)  # 14 left: the rule re-arms
    await hk.report("cross-again", ACCOUNT, 10, region=HK)  # 4 left
    newest, _ = await until(
        lambda: notification.notifications(ACCOUNT, [USAGE_ALERT]),
        lambda found: len(found) == 2,
        what="the second usage alert notification",
    )
    assert not newest.unheard and len(newest.deliveries) == 1
