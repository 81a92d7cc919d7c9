"""Quota follows billing's account standings (docs/design/arrears.md, "How others
learn about it": each change is an account_standing_changed event; quota keeps a projection
of it for admission).

Standing changes into arrears are made the way billing's clock-driven arrears work makes them
(`services/billing/app/standing.py`): a transaction on billing's database that calls billing's
own `change_standing`, which saves the standing and writes the `account_standing_changed`
events into billing's outbox. That lets each test choose exactly when a change happens (while
quota or billing is down, say) without walking settlement and the clock; the whole arrears
path by the clock is `test_billing_pay_per_use.py::test_arrears_timeline_across_quota_and_
billing`. Leaving arrears goes through billing's real `TopUp` RPC. Everything between the two
services is the real path: billing's `WatchEvents`, quota's stream consumer, quota's
`CheckQuota`.

- processes (SQLite, manual clocks): quota started before billing keeps serving; once billing
  starts, its standing changes reach quota's admission; billing stopped and started again, the
  consumer reconnects and catches up; quota restarted, it resumes from its stored cursor.
- in process (SQLite and PostgreSQL): billing events fed through `standings.apply` into quota's
  database decide `CheckQuota` (FROZEN and RELEASED denied, GRACE allowed with pay-per-use);
  `ReportUsage` records usage whatever the standing; an older change after a newer one and a
  replay change nothing; unusable events are skipped.
- in process: the consumer's own state while billing is down and after it starts.

Every wait is bounded (`until`, process start and stop timeouts).
"""

from __future__ import annotations

import contextlib
import pathlib
from datetime import datetime, timedelta

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from allot.quota.v1 import quota_service_pb2
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select

from services.billing.service import BillingService
from services.quota.adapters import tables as quota_tables
from services.quota.adapters.billing_events import standing_change
from services.quota.app import standings
from services.quota.app.standings import Outcome
from shared.server import Server, build_runtime
from shared.settings import Settings
from shared.timeutil import to_epoch_us, to_timestamp
from tests.support.billing import billing_env, billing_process
from tests.support.notification import until
from tests.support.quota import (
    QuotaCalls,
    quota_calls,
    quota_env,
    quota_process,
    quota_settings,
    running_quota,
)
from tests.support.servers import TEST_SECRET, Tokens, free_port
from tests.support.standings import (
    DEBT_MICROS,
    FROZEN,
    FROZEN_AT,
    GOOD,
    GRACE,
    GRACE_START,
    RELEASED,
    RELEASED_AT,
    billing_database,
    publish_standing,
    read_db,
)

ALLOWED = quota_service_pb2.DENY_REASON_UNSPECIFIED
DENY_FROZEN = quota_service_pb2.DENY_REASON_ACCOUNT_FROZEN
DENY_RELEASED = quota_service_pb2.DENY_REASON_ACCOUNT_RELEASED

ACCOUNT = "acct-arrears"
OTHER = "acct-good"
CLOCK_START = "2024-05-01T00:00:00Z"
# Arrears as docs/design/arrears.md's example: pay-per-use settled at 11:00 leaves the balance below
# zero. A consumer retries a missing producer within 5 s (its backoff and the channel's); generous
# for a loaded machine, and every wait ends as soon as it is met.
FOLLOW_TIMEOUT = 45.0

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())


# --- billing, as a process and in process -------------------------------------------------


@contextlib.asynccontextmanager
async def running_billing(database_url: str, data_dir: pathlib.Path, addr: str, quota_addr: str):
    """An in-process billing server at `addr` beside the quota at `quota_addr`, and the
    service object (its context)."""
    settings = Settings.from_env(
        environ={},
        data_dir=str(data_dir),
        billing_database_url=database_url,
        billing_addr=addr,
        quota_addr=quota_addr,
        auth_secret=TEST_SECRET,
        shutdown_grace="2",
        clock="manual",
        clock_start=CLOCK_START,
    )
    runtime = build_runtime(settings, "billing")
    service = BillingService(runtime)
    server = Server(runtime, service, addr)
    await server.start()
    try:
        yield service
    finally:
        await server.stop()


async def create_account(stub, account_id: str) -> None:
    await stub.CreateAccount(
        billing_service_pb2.CreateAccountRequest(
            request_id=f"create-{account_id}",
            account=billing_pb2.Account(account_id=account_id, display_name=account_id),
        ),
        metadata=ADMIN,
        timeout=30,
    )


async def top_up(stub, account_id: str, micros: int, request_id: str) -> billing_pb2.Account:
    units, rest = divmod(micros, 1_000_000)
    return await stub.TopUp(
        billing_service_pb2.TopUpRequest(
            request_id=request_id,
            account_id=account_id,
            amount=money_pb2.Money(currency_code="USD", units=units, nanos=rest * 1000),
        ),
        metadata=ADMIN,
        timeout=30,
    )


