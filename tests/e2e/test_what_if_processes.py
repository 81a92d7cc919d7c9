"""What if, end to end (docs/design/what-if.md, docs/design/forecasts.md): quota, billing and
notification as processes (quota and billing on SQLite, then on PostgreSQL; manual clocks the
test moves), billing and notification following quota's real stream.

"planner" has 100.00 USD and buys a 1,000-call passport package through billing on day 0
(2024-01-10 12:00, billing time zone). It uses passport every day at noon for 86 days — varied
amounts for five weeks, then 100 calls a day — plus a failed call every week. The package is
used up on day 10; from then on the calls are pay-per-use, which billing rates and settles. On
day 80 (2024-03-30) it buys a second 1,000-call package and a usage alert "used up within 7
days"; the walk ends on day 85 (2024-04-04).

- The forecast follows the rate: 100 calls a day, used up after remaining / 100 days. The alert
  fires once, when the clock's due work runs on day 83 (700 left: exactly 7 days), and not
  again while it keeps holding; notification mails it ("used up within 7 days", around
  2024-04-09) to the account's contact, once.
- SimulateUsage with the real packages and the real policy gives what quota recorded — the
  figures taken from GetUsageStats, ListPackages and ReportUsage's own answers, not from the
  replay. Pay-per-use alone, a 10,000-call package and a 5,000-call one-month package change the
  figures as the catalog says (the one-month package forfeits what it did not pay for).
- RecommendPackages for the last 3 months: candidates cheapest first, the cheapest (one
  10,000-call package, 60.00) at most every other, pay-per-use alone at 0.01 a billable call,
  and actual_cost what billing charged: its orders plus its settled pay-per-use bill lines.
- Neither replays nor recommendations write anything: quota's and billing's streams end where
  they did, the packages are as they were.

Every wait is bounded (`until`, process start and stop timeouts, stream reads up to the head).
"""

from __future__ import annotations

import pathlib
from collections import Counter
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2

from tests.support.billing import (
    BILLING_TZ,
    BillingCalls,
    billing_process,
    local,
    micros,
    money_micros_of,
    paired_env,
)
from tests.support.databases import dialect_database, migrated_sqlite_if_new
from tests.support.events import THRESHOLD_CROSSED, AlertCalls, head, payloads
from tests.support.notification import (
    EMAIL,
    SENT,
    USAGE_ALERT,
    NotificationCalls,
    notification_env,
    notification_process,
    until,
)
from tests.support.quota import API, REGION, QuotaCalls, quota_calls, quota_process

ACCOUNT = "planner"
ADDRESS = "ops@planner.example"
T0 = local("2024-01-10 12:00")  # day 0, 04:00 UTC: the same day in UTC and locally
LAST_DAY = 85
STEADY_FROM = 35  # from this day on, RATE calls a day
RATE = 100
SECOND_PURCHASE_DAY = 80
WITHIN_DAYS = 7
FIRES_ON = 83  # 700 left at 100 a day: used up in exactly 7 days
TOP_UP = "100"

SMALL, MONTHLY, LARGE = "passport-1k-1y", "passport-5k-1m", "passport-10k-1y"
UNIT_MICROS = 10_000  # 0.01 USD a pay-per-use call
CATALOG = f"""\
currency: USD
regions:
  - {{id: {REGION}, name: CN-Hong Kong}}
apis:
  - id: {API}
    name: Passport OCR
    price_tiers:
      - {{unit_price: "0.01"}}
offers:
  - {{id: {SMALL}, api: {API}, quantity: 1000, validity_months: 12, price: "8.00"}}
  - {{id: {MONTHLY}, api: {API}, quantity: 5000, validity_months: 1, price: "30.00"}}
  - {{id: {LARGE}, api: {API}, quantity: 10000, validity_months: 12, price: "60.00"}}
"""

FULFILLED = billing_pb2.ORDER_STATE_FULFILLED
PAY_PER_USE_LINE = billing_pb2.BILL_LINE_KIND_PAY_PER_USE
DEPLETION = quota_pb2.ALERT_CONDITION_DEPLETION_WITHIN_DAYS
DAY = quota_pb2.STATS_GRANULARITY_DAY
BILLING_EVENTS = billing_service_pb2.WatchEventsRequest


