"""Monthly pay-per-use spending caps (docs/design/spending-cap.md) through real servers: billing
(`SetSpendingCap`) and quota (`CheckQuota`, `ReportUsage`), both in process on manual clocks,
on SQLite and PostgreSQL, quota following billing's real `WatchEvents` stream.

The catalog prices passport at a flat 0.10 a call, so a cap of 1.00 is ten calls. The
documented precision: with every pay-per-use call admitted by `CheckQuota` on one database, the
month's admitted pay-per-use exceeds the cap by less than the price of one admitted call; here
that is at most ten calls however many ask at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_service_pb2
from google.type import money_pb2

from services.quota.adapters import spending_repository
from tests.support.billing import (
    billing_settings,
    local,
    micros,
    running_billing,
    usd,
)
from tests.support.calls import expect_error
from tests.support.quota import QuotaCalls, quota_settings, running_quota, sqlite_in
from tests.support.servers import Tokens, free_port

REQ = billing_service_pb2
SPENDING_CAP = quota_service_pb2.DENY_REASON_SPENDING_CAP
START = "2024-05-01T00:00:00Z"  # 2024-05-01 08:00 in the billing time zone
REGION, OTHER_REGION, API = "ap-southeast-1", "ap-southeast-2", "passport"
ACCOUNT, OTHER = "acme", "globex"
PRICE_MICROS = 100_000  # 0.10 a call
CONCURRENT = 30
FOLLOW_TIMEOUT = 45.0
CALL_TIMEOUT = 60.0
TOKENS = Tokens()

CATALOG = f"""\
currency: USD
regions:
  - {{id: {REGION}, name: CN-Hong Kong}}
  - {{id: {OTHER_REGION}, name: AP-Bangkok}}
apis:
  - id: {API}
    name: Passport OCR
    price_tiers:
      - {{unit_price: "0.10"}}
