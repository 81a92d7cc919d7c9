"""SimulateUsage, the what-if replay (docs/design/what-if.md), against real quota servers on
SQLite and PostgreSQL.

The central property: a Hypothesis-generated history of grants (some starting in the past,
some designated for a project), renewals (some of expired packages, which forfeit), revocations,
clock moves (expiries; several writes at one instant) and usage (single events and batches, late
reports, failed calls) is recorded by the real service, applying either deduction policy;
replaying the real packages under that policy over the whole history gives every event exactly
the deductions and pay-per-use quantity it was recorded with.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa
from allot.testing.v1 import clock_service_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.quota.app.simulation import SimulationInput, simulate_usage
from shared.timeutil import from_timestamp
from tests.support.calls import expect_error
from tests.support.quota import (
    API,
    FREE,
    PROMOTION,
    REGION,
    SUBSCRIPTION,
    QuotaCalls,
    quota_settings,
    running_quota,
)

EXAMPLES = 10
SOURCES = (FREE, PROMOTION, SUBSCRIPTION)
PROJECTS = ("", "proj-a")
FAR_BACK = timedelta(days=30)

# --- histories ---------------------------------------------------------------------------------

grant = st.tuples(
    st.just("grant"),
    st.integers(1, 20),  # quantity
    st.sampled_from(SOURCES),
    st.sampled_from(PROJECTS),
    st.integers(-72, 24),  # effective, hours from now
    st.integers(0, 120),  # validity after effective, hours
)
renew = st.tuples(st.just("renew"), st.integers(0, 9), st.integers(0, 8), st.integers(0, 72))
revoke = st.tuples(st.just("revoke"), st.integers(0, 9))
advance = st.tuples(st.just("advance"), st.sampled_from([0, 0, 1, 30, 600, 1440, 3000]))
one_usage = st.tuples(
    st.integers(1, 12),  # quantity
    st.sampled_from(PROJECTS),
    st.sampled_from([200, 200, 200, 503]),
    st.integers(-4000, 0),  # occur, minutes from now
)
usage = st.tuples(st.just("usage"), st.lists(one_usage, min_size=1, max_size=3))
histories = st.lists(
    st.one_of(grant, renew, revoke, advance, usage, usage), min_size=3, max_size=16
)


@dataclass
class Model:
    account: str
    packages: list[tuple[str, datetime]]  # id, current expire_time
    events: int = 0


async def play(calls: QuotaCalls, account: str, history: list[tuple]) -> None:
    """Record `history` for `account` through the real service."""
    model = Model(account, [])
    for step in history:
        now = await clock_now(calls)
        kind = step[0]
        if kind == "grant":
            _, quantity, source, project, start_h, valid_h = step
            effective = now + timedelta(hours=start_h)
            expire = effective + timedelta(hours=valid_h)
            package = await calls.grant(
                account,
                quantity,
                source=source,
                project=project,
                effective=effective,
                expire=expire,
            )
            model.packages.append((package.package_id, expire))
        elif kind == "renew" and model.packages:
            _, index, add, extend_h = step
            package_id, expire = model.packages[index % len(model.packages)]
            if add == 0 and extend_h == 0:
                add = 1
            new_expire = expire + timedelta(hours=extend_h)
            try:
                await calls.renew(package_id, expire=new_expire, add=add)
            except grpc.aio.AioRpcError as error:  # a revoked package
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                continue
            model.packages[index % len(model.packages)] = (package_id, new_expire)
        elif kind == "revoke" and model.packages:
            package_id, _ = model.packages[step[1] % len(model.packages)]
            try:
                await calls.revoke(package_id)
            except grpc.aio.AioRpcError as error:  # revoked before
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        elif kind == "advance":
            await calls.advance(timedelta(minutes=step[1]))
        elif kind == "usage":
            requests = []
            for quantity, project, status, occur_m in step[1]:
                model.events += 1
                requests.append(
                    calls.usage(
                        f"{account}-e{model.events}",
                        account,
                        quantity,
                        project=project,
                        http_status=status,
                        occur=now + timedelta(minutes=occur_m),
                    )
                )
            if len(requests) == 1:
                await calls.report_request(requests[0])
            else:
                await calls.batch(requests)


async def clock_now(calls: QuotaCalls) -> datetime:
    answer = await calls.clock.GetTime(clock_service_pb2.GetTimeRequest(), metadata=calls.admin)
    return from_timestamp(answer.time, "time")


async def recorded(quota, account: str) -> dict[str, tuple[list, int]]:
    """event id -> (deductions, pay-per-use quantity) as the database holds them."""
    engine = quota.server.runtime.db.engine
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                sa.text(
                    "SELECT event_id, deductions, pay_per_use_quantity FROM usage_events "
                    "WHERE account_id = :a"
                ),
                {"a": account},
            )
        ).all()
    return {r[0]: ([tuple(d) for d in json.loads(r[1])], r[2]) for r in rows}


@pytest.fixture(params=["standard", "expiring_first"])
async def policy_quota(request, database_url, tmp_path):
    """A quota server (manual clock at 2024-01-01) applying either deduction policy."""
    settings = quota_settings(
        database_url,
        tmp_path,
        clock="manual",
        clock_start="2024-01-01T00:00:00Z",
        deduction_policy=request.param,
    )
    async with running_quota(settings) as handle:
        yield handle


async def test_replay_of_the_real_packages_equals_what_was_recorded(policy_quota):
    quota = policy_quota
    calls = QuotaCalls(quota)
    ctx = quota.server.service.context
    loop = asyncio.get_running_loop()
    accounts = (f"replay-{n}" for n in itertools.count(1))
    checked: list[int] = []

    async def example(history: list[tuple]) -> None:
        account = next(accounts)
        start = await clock_now(calls)
        await play(calls, account, history)
        end = await clock_now(calls) + timedelta(days=1)
        spec = SimulationInput(account, REGION, API, start - FAR_BACK, end)
        result = await simulate_usage(ctx, spec, keep_events=True)
        truth = await recorded(quota, account)
        assert len(result.events) == len(truth)
        for replayed in result.events:
            deductions, pay_per_use = truth[replayed.recorded.event.event_id]
            assert list(replayed.replayed_deductions) == deductions, replayed
            assert replayed.outcome.pay_per_use_quantity == pay_per_use
        # The RPC answers the same sums.
        answer = await calls.simulate(start - FAR_BACK, end, account_id=account)
        assert answer.pay_per_use_quantity == sum(p for _, p in truth.values())
        assert answer.package_paid_quantity == sum(q for d, _ in truth.values() for _, q in d)
        assert answer.event_count == len(truth)
        # Merged runs of events (docs/design/what-if.md, "Bounds") pay each package the same.
        paid: dict[str, int] = {}
        for deductions, _ in truth.values():
            for package_id, quantity in deductions:
                paid[package_id] = paid.get(package_id, 0) + quantity
        assert {u.package_id: u.used_quantity for u in answer.per_package} == paid
        checked.append(len(truth))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(history=histories)
    def check(history):
        asyncio.run_coroutine_threadsafe(example(history), loop).result(timeout=120)

    await asyncio.to_thread(check)
    assert len(checked) >= EXAMPLES
    assert sum(checked) > 0  # the histories recorded usage at all


# --- hypothetical packages, policies, nothing written, errors ------------------------------------

JAN_2 = datetime(2024, 1, 2, tzinfo=UTC)
WINDOW = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC))
# passport-1k-1y bought 2023-03-01 (Asia/Shanghai calendar) covers up to this second.
OLD_1K_EXPIRES = datetime(2024, 3, 1, 15, 59, 59, tzinfo=UTC)


async def three_months_of_usage(calls: QuotaCalls) -> None:
    """400 calls on 2 January, 1 February and 10 March 2024, one failed call, no packages."""
    for n, day in enumerate(
        (JAN_2, datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 10, tzinfo=UTC))
    ):
        await calls.set_time(day)
        await calls.report(f"use-{n}", quantity=400)
    await calls.report("failed", quantity=7, http_status=503)


async def table_counts(quota) -> dict[str, int]:
    engine = quota.server.runtime.db.engine
    counts = {}
    async with engine.connect() as connection:
        for table in ("usage_events", "packages", "package_changes", "outbox_events"):
            query = sa.text(f"SELECT count(*) FROM {table}")  # noqa: S608 (fixed names)
            counts[table] = (await connection.execute(query)).scalar_one()
        query = sa.text("SELECT last_seq FROM history_counter")
        counts["history_counter"] = (await connection.execute(query)).scalar_one()
    return counts


async def test_hypothetical_packages_pay_expire_and_forfeit_and_nothing_is_written(quota):
    calls = QuotaCalls(quota)
    await three_months_of_usage(calls)
    before = await table_counts(quota)

    # The real history: no packages, everything pay-per-use.
    real = await calls.simulate(*WINDOW)
    assert (real.package_paid_quantity, real.pay_per_use_quantity) == (0, 1200)
    assert real.event_count == 4 and not real.forfeited and not real.per_package
    # Per calendar month of the billing time zone (UTC+08:00): January starts at 16:00 UTC on
    # 31 December.
    assert [(from_timestamp(m.month_start, "t"), m.pay_per_use_quantity) for m in real.months] == [
        (datetime(2023, 12, 31, 16, tzinfo=UTC), 400),
        (datetime(2024, 1, 31, 16, tzinfo=UTC), 400),
        (datetime(2024, 2, 29, 16, tzinfo=UTC), 400),
    ]

    # One 1k package from 1 January: it pays 1,000 calls, 200 stay pay-per-use; it expires
    # after the window, so nothing is forfeited.
    one = await calls.simulate(*WINDOW, packages=[calls.hypothetical("passport-1k-1y", WINDOW[0])])
    assert (one.package_paid_quantity, one.pay_per_use_quantity) == (1000, 200)
    assert [(u.package_id, u.used_quantity) for u in one.per_package] == [
        ("hypothetical-1-1", 1000)
    ]
    assert not one.forfeited

    # Two of them: everything is paid; the second package pays the last 200.
    two = await calls.simulate(
        *WINDOW, packages=[calls.hypothetical("passport-1k-1y", WINDOW[0], count=2)]
    )
    assert (two.package_paid_quantity, two.pay_per_use_quantity) == (1200, 0)
    assert [(u.package_id, u.used_quantity) for u in two.per_package] == [
        ("hypothetical-1-1", 1000),
        ("hypothetical-1-2", 200),
    ]

    # Bought on 1 March 2023 it expires on 1 March 2024 with 200 left: forfeited; the March
    # calls are pay-per-use.
    old = await calls.simulate(
        *WINDOW, packages=[calls.hypothetical("passport-1k-1y", "2023-03-01T00:00:00+08:00")]
    )
    assert (old.package_paid_quantity, old.pay_per_use_quantity) == (800, 400)
    assert [(f.package_id, f.quantity) for f in old.forfeited] == [("hypothetical-1-1", 200)]
    assert from_timestamp(old.forfeited[0].expire_time, "t") == OLD_1K_EXPIRES

    # A window that ends before March replays two events only.
    early = await calls.simulate(
        WINDOW[0],
        "2024-02-15T00:00:00Z",
        packages=[calls.hypothetical("passport-1k-1y", WINDOW[0])],
    )
    assert (early.package_paid_quantity, early.pay_per_use_quantity, early.event_count) == (
        800,
        0,
        2,
    )

    assert await table_counts(quota) == before


async def test_real_and_hypothetical_packages_under_either_policy(quota):
    calls = QuotaCalls(quota)
    # A real package of 500 calls valid January and February, granted before any usage.
    real = await calls.grant(
        quantity=500, effective="2024-01-01T00:00:00Z", expire="2024-02-29T23:59:59Z"
    )
    await three_months_of_usage(calls)
    # Replaying the real history: the package paid 400 + 100.
    replay = await calls.simulate(*WINDOW)
    assert (replay.package_paid_quantity, replay.pay_per_use_quantity) == (500, 700)
    # With a hypothetical 1k package that started earlier (June 2023) and expires later:
    hypothetical = [calls.hypothetical("passport-1k-1y", "2023-06-01T00:00:00Z")]
    # standard: the earlier start goes first, so the real package is left with 500 forfeited
    # at its expiry and the 1k one pays 1,000 of the 1,200.
    standard = await calls.simulate(
        *WINDOW, packages=hypothetical, use_real=True, policy="standard"
    )
    assert (standard.package_paid_quantity, standard.pay_per_use_quantity) == (1000, 200)
    assert [(f.package_id, f.quantity) for f in standard.forfeited] == [(real.package_id, 500)]
    # expiring_first: the real package (ends 29 February) goes first and is used up; the 1k
    # one pays the rest.
    expiring = await calls.simulate(
        *WINDOW, packages=hypothetical, use_real=True, policy="expiring_first"
    )
    assert (expiring.package_paid_quantity, expiring.pay_per_use_quantity) == (1200, 0)
    assert {(u.package_id, u.used_quantity) for u in expiring.per_package} == {
        (real.package_id, 500),
        ("hypothetical-1-1", 700),
    }
    assert not expiring.forfeited
    # use_real = false with no packages: pay-per-use only.
    none = await calls.simulate(*WINDOW, use_real=False)
    assert (none.package_paid_quantity, none.pay_per_use_quantity) == (0, 1200)


async def test_an_account_token_simulates_its_own_account_only(quota):
    calls = QuotaCalls(quota)
    await three_months_of_usage(calls)
    own = await calls.simulate(*WINDOW, account_id="", metadata=calls.account(read_only=True))
    assert own.pay_per_use_quantity == 1200
    await expect_error(
        calls.simulate(*WINDOW, metadata=calls.account("acct-2")),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_simulate_usage_errors_name_the_field(quota, monkeypatch):
    calls = QuotaCalls(quota)
    await three_months_of_usage(calls)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    start, end = WINDOW
    await expect_error(calls.simulate(end, start), bad, field="end_time")
    await expect_error(calls.simulate(start, start + timedelta(days=401)), bad, field="end_time")
    await expect_error(calls.simulate(start, end, policy="cheapest"), bad, field="policy")
    await expect_error(
        calls.simulate(start, end, packages=[calls.hypothetical("no-such-offer", start)]),
        bad,
        field="packages[0].offer_id",
    )
    await expect_error(
        calls.simulate(
            start,
            end,
            packages=[
                calls.hypothetical("passport-1k-1y", start),
                calls.hypothetical("id-card-1k-1y", start),
            ],
        ),
        bad,
        field="packages[1].offer_id",
    )
    await expect_error(
        calls.simulate(start, end, packages=[calls.hypothetical("passport-1k-1y", start, 101)]),
        bad,
        field="packages[0].count",
    )
    await expect_error(
        calls.simulate(start, end, api="no-such-api"), bad, reason="UNKNOWN_API", field="api"
    )
    # More events than a replay reads (the bound, lowered for the test).
    from services.quota.app import simulation

    monkeypatch.setattr(simulation, "MAX_EVENTS", 3)
    await expect_error(calls.simulate(start, end), bad, field="start_time")


async def test_replay_is_exact_under_concurrent_usage_renewals_and_revocations(quota):
    """Usage batches race renewals and a revocation of the packages they draw on (on
    PostgreSQL truly concurrently): the numbers the writers take while holding the packages'
    locks put every change on the side of each batch it happened on (docs/design/what-if.md,
    "Exactness")."""
    calls = QuotaCalls(quota)
    account = "racer"
    packages = [
        (await calls.grant(account, 500, expire="2024-06-30T23:59:59Z")).package_id
        for _ in range(3)
    ]

    async def use(n: int) -> None:
        await calls.batch([calls.usage(f"race-{n}-{k}", account, 7, project="") for k in range(2)])

    async def renew(n: int) -> None:
        await calls.renew(packages[1 + n % 2], add=5)

    async def revoke() -> None:
        await calls.revoke(packages[0])

    await asyncio.gather(*(use(n) for n in range(30)), *(renew(n) for n in range(6)), revoke())
    ctx = quota.server.service.context
    start = datetime(2023, 12, 1, tzinfo=UTC)
    result = await simulate_usage(
        ctx, SimulationInput(account, REGION, API, start, start + timedelta(days=60)), True
    )
    truth = await recorded(quota, account)
    assert len(result.events) == len(truth) == 60
    for replayed in result.events:
        deductions, pay_per_use = truth[replayed.recorded.event.event_id]
        assert list(replayed.replayed_deductions) == deductions
        assert replayed.outcome.pay_per_use_quantity == pay_per_use