def day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def calls_on(n: int) -> int:
    """The billable calls of day `n`: 60 to 140 for five weeks, then RATE."""
    return RATE if n >= STEADY_FROM else 60 + (n * 37) % 81


def month_of(stamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).astimezone(BILLING_TZ).strftime("%Y-%m")


class Recorded:
    """What quota answered to every ReportUsage of the walk, summed."""

    def __init__(self) -> None:
        self.events = 0
        self.package_paid = 0
        self.pay_per_use = 0

    def add(self, responses) -> None:
        for response in responses:
            assert not response.HasField("error"), response.error
            self.events += 1
            self.package_paid += sum(d.quantity for d in response.deductions)
            self.pay_per_use += response.pay_per_use_quantity


async def buy(b: BillingCalls, offer_id: str, request_id: str) -> billing_pb2.Order:
    placed = await b.purchase(ACCOUNT, offer_id, REGION, request_id, timeout=30)
    return await until(
        lambda: b.stub.GetOrder(
            billing_service_pb2.GetOrderRequest(order_id=placed.order_id), metadata=b.admin
        ),
        lambda o: o.state == FULFILLED,
        what=f"the order of {offer_id} fulfilled",
    )


async def use(q: QuotaCalls, n: int, recorded: Recorded) -> None:
    """Day `n`'s calls at noon (two users), and on every 7th day a failed call, in one batch."""
    at, calls = day(n), calls_on(n)
    requests = [
        q.usage(f"d{n}-a", ACCOUNT, calls // 2, occur=at, user_id="alice"),
        q.usage(f"d{n}-b", ACCOUNT, calls - calls // 2, occur=at, user_id="bob"),
    ]
    if n % 7 == 3:
        requests.append(q.usage(f"d{n}-x", ACCOUNT, 2, occur=at, http_status=500))
    recorded.add((await q.batch(requests)).responses)


async def remaining(q: QuotaCalls) -> tuple[int, int]:
    (item,) = (await q.summary(ACCOUNT, region=REGION, api=API)).items
    return item.total_quantity, item.remaining_quantity


@pytest.fixture(params=["sqlite", "postgresql"])
async def urls(request, tmp_path):
    """Quota's and billing's databases, both of one dialect, at their migration heads."""
    async with (
        dialect_database(request.param, tmp_path / "quota.sqlite", "quota") as quota_url,
        dialect_database(request.param, tmp_path / "billing.sqlite", "billing") as billing_url,
    ):
        for url, service in ((quota_url, "quota"), (billing_url, "billing")):
            migrated_sqlite_if_new(url, service)  # a copy of its template, as for PostgreSQL
        yield quota_url, billing_url


async def test_what_if_across_quota_and_billing_processes(urls, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    q_env, b_env = paired_env(tmp_path, T0.astimezone(UTC).isoformat())
    q_env["ALLOT_CATALOG"] = b_env["ALLOT_CATALOG"] = str(catalog)
    q_env["ALLOT_DEDUCTION_POLICY"] = "standard"
    q_env["ALLOT_QUOTA_DATABASE_URL"], b_env["ALLOT_BILLING_DATABASE_URL"] = urls
    n_data = tmp_path / "notification"
    n_data.mkdir()
    n_url = f"sqlite+aiosqlite:///{n_data / 'notification.db'}"
    migrated_sqlite_if_new(n_url, "notification")
    with quota_process(q_env, tmp_path / "quota.log") as quota:
        b_env["ALLOT_QUOTA_ADDR"] = quota.addr
        n_env = notification_env(
            n_url, n_data, quota.addr, ALLOT_CLOCK_START=q_env["ALLOT_CLOCK_START"]
        )
        with (
            billing_process(b_env, tmp_path / "billing.log") as billing,
            notification_process(n_env, n_data / "notification.log") as notification,
        ):
            async with (
                grpc.aio.insecure_channel(quota.addr) as qc,
                grpc.aio.insecure_channel(billing.addr) as bc,
                grpc.aio.insecure_channel(notification.addr) as nc,
            ):
                q, b, n = quota_calls(qc), BillingCalls(bc), NotificationCalls(nc)
                recorded = await three_months(q, b, n, n_data / "outbox" / "email")
                await replays(q, b, recorded)
                await recommendation(q, b)
                await rearmed_by_a_purchase(q, b)
            assert notification.terminate(timeout=30) == 0
            assert billing.terminate(timeout=30) == 0
        assert quota.terminate(timeout=30) == 0


# --- 1 and 4: the walk, the forecast, the alert -----------------------------------------------


async def three_months(
    q: QuotaCalls, b: BillingCalls, n: NotificationCalls, mailbox: pathlib.Path
) -> Recorded:
    recorded = Recorded()
    await n.create(ACCOUNT, EMAIL, ADDRESS, [USAGE_ALERT])
    await b.create_account(ACCOUNT)
    await b.top_up(ACCOUNT, TOP_UP, request_id="fund")
    first = await buy(b, SMALL, "buy-1")
    assert first.effective_time.ToDatetime(tzinfo=UTC) == day(0)

    for d in range(SECOND_PURCHASE_DAY):
        if d:
            await q.set_time(day(d))
        await use(q, d, recorded)
    assert await remaining(q) == (1000, 0)

    # Day 80: billing's clock catches up (settling what it has taken in so far), a second
    # package, and the alert, which does not hold yet (1,000 left: 10 days).
    alerts = AlertCalls(q)
    await q.set_time(day(SECOND_PURCHASE_DAY))
    await b.set_time(day(SECOND_PURCHASE_DAY))
    await buy(b, SMALL, "buy-2")
    alerts.log.cursor = await head(q.stub, q.admin)
    rule = await alerts.create(ACCOUNT, api=API, depletion_days=WITHIN_DAYS)
    assert rule.state == quota_pb2.USAGE_ALERT_STATE_ARMED
    assert payloads(await alerts.log.new(), THRESHOLD_CROSSED) == []

    fired = []
    for d in range(SECOND_PURCHASE_DAY, LAST_DAY + 1):
        if d > SECOND_PURCHASE_DAY:
            await n.set_time(day(d))
            await q.set_time(day(d))  # the due work evaluates the rule before this returns
            events = [e for e in await alerts.log.new() if e.HasField(THRESHOLD_CROSSED)]
            crossed = payloads(events, THRESHOLD_CROSSED)
            assert len(crossed) == (d == FIRES_ON), (d, crossed)
            fired.extend(events)
            total, left = await remaining(q)
            if d == FIRES_ON:
                (event,) = crossed
                assert (event.alert_id, event.condition) == (rule.alert_id, DEPLETION)
                assert event.WhichOneof("threshold") == "threshold_depletion_days"
                assert event.threshold_depletion_days == WITHIN_DAYS
                assert (event.remaining_quantity, event.total_quantity) == (left, total)
                assert event.daily_rate == str(RATE)
                assert event.depletion_time.ToDatetime(tzinfo=UTC) == day(d + WITHIN_DAYS)
                await mailed_once(n, events[0].event_id, mailbox)
            expected = quota_pb2.USAGE_ALERT_STATE_FIRED if d >= FIRES_ON else rule.state
            assert await alerts.state(rule.alert_id) == expected
        await use(q, d, recorded)
        # Reporting usage evaluates no forecast rule (docs/design/forecasts.md).
        assert payloads(await alerts.log.new(), THRESHOLD_CROSSED) == []
        await forecast_follows_the_rate(q, day(d))
    assert len(fired) == 1
    # Quota announced one crossing; notification made one message of it.
    assert len(await n.notifications(ACCOUNT, [USAGE_ALERT])) == 1

    # The day after: every cycle has ended; billing settles all it has taken in.
    end = day(LAST_DAY + 1)
    await q.set_time(end)
    assert payloads(await alerts.log.new(), THRESHOLD_CROSSED) == []
    await b.set_time(end)
    await until(
        lambda: settled_pay_per_use(b),
        lambda quantity: quantity >= recorded.pay_per_use,
        what=f"{recorded.pay_per_use} pay-per-use calls settled",
    )
    assert await settled_pay_per_use(b) == recorded.pay_per_use
    return recorded


async def mailed_once(n: NotificationCalls, event_id: str, mailbox: pathlib.Path) -> None:
    """The crossing as one usage-alert email, sent (to the data dir's outbox: no SMTP)."""
    (notified,) = await n.settled(ACCOUNT, 1, [USAGE_ALERT])
    assert notified.source_event_id == event_id
    assert [(x.channel, x.state) for x in notified.deliveries] == [(EMAIL, SENT)]
    assert notified.subject == f"Usage alert: {API} in {REGION} will be used up within 7 days"
    assert "(around 2024-04-09)" in notified.body  # day 90, billing time zone
    (name, text) = mails(mailbox, notified.notification_id)
    assert name.startswith("20240402T040000Z-")  # day 83 on notification's clock
    assert f"To: {ADDRESS}" in text


def mails(mailbox: pathlib.Path, notification_id: str) -> tuple[str, str]:
    """(file name, text) of the one email of the notification in the outbox folder."""
    (mail,) = mailbox.glob(f"*-{notification_id}.eml")
    return mail.name, mail.read_text()


async def forecast_follows_the_rate(q: QuotaCalls, now: datetime) -> None:
    """28 whole days of RATE calls: the rate is RATE and the packages in force are used up
    remaining / RATE days from now; nothing forfeited (they expire in 2025)."""
    _, left = await remaining(q)
    (forecast,) = (await q.forecast(ACCOUNT, region=REGION, api=API)).forecasts
    assert (forecast.region, forecast.api, forecast.daily_rate) == (REGION, API, str(RATE))
    depletion = now + timedelta(seconds=left * 86_400 // RATE)
    assert forecast.depletion_time.ToDatetime(tzinfo=UTC) == depletion
    assert list(forecast.forfeitures) == []


MONTHS = ("2024-01", "2024-02", "2024-03", "2024-04")


async def bill_lines(b: BillingCalls) -> list[billing_pb2.BillLine]:
    return [line for month in MONTHS for line in (await b.get_bill(ACCOUNT, month)).lines]


async def settled_pay_per_use(b: BillingCalls) -> int:
    return sum(
        line.quantity
        for line in await bill_lines(b)
        if (line.kind, line.region, line.api) == (PAY_PER_USE_LINE, REGION, API)
    )


# --- 2: the replays ---------------------------------------------------------------------------


class Stats:
    """GetUsageStats by day (billing time zone) over the whole walk: quota's record."""

    def __init__(self, buckets) -> None:
        self.buckets = list(buckets)
        self.successful = sum(x.successful_calls for x in self.buckets)
        self.failed = sum(x.failed_calls for x in self.buckets)
        self.package_paid = sum(x.package_quantity for x in self.buckets)
        self.pay_per_use = sum(x.pay_per_use_quantity for x in self.buckets)

    def monthly(self) -> list[tuple[str, int, int]]:
        paid: Counter[str] = Counter()
        ppu: Counter[str] = Counter()
        for x in self.buckets:
            paid[month_of(x.start_time)] += x.package_quantity
            ppu[month_of(x.start_time)] += x.pay_per_use_quantity
        return [(m, paid[m], ppu[m]) for m in sorted(paid | ppu)]

    def successful_through(self, last: datetime) -> int:
        """Billable calls of the local days up to and including `last`'s."""
        end = last.astimezone(BILLING_TZ).date()
        return sum(
            x.successful_calls
            for x in self.buckets
            if x.start_time.ToDatetime(tzinfo=UTC).astimezone(BILLING_TZ).date() <= end
        )


async def usage_stats(q: QuotaCalls, start: datetime, end: datetime) -> Stats:
    request = quota_service_pb2.GetUsageStatsRequest(
        account_id=ACCOUNT, region=REGION, api=API, granularity=DAY
    )
    request.start_time.FromDatetime(start.astimezone(UTC))
    request.end_time.FromDatetime(end.astimezone(UTC))
    return Stats((await q.stub.GetUsageStats(request, metadata=q.admin)).buckets)


async def offers(b: BillingCalls) -> dict[str, billing_pb2.Offer]:
    found = await b.stub.ListOffers(
        billing_service_pb2.ListOffersRequest(api=API, region=REGION), metadata=b.admin
    )
    return {o.offer_id: o for o in found.offers}


def simulated_months(response) -> list[tuple[str, int, int]]:
    return [
        (month_of(m.month_start), m.package_paid_quantity, m.pay_per_use_quantity)
        for m in response.months
    ]


def per_package(response) -> dict[str, int]:
    return {p.package_id: p.used_quantity for p in response.per_package}


def packages_used_since(packages, start: datetime) -> int:
    """What the packages effective from `start` paid for (the earlier one was used up)."""
    return sum(
        p.used_quantity for p in packages if p.effective_time.ToDatetime(tzinfo=UTC) >= start
    )


async def replays(q: QuotaCalls, b: BillingCalls, recorded: Recorded) -> None:
    start, end = T0 - timedelta(days=5), day(LAST_DAY + 1)
    stats = await usage_stats(q, start, end)
    packages = (await q.list_packages(ACCOUNT)).packages
    # Quota's record, three ways: its statistics, its packages, its answers to the reports.
    assert (stats.package_paid, stats.pay_per_use) == (
        recorded.package_paid,
        recorded.pay_per_use,
    )
    assert stats.package_paid == sum(p.used_quantity for p in packages) == 1600
    assert stats.successful == sum(calls_on(n) for n in range(LAST_DAY + 1))
    assert stats.successful == stats.package_paid + stats.pay_per_use
    assert stats.failed == 2 * sum(1 for n in range(LAST_DAY + 1) if n % 7 == 3)
    catalog = await offers(b)
    before = (await head(q.stub, q.admin), list(packages))

    # The real packages under the real policy (the service's, and named): as recorded.
    for policy in ("", "standard"):
        real = await q.simulate(start, end, account_id=ACCOUNT, policy=policy)
        assert (real.package_paid_quantity, real.pay_per_use_quantity) == (
            stats.package_paid,
            stats.pay_per_use,
        )
        assert per_package(real) == {p.package_id: p.used_quantity for p in packages}
        assert simulated_months(real) == stats.monthly()
        assert real.event_count == recorded.events
        assert list(real.forfeited) == []

    # Pay-per-use alone: every billable call.
    alone = await q.simulate(start, end, account_id=ACCOUNT, use_real=False)
    assert (alone.package_paid_quantity, alone.pay_per_use_quantity) == (0, stats.successful)
    assert per_package(alone) == {}

    # One 10,000-call package from day 0 pays for every call.
    large = catalog[LARGE]
    assert stats.successful <= large.quantity
    one = await q.simulate(start, end, account_id=ACCOUNT, packages=[q.hypothetical(LARGE, T0)])
    assert (one.package_paid_quantity, one.pay_per_use_quantity) == (stats.successful, 0)
    assert per_package(one) == {"hypothetical-1-1": stats.successful}
    assert list(one.forfeited) == []

    # A 5,000-call one-month package from day 0 (to 2024-02-10 23:59:59, billing time zone)
    # pays for the calls of those days and forfeits the rest of its quantity.
    monthly = catalog[MONTHLY]
    assert monthly.validity_months == 1
    expiry = local("2024-02-10 23:59:59")
    covered = stats.successful_through(expiry)
    assert covered < monthly.quantity
    short = await q.simulate(start, end, account_id=ACCOUNT, packages=[q.hypothetical(MONTHLY, T0)])
    assert (short.package_paid_quantity, short.pay_per_use_quantity) == (
        covered,
        stats.successful - covered,
    )
    assert [
        (f.package_id, f.quantity, f.expire_time.ToDatetime(tzinfo=UTC)) for f in short.forfeited
    ] == [("hypothetical-1-1", monthly.quantity - covered, expiry)]

    # From March on: the real packages enter the window with what February left of them
    # (the first used up, the second not yet bought), and the window's figures are as recorded.
    march = local("2024-03-01 00:00")
    since = await usage_stats(q, march, end)
    assert since.package_paid == packages_used_since(packages, march)
    later = await q.simulate(march, end, account_id=ACCOUNT)
    assert (later.package_paid_quantity, later.pay_per_use_quantity) == (
        since.package_paid,
        since.pay_per_use,
    )
    assert simulated_months(later) == since.monthly()

    # Nothing was written.
    after = (await head(q.stub, q.admin), list((await q.list_packages(ACCOUNT)).packages))
    assert after == before


# --- 3: the recommendation --------------------------------------------------------------------


async def recommendation(q: QuotaCalls, b: BillingCalls) -> None:
    now = day(LAST_DAY + 1)
    heads = (await head(q.stub, q.admin), await head(b.stub, b.admin, request_type=BILLING_EVENTS))
    answer = await b.stub.RecommendPackages(
        billing_service_pb2.RecommendPackagesRequest(
            account_id=ACCOUNT, region=REGION, api=API, months=3
        ),
        metadata=b.admin,
        timeout=60,
    )
    assert answer.start_time.ToDatetime(tzinfo=UTC) == local("2024-01-05 12:00")
    assert answer.end_time.ToDatetime(tzinfo=UTC) == now

    # What billing charged, read through its public RPCs: the account's orders and its
    # settled pay-per-use lines of the region and API; and what left the balance.
    orders = [o for o in await b.orders(ACCOUNT) if (o.region, o.api) == (REGION, API)]
    assert [(o.offer_id, o.state) for o in orders] == [(SMALL, FULFILLED)] * 2
    lines = [
        line
        for line in await bill_lines(b)
        if (line.kind, line.region, line.api) == (PAY_PER_USE_LINE, REGION, API)
    ]
    charged = sum(micros(o.amount) for o in orders) - sum(micros(line.amount) for line in lines)
    assert micros(answer.actual_cost) == charged
    balance = micros((await b.get_account(ACCOUNT)).balance)
    assert charged == money_micros_of(TOP_UP) - balance

    candidates = list(answer.candidates)
    costs = [micros(c.expected_cost) for c in candidates]
    assert costs == sorted(costs)
    assert all(costs[0] <= cost for cost in costs)
    for c in candidates:
        assert micros(c.expected_cost) == micros(c.package_cost) + micros(c.pay_per_use_cost)
        assert micros(c.saving) == charged - micros(c.expected_cost)

    # The window holds the whole walk.
    stats = await usage_stats(q, local("2024-01-05 12:00"), now)
    catalog = await offers(b)
    (alone,) = [c for c in candidates if not c.offers]
    assert alone.pay_per_use_quantity == stats.successful
    assert micros(alone.expected_cost) == stats.successful * UNIT_MICROS
    cheapest = candidates[0]
    assert [(o.offer_id, o.count, o.purchases) for o in cheapest.offers] == [(LARGE, 1, 1)]
    assert micros(cheapest.expected_cost) == micros(catalog[LARGE].price)
    assert (cheapest.pay_per_use_quantity, cheapest.forfeited_quantity) == (0, 0)
    assert micros(cheapest.saving) > 0

    # Nothing was written, at quota or at billing.
    assert heads == (
        await head(q.stub, q.admin),
        await head(b.stub, b.admin, request_type=BILLING_EVENTS),
    )


# --- 4, continued: a purchase re-arms the alert -------------------------------------------------


async def rearmed_by_a_purchase(q: QuotaCalls, b: BillingCalls) -> None:
    """A third package (1,400 left: 14 days) makes the condition false: re-armed in the
    grant's transaction, and nothing announced."""
    alerts = AlertCalls(q)
    (rule,) = (await alerts.list_alerts(ACCOUNT)).usage_alerts
    assert rule.state == quota_pb2.USAGE_ALERT_STATE_FIRED
    alerts.log.cursor = await head(q.stub, q.admin)
    await buy(b, SMALL, "buy-3")
    assert await alerts.state(rule.alert_id) == quota_pb2.USAGE_ALERT_STATE_ARMED
    assert payloads(await alerts.log.new(), THRESHOLD_CROSSED) == []