offers: []
"""


def overshoot_bound(cap_micros: int, price_micros: int) -> int:
    """The most pay-per-use calls of `price_micros` each that the documented precision lets
    through under `cap_micros` (docs/design/spending-cap.md, "Precision"): admission lets a call
    through only while what it let through is below the cap, so the last one admitted starts
    below it: ceil(cap / price) calls."""
    return -(-cap_micros // price_micros)


@contextlib.asynccontextmanager
async def suite(urls, tmp_path, write: bool = True):
    """Billing, then quota following it (its standings consumer) on its own database; the
    catalog is CATALOG unless the test wrote its own (`write=False`)."""
    quota_url, billing_url = urls
    catalog = tmp_path / "catalog.yaml"
    if write:
        catalog.write_text(CATALOG)
    for name in ("quota", "billing"):
        (tmp_path / name).mkdir(exist_ok=True)
    quota_addr = f"127.0.0.1:{free_port()}"
    b_settings = billing_settings(
        billing_url, tmp_path / "billing", quota_addr, START, catalog=str(catalog)
    )
    async with running_billing(b_settings) as billing:
        q_settings = quota_settings(
            quota_url,
            tmp_path / "quota",
            quota_addr=quota_addr,
            clock="manual",
            clock_start=START,
            catalog=str(catalog),
            billing_addr=billing.server.bound_addr,
            consumer_lease_seconds="2",
        )
        async with running_quota(q_settings) as quota:
            yield billing, quota


async def followed(billing, quota) -> None:
    """Wait until quota has applied every event billing has written so far."""
    events = await billing.calls.events()
    last = max((e.sequence for e in events), default=0)
    consumer = quota.server.service.standings_consumer
    assert consumer is not None
    assert await consumer.wait_for(last, within=FOLLOW_TIMEOUT), (
        f"quota at {consumer.last_sequence}, not {last}"
    )


def set_cap(billing, amount: money_pb2.Money | None, request_id: str, metadata=None):
    request = REQ.SetSpendingCapRequest(request_id=request_id, account_id=ACCOUNT)
    if amount is not None:
        request.monthly_amount.CopyFrom(amount)
    return billing.calls.stub.SetSpendingCap(
        request, metadata=metadata or Tokens.md(TOKENS.account(ACCOUNT)), timeout=CALL_TIMEOUT
    )


async def call(q: QuotaCalls, event_id: str, region: str = REGION) -> bool:
    """What a gateway does for one call: ask, and report it when admitted."""
    answer = await q.check(ACCOUNT, region=region)
    if answer.allowed:
        await q.report(event_id, ACCOUNT, region=region)
    return answer.allowed


@pytest.fixture
async def capped(quota_and_billing_urls, tmp_path):
    async with suite(quota_and_billing_urls, tmp_path) as (billing, quota):
        q = QuotaCalls(quota)
        await billing.calls.create_account(ACCOUNT)
        await billing.calls.create_account(OTHER)
        await q.enable(ACCOUNT, API, REGION)
        yield billing, quota, q


async def test_cap_bounds_concurrent_pay_per_use_and_reopens(capped):
    billing, quota, q = capped
    account = await set_cap(billing, usd("1.00"), "cap-1")
    assert micros(account.monthly_spending_cap) == 1_000_000
    assert account.monthly_spending_cap.currency_code == "USD"
    # The cap is in the event quota follows.
    (event,) = [
        e
        for e in await billing.calls.events(types=("account_standing_changed",))
        if e.account_standing_changed.account_id == ACCOUNT
    ]
    assert event.account_standing_changed.monthly_spending_cap_micros == 1_000_000
    await followed(billing, quota)

    # 30 gateways at once, each asking and reporting one pay-per-use call.
    answers = await asyncio.wait_for(
        asyncio.gather(*(call(q, f"burst-{i}") for i in range(CONCURRENT))), CALL_TIMEOUT
    )
    admitted = sum(answers)
    bound = overshoot_bound(1_000_000, PRICE_MICROS)
    assert 10 <= admitted <= bound, admitted
    denied = await q.check(ACCOUNT)
    assert (denied.allowed, denied.deny_reason, denied.pay_per_use) == (False, SPENDING_CAP, True)

    # Packages keep working: a call they cover passes, the first one past them does not.
    package = await q.grant(ACCOUNT, 3)
    assert package.remaining_quantity == 3
    for i in range(3):
        answer = await q.check(ACCOUNT)
        assert (answer.allowed, answer.pay_per_use) == (True, False)
        assert (await q.report(f"package-{i}", ACCOUNT)).pay_per_use_quantity == 0
    assert (await q.check(ACCOUNT)).deny_reason == SPENDING_CAP

    # A higher cap re-opens pay-per-use, for what it adds: 0.50 more is five calls.
    await set_cap(billing, usd("1.50"), "cap-2")
    await followed(billing, quota)
    answers = [await call(q, f"higher-{i}") for i in range(8)]
    assert answers == [True] * 5 + [False] * 3

    # The last second of May (billing time zone) is still May; June starts afresh.
    await q.set_time(local("2024-05-31 23:59:59"))
    assert (await q.check(ACCOUNT)).deny_reason == SPENDING_CAP
    await q.set_time(local("2024-06-01 00:00:00"))
    answer = await q.check(ACCOUNT)
    assert (answer.allowed, answer.pay_per_use) == (True, True)

    # Cleared (zero), there is no cap at all.
    cleared = await set_cap(billing, None, "cap-3")
    assert not cleared.HasField("monthly_spending_cap")
    await followed(billing, quota)
    answers = [await call(q, f"june-{i}") for i in range(20)]
    assert all(answers)


async def test_usage_reported_without_admission_counts_against_the_cap(capped):
    """Calls a gateway reports without asking still cost money: once the month's recorded
    pay-per-use reaches the cap, admission denies (recorded spend, priced as billing would)."""
    billing, quota, q = capped
    for i in range(12):
        assert (await q.report(f"unasked-{i}", ACCOUNT)).pay_per_use_quantity == 1
    await set_cap(billing, usd("1.00"), "cap-1")
    await followed(billing, quota)
    assert (await q.check(ACCOUNT)).deny_reason == SPENDING_CAP
    # 1.20 recorded: a cap of 1.30 leaves room for one more call.
    await set_cap(billing, usd("1.30"), "cap-2")
    await followed(billing, quota)
    assert [await call(q, f"asked-{i}") for i in range(3)] == [True, False, False]
    # Usage of April arriving late counts for April, not May.
    await q.report("late-april", ACCOUNT, occur=local("2024-04-30 12:00"))
    assert (await q.check(ACCOUNT)).deny_reason == SPENDING_CAP
    await q.set_time(local("2024-05-01 08:00") + timedelta(days=31))
    assert (await q.check(ACCOUNT)).allowed


async def test_set_spending_cap_checks_input_and_caller(capped):
    billing, _, _ = capped
    own = Tokens.md(TOKENS.account(ACCOUNT))
    first = await set_cap(billing, usd("2.50"), "cap-1", own)
    # A replay answers the first result.
    assert await set_cap(billing, usd("2.50"), "cap-1", own) == first
    read = await billing.calls.get_account(ACCOUNT)
    assert micros(read.monthly_spending_cap) == 2_500_000

    await expect_error(
        set_cap(billing, usd("-1.00"), "cap-negative", own),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="monthly_amount",
    )
    await expect_error(
        set_cap(billing, money_pb2.Money(currency_code="EUR", units=1), "cap-eur", own),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CURRENCY_MISMATCH",
    )
    await expect_error(
        set_cap(billing, money_pb2.Money(currency_code="USD", nanos=1), "cap-nano", own),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="monthly_amount",
    )
    # Another account's token, and a read-only token of the account itself, are refused.
    for metadata in (
        Tokens.md(TOKENS.account(OTHER)),
        Tokens.md(TOKENS.account(ACCOUNT, read_only=True)),
    ):
        await expect_error(
            set_cap(billing, usd("9.00"), "cap-foreign", metadata),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    # An admin may set it; an unknown account is NOT_FOUND.
    by_admin = await set_cap(billing, usd("3.00"), "cap-admin", billing.calls.admin)
    assert micros(by_admin.monthly_spending_cap) == 3_000_000
    await expect_error(
        billing.calls.stub.SetSpendingCap(
            REQ.SetSpendingCapRequest(account_id="nobody", monthly_amount=usd("1.00")),
            metadata=billing.calls.admin,
        ),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    # Nothing refused was written.
    assert micros((await billing.calls.get_account(ACCOUNT)).monthly_spending_cap) == 3_000_000


async def test_settled_charges_of_other_regions_count(quota_and_billing_urls, tmp_path):
    """Two regional quota deployments (one database each) and billing: what billing settled in
    one region reaches the other region's admission through the standing projection."""
    quota_url, billing_url = quota_and_billing_urls
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    addrs = {REGION: f"127.0.0.1:{free_port()}", OTHER_REGION: f"127.0.0.1:{free_port()}"}
    (tmp_path / "billing").mkdir()
    b_settings = billing_settings(
        billing_url,
        tmp_path / "billing",
        addrs[REGION],
        START,
        catalog=str(catalog),
        quota_endpoints=",".join(f"{r}={a}" for r, a in addrs.items()),
    )
    async with running_billing(b_settings) as billing:

        def regional(region: str, url: str):
            (tmp_path / region).mkdir()
            return running_quota(
                quota_settings(
                    url,
                    tmp_path / region,
                    quota_addr=addrs[region],
                    quota_regions=region,
                    clock="manual",
                    clock_start=START,
                    catalog=str(catalog),
                    billing_addr=billing.server.bound_addr,
                    consumer_lease_seconds="2",
                )
            )

        other_url = sqlite_in(tmp_path / "other-db")
        async with regional(REGION, quota_url) as here, regional(OTHER_REGION, other_url) as there:
            q_here, q_there = QuotaCalls(here), QuotaCalls(there)
            await billing.calls.create_account(ACCOUNT)
            await billing.calls.top_up(ACCOUNT, "100")
            await q_here.enable(ACCOUNT, API, REGION)
            await q_there.enable(ACCOUNT, API, OTHER_REGION)
            await set_cap(billing, usd("1.00"), "cap-1")
            # 0.60 of pay-per-use in the other region, settled by billing after the hour.
            for i in range(6):
                await q_there.report(f"there-{i}", ACCOUNT, region=OTHER_REGION)
            await billing.caught_up_with(there)
            await billing.calls.set_time(local("2024-05-01 09:00"))
            (line,) = [
                line
                for line in (await billing.calls.get_bill(ACCOUNT, "2024-05")).lines
                if line.region == OTHER_REGION
            ]
            assert micros(line.amount) == -600_000
            events = await billing.calls.events(types=("account_standing_changed",))
            last = events[-1].account_standing_changed
            assert (last.spending_month, dict(last.settled_pay_per_use_micros)) == (
                "2024-05",
                {OTHER_REGION: 600_000},
            )
            await followed(billing, here)
            # Here: room for 0.40, four calls.
            await q_here.set_time(local("2024-05-01 09:00"))
            answers = [await call(q_here, f"here-{i}") for i in range(6)]
            assert answers == [True] * 4 + [False] * 2
            assert (await q_here.check(ACCOUNT)).deny_reason == SPENDING_CAP
            # The other region counts its own recorded calls once, not billing's figure too:
            # 0.60 there, and nothing of here settled yet, so 0.40 of room there as well.
            await followed(billing, there)
            assert [await call(q_there, f"there-more-{i}", OTHER_REGION) for i in range(5)] == [
                True
            ] * 4 + [False]