# --- quota helpers --------------------------------------------------------------------------


async def set_up_quota(q: QuotaCalls, account_id: str, quantity: int = 10) -> None:
    """An enabled API and one package, so admission turns only on the standing."""
    await q.enable(account_id)
    await q.grant(account_id, quantity)


async def wait_for_deny_reason(q: QuotaCalls, account_id: str, reason: int, what: str):
    return await until(
        lambda: q.check(account_id),
        lambda r: r.deny_reason == reason,
        FOLLOW_TIMEOUT,
        what,
    )


async def health_status(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10
    )
    return response.status


# --- processes ------------------------------------------------------------------------------


async def test_quota_follows_billing_started_later_and_restarted(tmp_path):
    quota_url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    billing_url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    billing_addr = f"127.0.0.1:{free_port()}"
    q_env = quota_env(
        quota_url,
        tmp_path,
        ALLOT_BILLING_ADDR=billing_addr,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=CLOCK_START,
        ALLOT_CONSUMER_LEASE_SECONDS="2",
        ALLOT_SHUTDOWN_GRACE_SECONDS="2",
    )
    b_env = billing_env(
        billing_url,
        tmp_path,
        q_env["ALLOT_QUOTA_ADDR"],
        CLOCK_START,
        ALLOT_BILLING_ADDR=billing_addr,
    )

    with quota_process(q_env, tmp_path / "quota.log") as quota:
        async with grpc.aio.insecure_channel(quota.addr) as q_channel:
            q = quota_calls(q_channel)
            # Billing is not running: the consumer fails and retries, quota serves all the same.
            await until(
                lambda: current(quota.log_text().count("billing: stream failed")),
                lambda failures: failures >= 2,
                FOLLOW_TIMEOUT,
                "the consumer failing twice while billing is down",
            )
            assert await health_status(q_channel) == health_pb2.HealthCheckResponse.SERVING
            for account in (ACCOUNT, OTHER):
                await set_up_quota(q, account)
            used = await q.report("before-billing", ACCOUNT)
            assert (used.billable, used.remaining_quantity) == (True, 9)
            assert (await q.check(ACCOUNT)).allowed

            with billing_process(b_env, tmp_path / "billing.log") as billing:
                async with grpc.aio.insecure_channel(billing.addr) as b_channel:
                    b = billing_service_pb2_grpc.BillingServiceStub(b_channel)
                    for account in (ACCOUNT, OTHER):
                        await create_account(b, account)
                    async with billing_database(billing_url) as b_db:
                        await publish_standing(b_db, ACCOUNT, GRACE, DEBT_MICROS, GRACE_START)
                        await publish_standing(b_db, ACCOUNT, FROZEN, DEBT_MICROS, FROZEN_AT)
                    denied = await wait_for_deny_reason(
                        q, ACCOUNT, DENY_FROZEN, "FROZEN reaching quota from billing"
                    )
                    assert not denied.allowed
                    # Usage that happened is recorded whatever the standing.
                    used = await q.report("while-frozen", ACCOUNT, 3)
                    assert (used.billable, used.remaining_quantity) == (True, 6)
                    assert (await q.check(OTHER)).allowed
                assert billing.terminate(timeout=30) == 0

            # Billing stopped: quota keeps its projection and keeps serving.
            assert await health_status(q_channel) == health_pb2.HealthCheckResponse.SERVING
            assert (await q.check(ACCOUNT)).deny_reason == DENY_FROZEN
            assert (await q.report("billing-down", OTHER)).billable

            # Billing back: a real TopUp that clears the debt returns the account to GOOD.
            with billing_process(b_env, tmp_path / "billing.log") as billing:
                async with grpc.aio.insecure_channel(billing.addr) as b_channel:
                    b = billing_service_pb2_grpc.BillingServiceStub(b_channel)
                    account = await top_up(b, ACCOUNT, 5_000_000, "top-up-1")
                    assert account.standing == GOOD
                    allowed = await wait_for_deny_reason(
                        q, ACCOUNT, ALLOWED, "GOOD reaching quota after billing restarted"
                    )
                    assert allowed.allowed

                    # Quota restarted while billing runs: it resumes from its stored cursor.
                    assert quota.terminate(timeout=30) == 0
                    async with billing_database(billing_url) as b_db:
                        await publish_standing(b_db, OTHER, GRACE, DEBT_MICROS, GRACE_START)
                        await publish_standing(b_db, OTHER, FROZEN, DEBT_MICROS, FROZEN_AT)
                        await publish_standing(b_db, OTHER, RELEASED, DEBT_MICROS, RELEASED_AT)
                    quota.start()
                    async with grpc.aio.insecure_channel(quota.addr) as q2_channel:
                        q2 = quota_calls(q2_channel)
                        await wait_for_deny_reason(
                            q2, OTHER, DENY_RELEASED, "RELEASED reaching a restarted quota"
                        )
                        assert (await q2.check(ACCOUNT)).allowed
                    assert quota.terminate(timeout=30) == 0

    # Quota holds each account's last change by billing's sequence, and its cursor is at
    # billing's last standing change: GRACE, FROZEN, GOOD of ACCOUNT; GRACE, FROZEN, RELEASED
    # of OTHER.
    published = await read_db(
        billing_url,
        "SELECT sequence FROM outbox_events WHERE event_type = 'account_standing_changed' "
        "ORDER BY sequence",
    )
    assert len(published) == 6
    rows = await read_db(
        quota_url,
        "SELECT account_id, standing, billing_sequence FROM account_standings ORDER BY 1",
    )
    assert rows == [(ACCOUNT, GOOD, published[2][0]), (OTHER, RELEASED, published[5][0])]
    cursor = await read_db(
        quota_url, "SELECT sequence FROM consumer_cursors WHERE stream = 'billing'"
    )
    assert cursor == [published[-1]]


