"""The console's views end to end (issue 14), every service a process: two regional quota
processes (Hong Kong and Bangkok, each serving its one region from its own SQLite database,
`ALLOT_QUOTA_REGIONS`), billing reading both (`ALLOT_QUOTA_ENDPOINTS`) and asking notification
who hears an account's alerts (`ALLOT_NOTIFICATION_ADDR`), notification following both quota
streams. Manual clocks, moved together. The processes start once for the module; each test
uses accounts of its own. docs/design/billing.md ("Account overview", "Orders of several
packages") and docs/design/ownership-and-regions.md.

- An order of 3 packages (`PurchasePackage.quantity=3`) charges once and grants 3 packages in
  the region's quota process; a repeat of the request is the same order.
- A batch renewal (`RenewPackages`) of packages ending on different days gives every one the
  same expiry, in one order with one payment.
- `GetAccountOverview` shows the packages of both regions, each read from its own process, and
  flags a usage alert no contact hears until a contact subscribes (billing → notification).
- The project subtotals of a month's bill (`GetBill.project_subtotals`) add up to its total,
  with pay-per-use that billing read from Hong Kong's stream; `ExplainBillLine` explains a
  Hong Kong pay-per-use call of a project whose package is in Bangkok as "package in another
  region" (`NEAR_MISS_REASON_OTHER_REGION`).
- With Bangkok's quota stopped, the overview answers within its read deadline for Hong Kong
  and marks Bangkok `available=false` (so does `ListAccountPackages`); once Bangkok is back, it
  is read again.

Checked with processes elsewhere, not repeated here: a master reading two members' usage and
packages with its own token (tests/e2e/test_account_settings_reach_quota.py), and a rate limit
of 5/s admitting exactly 5 of 20 concurrent CheckQuota across two quota replicas on one database
(tests/integration/test_rate_limit_replicas.py).

Every call has a deadline (the channels' interceptor); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2
from google.type import date_pb2

from services.billing.adapters.quota_client import READ_TIMEOUT
from tests.support.billing import (
    BILLING_TZ,
    BillingCalls,
    BillingProcess,
    billing_env,
    local,
    micros,
    write_catalog,
)
from tests.support.calls import ts
from tests.support.databases import migrated_sqlite_if_new
from tests.support.events import AlertCalls
from tests.support.notification import (
    EMAIL,
    USAGE_ALERT,
    NotificationCalls,
    NotificationProcess,
    notification_env,
    until,
)
from tests.support.processes import WatchedProcess
from tests.support.quota import QuotaCalls, QuotaProcess, quota_calls, quota_env
from tests.support.servers import free_port

TZ = BILLING_TZ
START_TEXT = "2024-05-01T00:00:00Z"  # 08:00 in the billing time zone
START = datetime.fromisoformat(START_TEXT)
HK, BKK = "ap-southeast-1", "ap-southeast-2"
PASSPORT = "passport"
OFFER = "passport-100-1y"  # 100 calls for 12 months at 1.00 (tests/support/billing.py)
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED
# A deadline for every call that does not set its own; waits for what the processes do on
# their own (a stream read, a reconnect) end as soon as they are met.
CALL_TIMEOUT = 30.0
WAIT = 30.0


class _Deadline(grpc.aio.UnaryUnaryClientInterceptor):
    """Gives every unary call without a deadline CALL_TIMEOUT (the helpers' calls set none)."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=CALL_TIMEOUT)
        return await continuation(client_call_details, request)


def _channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(addr, interceptors=[_Deadline()])


def day(text: str) -> date_pb2.Date:
    d = date.fromisoformat(text)
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


@dataclass
class Processes:
    hk: QuotaProcess
    bkk: QuotaProcess
    notification: NotificationProcess
    billing: BillingProcess
    # The time every process's manual clock shows (moved together by `Console.move`; a quota
    # process restarted by a test is set back to it).
    now: datetime = START


@contextlib.contextmanager
def _started(process: WatchedProcess) -> Iterator[WatchedProcess]:
    try:
        process.start()
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> Iterator[Processes]:
    root = tmp_path_factory.mktemp("console")
    catalog = str(write_catalog(root))
    clock = {"ALLOT_CLOCK": "manual", "ALLOT_CLOCK_START": START_TEXT}
    billing_addr = f"127.0.0.1:{free_port()}"

    def sqlite(name: str, service: str) -> str:
        (root / name).mkdir()
        url = f"sqlite+aiosqlite:///{root / name / 'db.sqlite'}"
        migrated_sqlite_if_new(url, service)
        return url

    def regional(name: str, region: str) -> QuotaProcess:
        env = quota_env(
            sqlite(name, "quota"),
            root / name,
            ALLOT_CATALOG=catalog,
            ALLOT_QUOTA_REGIONS=region,
            ALLOT_BILLING_ADDR=billing_addr,  # quota follows billing's account standings
            ALLOT_CONSUMER_LEASE_SECONDS="2",
            **clock,
        )
        return QuotaProcess(env, root / f"{name}.log")

    with contextlib.ExitStack() as stack:
        hk = stack.enter_context(_started(regional("hk", HK)))
        bkk = stack.enter_context(_started(regional("bkk", BKK)))
        endpoints = f"{HK}={hk.addr},{BKK}={bkk.addr}"
        n_env = notification_env(
            sqlite("notification", "notification"),
            root / "notification",
            hk.addr,
            ALLOT_QUOTA_ENDPOINTS=endpoints,
            ALLOT_BILLING_ADDR=billing_addr,
            ALLOT_CATALOG=catalog,
            **clock,
        )
        notification = stack.enter_context(
            _started(NotificationProcess(n_env, root / "notification.log"))
        )
        b_env = billing_env(
            sqlite("billing", "billing"),
            root / "billing",
            hk.addr,
            START_TEXT,
            ALLOT_BILLING_ADDR=billing_addr,
            ALLOT_QUOTA_ENDPOINTS=endpoints,
            ALLOT_NOTIFICATION_ADDR=notification.addr,
            ALLOT_CATALOG=catalog,
        )
        billing = stack.enter_context(_started(BillingProcess(b_env, root / "billing.log")))
        yield Processes(hk, bkk, notification, billing)


@dataclass
class Console:
    """Calls to the running processes, as the console (admin) or an account makes them."""

    processes: Processes
    hk: QuotaCalls
    bkk: QuotaCalls
    notification: NotificationCalls
    billing: BillingCalls

    async def move(self, to: datetime) -> None:
        """Every process's clock to `to` (due work runs before each call returns)."""
        for service in (self.hk, self.bkk, self.notification, self.billing):
            await service.set_time(to)
        self.processes.now = to

    async def account(self, account_id: str, balance: str) -> None:
        await self.billing.create_account(account_id)
        await self.billing.top_up(account_id, balance, request_id=f"top-up-{account_id}")

    def buy(self, account_id: str, request_id: str, region: str = HK, **fields):
        return self.billing.stub.PurchasePackage(
            billing_service_pb2.PurchasePackageRequest(
                request_id=request_id,
                account_id=account_id,
                offer_id=OFFER,
                region=region,
                **fields,
            ),
            metadata=self.billing.admin,
        )

    async def balance(self, account_id: str) -> int:
        return micros((await self.billing.get_account(account_id)).balance)

    def overview(self, account_id: str):
        return self.billing.stub.GetAccountOverview(
            billing_service_pb2.GetAccountOverviewRequest(account_id=account_id),
            metadata=self.billing.account(account_id, read_only=True),
        )

    def account_packages(self, account_id: str):
        return self.billing.stub.ListAccountPackages(
            billing_service_pb2.ListAccountPackagesRequest(account_id=account_id),
            metadata=self.billing.account(account_id, read_only=True),
        )


@pytest.fixture
async def console(processes) -> AsyncIterator[Console]:
    p = processes
    async with (
        _channel(p.hk.addr) as hk,
        _channel(p.bkk.addr) as bkk,
        _channel(p.notification.addr) as notification,
        _channel(p.billing.addr) as billing,
    ):
        yield Console(
            p,
            quota_calls(hk),
            quota_calls(bkk),
            NotificationCalls(notification),
            BillingCalls(billing),
        )


def _passport(region: billing_pb2.RegionOverview) -> tuple[int, int, int]:
    (api,) = [a for a in region.apis if a.api == PASSPORT]
    return api.packages_in_force, api.remaining_quantity, api.total_quantity


# --- orders -----------------------------------------------------------------------------------


async def test_an_order_of_three_packages_charges_once_and_grants_three(console):
    await console.account("acme-three", "5.00")
    order = await console.buy("acme-three", "buy-3", quantity=3)
    assert (order.state, order.package_count, len(set(order.package_ids))) == (FULFILLED, 3, 3)
    assert (micros(order.amount), order.quantity) == (3_000_000, 300)
    assert await console.balance("acme-three") == 2_000_000

    # Granted by Hong Kong's quota process, each a package of the offer with the same validity.
    for package_id in order.package_ids:
        package = await console.hk.get(package_id)
        assert (package.account_id, package.region, package.total_quantity) == (
            "acme-three",
            HK,
            100,
        )
        assert (package.order_id, package.expire_time) == (order.order_id, order.expire_time)
    assert sorted(await console.hk.package_ids("acme-three")) == sorted(order.package_ids)
    assert await console.bkk.package_ids("acme-three") == []

    again = await console.buy("acme-three", "buy-3", quantity=3)
    assert (again.order_id, list(again.package_ids)) == (order.order_id, list(order.package_ids))
    assert await console.balance("acme-three") == 2_000_000
    assert len(await console.hk.package_ids("acme-three")) == 3
    bill = await console.billing.get_bill("acme-three", "2024-05")
    purchases = [x for x in bill.lines if x.kind == billing_pb2.BILL_LINE_KIND_PACKAGE_PURCHASE]
    assert [(x.order_id, micros(x.amount)) for x in purchases] == [(order.order_id, -3_000_000)]


async def test_a_batch_renewal_gives_every_package_the_same_expiry(console):
    await console.account("acme-renew", "10.00")
    now = console.processes.now
    pair = await console.buy("acme-renew", "buy-pair", quantity=2)
    later = await console.buy("acme-renew", "buy-later", effective_time=ts(now + timedelta(40)))
    package_ids = [*pair.package_ids, later.package_id]
    before = {p: await console.hk.get(p) for p in package_ids}
    assert len({p.expire_time.ToSeconds() for p in before.values()}) == 2  # two expiries
    balance = await console.balance("acme-renew")

    order = await console.billing.stub.RenewPackages(
        billing_service_pb2.RenewPackagesRequest(
            request_id="align",
            account_id="acme-renew",
            package_ids=package_ids,
            expire_date=day("2025-12-31"),
        ),
        metadata=console.billing.admin,
    )
    assert (order.kind, order.state, order.package_count) == (
        billing_pb2.ORDER_KIND_RENEWAL,
        FULFILLED,
        3,
    )
    assert balance - await console.balance("acme-renew") == micros(order.amount) > 0
    # 23:59:59 of the date in the billing time zone, for every package, in quota.
    common = ts(local("2025-12-31 23:59:59"))
    for package_id in package_ids:
        renewed = await console.hk.get(package_id)
        assert renewed.expire_time == common
        assert renewed.total_quantity > before[package_id].total_quantity
    bill = await console.billing.get_bill("acme-renew", "2024-05")
    renewals = [x for x in bill.lines if x.kind == billing_pb2.BILL_LINE_KIND_PACKAGE_RENEWAL]
    assert [(x.order_id, -micros(x.amount)) for x in renewals] == [
        (order.order_id, micros(order.amount))
    ]


# --- the account overview ---------------------------------------------------------------------


async def test_the_overview_shows_both_regions_and_flags_an_alert_nobody_hears(console):
    await console.account("acme-view", "5.00")
    await console.buy("acme-view", "view-hk", region=HK)
    await console.buy("acme-view", "view-bkk", region=BKK, quantity=2)
    alert = await AlertCalls(console.hk).create("acme-view", region=HK, api=PASSPORT, quantity=10)

    seen = await console.overview("acme-view")
    assert seen.account.account_id == "acme-view"
    assert [(r.region, r.available) for r in seen.regions] == [(HK, True), (BKK, True)]
    assert [_passport(r) for r in seen.regions] == [(1, 100, 100), (2, 200, 200)]
    # Notification answered billing: nobody hears usage alerts of this account yet.
    assert seen.notification_available
    assert [a.alert_id for a in seen.unheard_alerts] == [alert.alert_id]
    await console.notification.create("acme-view", EMAIL, "ops@example.com", [USAGE_ALERT])
    assert list((await console.overview("acme-view")).unheard_alerts) == []


# --- the bill ---------------------------------------------------------------------------------


async def test_the_project_subtotals_add_up_and_a_pay_per_use_line_names_the_package_elsewhere(
    console,
):
    account = "acme-bill"
    await console.account(account, "10.00")
    # Bangkok: this package pays for none of the Hong Kong calls below.
    bought = await console.buy(account, "bill-p-a", region=BKK, enterprise_project_id="p-a")
    assert bought.state == FULFILLED
    hour = console.processes.now.astimezone(TZ).replace(minute=0, second=0, microsecond=0)
    for event_id, quantity, project in (("p-a", 2, "p-a"), ("p-b", 3, "p-b"), ("none", 1, "")):
        used = await console.hk.report(f"bill-{event_id}", account, quantity, project=project)
        assert used.pay_per_use_quantity == quantity

    # Billing has read them from Hong Kong's stream once the overview counts them ...
    await until(
        lambda: console.overview(account),
        lambda seen: sum(a.pay_per_use_quantity_month for a in seen.regions[0].apis) == 6,
        WAIT,
        "six pay-per-use calls in billing's overview",
    )
    # ... and settles their hour once the clocks pass its end.
    await console.move(hour + timedelta(hours=1))
    bill = await console.billing.get_bill(account, "2024-05")
    pay_per_use = [x for x in bill.lines if x.kind == billing_pb2.BILL_LINE_KIND_PAY_PER_USE]
    assert sum(x.quantity for x in pay_per_use) == 6
    # 0.10 a call; the top-up has no project, calls without one count under the default "0".
    assert [(s.enterprise_project_id, micros(s.total)) for s in bill.project_subtotals] == [
        ("", 10_000_000),
        ("0", -100_000),
        ("p-a", -1_200_000),
        ("p-b", -300_000),
    ]
    assert sum(micros(s.total) for s in bill.project_subtotals) == micros(bill.total)
    assert micros(bill.total) == sum(micros(x.amount) for x in bill.lines) == 8_400_000

    # "Why was I charged pay-per-use although I have a package?": the line's call of project
    # p-a was made in Hong Kong, the package for p-a is in Bangkok (billing's record of what it
    # sold; Hong Kong's quota does not know it).
    (line,) = [x for x in pay_per_use if x.enterprise_project_id == "p-a"]
    explained = await console.billing.stub.ExplainBillLine(
        billing_service_pb2.ExplainBillLineRequest(
            account_id=account,
            month="2024-05",
            cycle_start_time=line.cycle_start_time,
            region=HK,
            api=PASSPORT,
        ),
        metadata=console.billing.account(account, read_only=True),
    )
    (event,) = [e for e in explained.events if e.usage_event_id == "bill-p-a"]
    assert not event.unavailable and event.explanation.pay_per_use_quantity == 2
    assert [(m.package_id, m.region, m.reason) for m in event.near_misses] == [
        (bought.package_id, BKK, quota_pb2.NEAR_MISS_REASON_OTHER_REGION)
    ]


# --- a region away (last: it stops and restarts Bangkok's quota) -----------------------------


async def test_with_one_regions_quota_stopped_the_overview_answers_for_the_other(console):
    await console.account("acme-away", "5.00")
    await console.buy("acme-away", "away-hk", region=HK)
    await console.buy("acme-away", "away-bkk", region=BKK)
    bkk = console.processes.bkk
    assert bkk.terminate(timeout=30) == 0
    try:
        began = time.monotonic()
        seen = await console.overview("acme-away")
        took = time.monotonic() - began
        assert took < READ_TIMEOUT + 2.0, f"the overview took {took:.1f} s"
        assert [(r.region, r.available) for r in seen.regions] == [(HK, True), (BKK, False)]
        assert _passport(seen.regions[0]) == (1, 100, 100)
        # No package figures from a region not read (and this account has no pay-per-use).
        assert list(seen.regions[1].apis) == []
        listed = await console.account_packages("acme-away")
        assert [p.region for p in listed.packages] == [HK]
        assert list(listed.unavailable_regions) == [BKK]
    finally:
        bkk.start()  # same address and database; its manual clock starts over
        await console.bkk.set_time(console.processes.now)

    back = await until(
        lambda: console.overview("acme-away"),
        lambda seen: all(r.available for r in seen.regions),
        WAIT,
        "Bangkok read again once its quota is back",
    )
    assert [_passport(r) for r in back.regions] == [(1, 100, 100), (1, 100, 100)]
    assert [p.region for p in (await console.account_packages("acme-away")).packages] == [HK, BKK]