async def test_replicas_on_one_database_share_the_cap(quota_and_billing_urls, tmp_path):
    """Two quota replicas on one database, callers spread over both: still at most the
    documented bound (the room is taken by one atomic statement in the shared database)."""
    async with suite(quota_and_billing_urls, tmp_path) as (billing, quota):
        second_settings = quota_settings(
            quota_and_billing_urls[0],
            tmp_path / "quota",
            clock="manual",
            clock_start=START,
            catalog=str(tmp_path / "catalog.yaml"),
        )
        async with running_quota(second_settings) as second:
            replicas = [QuotaCalls(quota), QuotaCalls(second)]
            await billing.calls.create_account(ACCOUNT)
            await replicas[0].enable(ACCOUNT, API, REGION)
            await set_cap(billing, usd("1.00"), "cap-1")
            await followed(billing, quota)
            answers = await asyncio.wait_for(
                asyncio.gather(*(call(replicas[i % 2], f"spread-{i}") for i in range(CONCURRENT))),
                CALL_TIMEOUT,
            )
            assert 10 <= sum(answers) <= overshoot_bound(1_000_000, PRICE_MICROS)
            for replica in replicas:
                assert (await replica.check(ACCOUNT)).deny_reason == SPENDING_CAP


TIERED_CATALOG = f"""\
currency: USD
regions:
  - {{id: {REGION}, name: CN-Hong Kong}}
apis:
  - id: {API}
    name: Passport OCR
    free_monthly_quantity: 3
    price_tiers:
      - {{up_to: 10, unit_price: "0.10"}}
      - {{unit_price: "0.05"}}
offers: []
"""