# --- in process: the projection through `apply` ----------------------------------------------


def standing_event(
    sequence: int,
    standing: int,
    account_id: str = ACCOUNT,
    previous: int = GOOD,
    change_time: datetime | None = None,
    event_id: str | None = None,
) -> billing_pb2.BillingEvent:
    event = billing_pb2.BillingEvent(
        sequence=sequence,
        event_id=event_id or f"evt-{sequence}",
        create_time=to_timestamp(GRACE_START + timedelta(minutes=sequence)),
        account_standing_changed=billing_pb2.AccountStandingChanged(
            account_id=account_id, previous_standing=previous, standing=standing
        ),
    )
    if change_time is not None:
        event.account_standing_changed.change_time.CopyFrom(to_timestamp(change_time))
    return event


async def feed(quota, *events: billing_pb2.BillingEvent) -> list[Outcome]:
    """Apply billing events to quota's database, each in its own transaction."""
    ctx = quota.server.service.context
    outcomes = []
    for event in events:
        change = standing_change(event)
        outcomes.append(
            await ctx.db.transaction(lambda uow, c=change: standings.apply(ctx, uow, c))
        )
    return outcomes


async def stored_standings(quota) -> dict[str, tuple]:
    c = quota_tables.account_standings.c

    async def work(uow):
        rows = await uow.session.execute(
            select(
                c.account_id, c.standing, c.change_time_us, c.billing_sequence, c.billing_event_id
            )
        )
        return {r.account_id: tuple(r)[1:] for r in rows}

    return await quota.server.service.context.db.read(work)


async def test_standings_decide_admission(quota):
    q = QuotaCalls(quota)
    await set_up_quota(q, ACCOUNT, quantity=10)
    await set_up_quota(q, OTHER, quantity=10)

    async def check(quantity: int = 1):
        r = await q.check(ACCOUNT, quantity)
        return (r.allowed, r.deny_reason, r.pay_per_use)

    assert await check() == (True, ALLOWED, False)  # no standing yet: good

    assert await feed(quota, standing_event(1, GRACE, change_time=GRACE_START)) == [Outcome.APPLIED]
    # Grace: packages and pay-per-use still work.
    assert await check() == (True, ALLOWED, False)
    assert await check(25) == (True, ALLOWED, True)
    grace_use = await q.report("grace-1", ACCOUNT, 12)
    assert (grace_use.pay_per_use_quantity, grace_use.remaining_quantity) == (2, 0)

    await feed(quota, standing_event(2, FROZEN, previous=GRACE, change_time=FROZEN_AT))
    assert await check() == (False, DENY_FROZEN, True)
    # Usage that happened is recorded whatever the admission state.
    frozen_use = await q.report("frozen-1", ACCOUNT, 4)
    assert (frozen_use.billable, frozen_use.pay_per_use_quantity) == (True, 4)
    assert (await q.report("frozen-1", ACCOUNT, 4)).duplicate

    await feed(quota, standing_event(3, RELEASED, previous=FROZEN, change_time=RELEASED_AT))
    assert await check() == (False, DENY_RELEASED, True)
    assert (await q.report("released-1", ACCOUNT)).pay_per_use_quantity == 1

    # Other accounts are untouched.
    assert (await q.check(OTHER)).allowed

    await feed(quota, standing_event(4, GOOD, previous=RELEASED))
    assert await check() == (True, ALLOWED, True)
    stored = await stored_standings(quota)
    # Without a change_time the event's create_time is the change time.
    assert stored == {ACCOUNT: (GOOD, to_epoch_us(GRACE_START + timedelta(minutes=4)), 4, "evt-4")}


