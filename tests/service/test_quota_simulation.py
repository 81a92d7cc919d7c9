"""SimulateUsage, the what-if replay (docs/design/what-if.md), against real quota servers on
SQLite and PostgreSQL.

The central property: a Hypothesis-generated history of grants (some starting in the past,
some designated for a project), renewals (some of expired packages, which forfeit), revocations,
clock moves (expiries; several writes at one instant) and usage (single events and batches, late
reports, failed calls) is recorded by the real service; replaying the real packages under the
real policy over the whole history gives every event exactly the deductions and pay-per-use
quantity it was recorded with.
"""

from __future__ import annotations

import asyncio
import json
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from allot.testing.v1 import clock_service_pb2
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.quota.app.simulation import SimulationInput, simulate_usage
from shared.timeutil import from_timestamp
from tests.support.calls import expect_error
from tests.support.quota import API, FREE, PROMOTION, REGION, SUBSCRIPTION, QuotaCalls

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


async def test_replay_of_the_real_packages_equals_what_was_recorded(quota):
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