async def test_quota_counts_the_month_as_billing_charges_it(quota_and_billing_urls, tmp_path):
    """Free calls, two tiers, calls in several batches: quota's count of the month equals what
    billing's settlement charged (the one pricing rule, shared/pricing.py)."""
    (tmp_path / "catalog.yaml").write_text(TIERED_CATALOG)
    async with suite(quota_and_billing_urls, tmp_path, write=False) as (billing, quota):
        q = QuotaCalls(quota)
        await billing.calls.create_account(ACCOUNT)
        await billing.calls.top_up(ACCOUNT, "100")
        await q.enable(ACCOUNT, API, REGION)
        for i, quantity in enumerate((2, 4, 1, 7, 3)):  # 17 calls: 3 free, 7 at 0.10, 7 at 0.05
            await q.report(f"tiered-{i}", ACCOUNT, quantity)
        await billing.caught_up_with(quota)
        await billing.calls.set_time(local("2024-05-01 09:00"))
        lines = [
            line
            for line in (await billing.calls.get_bill(ACCOUNT, "2024-05")).lines
            if line.region == REGION
        ]
        charged = -sum(micros(line.amount) for line in lines)
        assert charged == 7 * 100_000 + 7 * 50_000

        async def counted(uow):
            return await spending_repository.month_amount(uow, ACCOUNT, "2024-05")

        assert await quota.server.runtime.db.read(counted) == charged
        # A cap of exactly what was charged denies the next pay-per-use call.
        await set_cap(billing, usd("1.05"), "cap-1")
        await followed(billing, quota)
        assert (await q.check(ACCOUNT)).deny_reason == SPENDING_CAP


async def test_a_members_cap_is_its_own(capped):
    """Every account_standing_changed carries the account's own cap: a master's change of cap
    (announced for its members too, whose standing follows it) leaves each member's cap as it
    was."""
    billing, _, _ = capped
    calls = billing.calls
    await calls.create_account("corp", billing_pb2.ACCOUNT_KIND_ENTERPRISE_MASTER)
    for member in ("corp-a", "corp-b"):
        await calls.create_account(
            member, billing_pb2.ACCOUNT_KIND_ENTERPRISE_MEMBER, master_account_id="corp"
        )

    def cap_request(account_id: str, amount: str, request_id: str):
        return calls.stub.SetSpendingCap(
            REQ.SetSpendingCapRequest(
                request_id=request_id, account_id=account_id, monthly_amount=usd(amount)
            ),
            metadata=calls.admin,
        )

    await cap_request("corp-a", "2.00", "cap-a")
    await cap_request("corp", "7.00", "cap-corp")
    latest: dict[str, billing_pb2.AccountStandingChanged] = {}
    for event in await calls.events(types=("account_standing_changed",)):
        latest[event.account_standing_changed.account_id] = event.account_standing_changed
    caps = {
        account: (e.monthly_spending_cap_micros, e.master_account_id, e.spending_month)
        for account, e in latest.items()
        if account.startswith("corp")
    }
    assert caps == {
        "corp": (7_000_000, "", "2024-05"),
        "corp-a": (2_000_000, "corp", "2024-05"),
        "corp-b": (0, "corp", ""),
    }