async def test_older_changes_and_replays_change_nothing(quota):
    q = QuotaCalls(quota)
    await set_up_quota(q, ACCOUNT)
    frozen = standing_event(7, FROZEN, previous=GRACE, change_time=FROZEN_AT)
    assert await feed(quota, frozen) == [Outcome.APPLIED]
    before = await stored_standings(quota)
    assert before == {ACCOUNT: (FROZEN, to_epoch_us(FROZEN_AT), 7, "evt-7")}

    outcomes = await feed(
        quota,
        standing_event(5, GOOD, previous=GRACE),  # an older change arriving late
        standing_event(6, GRACE, change_time=GRACE_START),
        frozen,  # a replay
        standing_event(7, GOOD, event_id="evt-other-7"),  # the same sequence again
    )
    assert outcomes == [Outcome.STALE] * 4
    assert await stored_standings(quota) == before
    assert (await q.check(ACCOUNT)).deny_reason == DENY_FROZEN

    # A newer change still applies, even stamped earlier (billing's sequence is its order).
    assert await feed(quota, standing_event(8, GOOD, previous=FROZEN, change_time=GRACE_START))
    assert (await stored_standings(quota))[ACCOUNT][:1] == (GOOD,)
    assert (await q.check(ACCOUNT)).allowed


async def test_unusable_events_are_skipped(quota):
    q = QuotaCalls(quota)
    await set_up_quota(q, ACCOUNT)
    other_payload = billing_pb2.BillingEvent(
        sequence=1,
        event_id="evt-1",
        balance_below_threshold=billing_pb2.BalanceBelowThreshold(account_id=ACCOUNT),
    )
    outcomes = await feed(
        quota,
        other_payload,
        standing_event(2, billing_pb2.ACCOUNT_STANDING_UNSPECIFIED),
        standing_event(3, 99),  # a standing this quota does not know
        standing_event(4, FROZEN, account_id=""),
        standing_event(5, FROZEN, account_id="bad id!"),
    )
    assert outcomes == [Outcome.IGNORED] * 5
    assert await stored_standings(quota) == {}
    assert (await q.check(ACCOUNT)).allowed


# --- in process: the consumer before and after billing starts ---------------------------------


async def test_consumer_retries_until_billing_starts(tmp_path):
    billing_addr = f"127.0.0.1:{free_port()}"
    settings = quota_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}",
        tmp_path,
        clock="manual",
        clock_start=CLOCK_START,
        billing_addr=billing_addr,
        consumer_lease_seconds="2",
    )
    async with running_quota(settings) as handle:
        q = QuotaCalls(handle)
        consumer = handle.server.service.standings_consumer
        assert consumer is not None and consumer.stream == "billing"
        assert await health_status(handle.channel) == health_pb2.HealthCheckResponse.SERVING
        await set_up_quota(q, ACCOUNT)
        assert (await q.report("no-billing", ACCOUNT)).remaining_quantity == 9

        # Billing is down: the consumer fails, pauses and tries again; nothing is applied.
        await until(
            lambda: current(consumer.errors), lambda n: n >= 2, FOLLOW_TIMEOUT, "two retries"
        )
        assert consumer.last_error is not None
        assert consumer.applied == 0 and consumer.last_sequence == 0
        assert (await q.check(ACCOUNT)).allowed

        billing_url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
        async with running_billing(
            billing_url, tmp_path, billing_addr, handle.server.bound_addr
        ) as billing:
            errors = consumer.errors
            async with grpc.aio.insecure_channel(billing_addr) as b_channel:
                b = billing_service_pb2_grpc.BillingServiceStub(b_channel)
                await create_account(b, ACCOUNT)
                await publish_standing(billing.context, ACCOUNT, GRACE, DEBT_MICROS, GRACE_START)
                await publish_standing(billing.context, ACCOUNT, FROZEN, DEBT_MICROS, FROZEN_AT)
                assert await consumer.wait_for(2, within=FOLLOW_TIMEOUT)
                assert consumer.connected and consumer.holding
                assert consumer.applied == 2
                assert (await q.check(ACCOUNT)).deny_reason == DENY_FROZEN

                await top_up(b, ACCOUNT, 5_000_000, "top-up-1")
                assert await consumer.wait_for(3, within=FOLLOW_TIMEOUT)
                assert (await q.check(ACCOUNT)).allowed
                # Connected, it stayed connected: no failure since billing came up.
                assert consumer.errors <= errors + 1
                assert consumer.connected


async def current(value):
    """A value read now, as a coroutine (what `until` reads through)."""
    return value
