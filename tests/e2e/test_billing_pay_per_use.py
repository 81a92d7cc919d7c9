"""Pay-per-use end to end: quota and billing as processes (`python -m services.quota`,
`python -m services.billing`), manual clocks, billing reading quota's real event stream.

- Billing SIGKILLed and restarted while pay-per-use events stream in (billing on SQLite and on
  PostgreSQL): every event is rated exactly once. Quota's stream is the truth: per account, the
  billed quantities of the month's bill add up to the pay-per-use quantity quota reported, the
  lines explain the balance, and every cycle is settled. Cycles whose usage arrives after they
  ended are settled while events still arrive, so kills land in intake and in settlement.
- The arrears timeline of docs/design/arrears.md across both services: zero balance, pay-per-use
  settled at 2024-05-01 11:00 → GRACE (calls still admitted, purchases and subscribing refused as
  ACCOUNT_IN_ARREARS), FROZEN at 2024-05-16 11:00 (CheckQuota denies), RELEASED at
  2024-05-31 11:00 (subscriptions cancelled at quota); a top-up on 2024-05-10 that covers the
  debt returns to GOOD at once.
- A package bought at 16:30:30 after pay-per-use since 15:29:16: bill lines 15:00–16:00 and
  16:00–17:00 (pay-per-use) and the purchase; later calls are paid by the package.

Times are in the billing time zone (Asia/Shanghai). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from shared.money import round_half_up_to_minor
from tests.support.billing import (
    BILLING_TZ,
    BillingCalls,
    BillingProcess,
    billing_env,
    billing_process,
    local,
    micros,
    paired_env,
)
from tests.support.calls import expect_error, ts
from tests.support.databases import (
    DirectReader,
)
from tests.support.events import PAY_PER_USE_RECORDED, events
from tests.support.notification import until
from tests.support.processes import grown_to
from tests.support.quota import quota_calls, quota_env, quota_process
from tests.support.servers import Tokens, free_port
from tests.support.standings import FROZEN, GOOD, GRACE, RELEASED

TZ = BILLING_TZ
TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())

HK = "ap-southeast-1"
PASSPORT = "passport"
PAY_PER_USE = billing_pb2.BILL_LINE_KIND_PAY_PER_USE
PURCHASE = billing_pb2.BILL_LINE_KIND_PACKAGE_PURCHASE
TOP_UP = billing_pb2.BILL_LINE_KIND_TOP_UP


def utc_text(value: datetime) -> str:
    return value.astimezone(ZoneInfo("UTC")).isoformat().replace("+00:00", "Z")


# --- killed and restarted ---------------------------------------------------------------------

ACCOUNTS = [f"acct-ppu-{i}" for i in range(4)]
EVENTS = 240
KILLS = 3
# Usage spreads over 08:00-19:59 of one day; billing's clock stays at 12:00 until the end, so
# the morning's cycles are due (and settled) while their usage still arrives.
FIRST_CALL = local("2024-05-01 08:00")
STEP = timedelta(minutes=3)
QUOTA_CLOCK = local("2024-05-01 20:00")
BILLING_CLOCK = local("2024-05-01 12:00")
END = local("2024-05-01 21:00")
PACE = (0.005, 0.03)
PROGRESS_TIMEOUT = 60.0
# Once everything is produced, a kill waits this long for progress, then goes anyway: longer
# than a restarted replica waits for the dead one's lease (ALLOT_CONSUMER_LEASE_SECONDS=2).
STILL = 4.0
FINISH_TIMEOUT = 60.0


class Producer(threading.Thread):
    """Reports EVENTS pay-per-use calls (1-5 each) round-robin over ACCOUNTS in time order at
    a steady pace, on its own synchronous channel; keeps what quota answered and any error."""

    def __init__(self, quota_addr: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.quota_addr = quota_addr
        self.rng = random.Random(seed)
        self.error: BaseException | None = None
        self.pay_per_use: Counter[str] = Counter()

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.quota_addr) as channel:
                stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
                for i in range(EVENTS):
                    account = ACCOUNTS[i % len(ACCOUNTS)]
                    request = quota_service_pb2.ReportUsageRequest(
                        event_id=f"ppu-{i}",
                        account_id=account,
                        user_id="user-1",
                        region=HK,
                        api=PASSPORT,
                        quantity=self.rng.randint(1, 5),
                        http_status=200,
                        occur_time=ts(FIRST_CALL + i * STEP),
                    )
                    response = stub.ReportUsage(request, metadata=GATEWAY, timeout=30)
                    self.pay_per_use[account] += response.pay_per_use_quantity
                    time.sleep(self.rng.uniform(*PACE))
        except BaseException as exc:  # reported by the test
            self.error = exc


class BillingDatabase(DirectReader):
    """Billing's database read directly (either dialect): the consumer's cursor, the cycles.
    A query error is raised, never read as a number."""

    async def cursor(self) -> int:
        """The consumer's position; 0 before the first process ran its migrations or read."""
        return await self.scalar_once(
            "consumer_cursors", "SELECT max(sequence) FROM consumer_cursors"
        )

    async def wait(
        self, at_least: int, within: float, finished: Callable[[], bool] = lambda: False
    ) -> int:
        """Until the cursor reaches `at_least`, or, once `finished()`, it has not moved for
        STILL seconds."""
        return await grown_to(self.cursor, at_least, within, finished, STILL, "cursor")


@pytest.fixture
async def db(service_url):
    database = BillingDatabase(service_url)
    try:
        yield database
    finally:
        await database.engine.dispose()


async def test_killed_and_restarted_billing_rates_every_event_exactly_once(
    service_url, db, seed, tmp_path
):
    rng = random.Random(seed)
    billing_addr = f"127.0.0.1:{free_port()}"
    quota_data = tmp_path / "quota"
    quota_data.mkdir()
    q_env = quota_env(
        f"sqlite+aiosqlite:///{quota_data / 'quota.db'}",
        quota_data,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=utc_text(QUOTA_CLOCK),
        ALLOT_BILLING_ADDR=billing_addr,
    )
    with quota_process(q_env, tmp_path / "quota.log") as quota:
        env = billing_env(
            service_url,
            tmp_path,
            quota.addr,
            utc_text(BILLING_CLOCK),
            ALLOT_BILLING_ADDR=billing_addr,
        )
        processes: list[BillingProcess] = []

        def start(n: int) -> BillingProcess:
            process = BillingProcess(env, tmp_path / f"billing-{n}.log")
            processes.append(process)
            process.start()
            return process

        try:
            first = start(0)
            async with grpc.aio.insecure_channel(first.addr) as channel:
                b = BillingCalls(channel)
                for account in ACCOUNTS:
                    await b.create_account(account)
                    await b.top_up(account, "1000", request_id=f"fund-{account}")

            producer = Producer(quota.addr, seed)
            producer.start()
            thresholds = sorted(rng.sample(range(10, EVENTS - 10), KILLS))
            cursors_at_kill = [0]
            current = first
            for k, threshold in enumerate(thresholds, start=1):
                await db.wait(
                    max(threshold, cursors_at_kill[-1] + 1),
                    PROGRESS_TIMEOUT,
                    finished=lambda: not producer.is_alive(),
                )
                await asyncio.sleep(rng.uniform(0, 0.05))
                current.kill()  # SIGKILL
                cursors_at_kill.append(await db.cursor())
                current = start(k)
            producer.join(PROGRESS_TIMEOUT)
            assert not producer.is_alive(), "the producer did not finish"
            assert producer.error is None, f"producer failed: {producer.error!r} (seed {seed})"

            # Quota's stream is the truth.
            async with grpc.aio.insecure_channel(quota.addr) as quota_channel:
                stub = quota_service_pb2_grpc.QuotaServiceStub(quota_channel)
                recorded = await events(stub, ADMIN, 0, [PAY_PER_USE_RECORDED], at_least=EVENTS)
            assert len(recorded) == EVENTS
            truth: Counter[str] = Counter()
            for event in recorded:
                truth[event.pay_per_use_recorded.account_id] += event.pay_per_use_recorded.quantity
            assert truth == producer.pay_per_use
            last = recorded[-1].sequence

            await db.wait(last, FINISH_TIMEOUT)
            async with grpc.aio.insecure_channel(current.addr) as channel:
                b = BillingCalls(channel)
                await b.set_time(END)  # every cycle has ended: all settle before this returns
                bills = {a: await b.get_bill(a, "2024-05") for a in ACCOUNTS}
                balances = {a: micros((await b.get_account(a)).balance) for a in ACCOUNTS}
        finally:
            for process in processes:
                process.kill()
    unsettled = await db.scalar("SELECT count(*) FROM usage_cycles WHERE NOT settled")
    cycle_total = await db.scalar("SELECT sum(quantity) FROM usage_cycles")

    assert len(processes) == KILLS + 1
    assert cursors_at_kill == sorted(cursors_at_kill), cursors_at_kill
    assert unsettled == 0
    assert cycle_total == sum(truth.values()), f"seed {seed}"
    for account in ACCOUNTS:
        bill = bills[account]
        lines = [line for line in bill.lines if line.kind == PAY_PER_USE]
        billed = sum(line.quantity for line in lines)
        assert billed == truth[account], (
            f"{account}: billed {billed} of {truth[account]} (seed {seed})"
        )
        assert all(line.quantity > 0 for line in lines)
        effects = sum(micros(line.amount) for line in bill.lines)
        assert micros(bill.closing_balance) == micros(bill.opening_balance) + effects
        assert micros(bill.closing_balance) == balances[account]
        # Tier 1 of the sample catalog (0.0025 a call), each line rounded half up to the cent.
        assert [micros(line.amount) for line in lines] == [
            -round_half_up_to_minor(line.quantity * 2_500, "USD") for line in lines
        ]


# --- the arrears timeline ---------------------------------------------------------------------


async def test_arrears_timeline_across_quota_and_billing(tmp_path):
    q_env, b_env = paired_env(tmp_path, "2024-05-01T00:00:00Z")
    with quota_process(q_env, tmp_path / "quota.log") as quota_proc:
        b_env["ALLOT_QUOTA_ADDR"] = quota_proc.addr
        with billing_process(b_env, tmp_path / "billing.log") as billing_proc:
            async with (
                grpc.aio.insecure_channel(quota_proc.addr) as qc,
                grpc.aio.insecure_channel(billing_proc.addr) as bc,
            ):
                quota = quota_calls(qc)
                billing = BillingCalls(bc)
                for account in ("late", "saved"):
                    await billing.create_account(account)
                    await billing.stub.SubscribeApi(
                        billing_service_pb2.SubscribeApiRequest(
                            request_id=f"sub-{account}", account_id=account, region=HK, api=PASSPORT
                        ),
                        metadata=billing.admin,
                    )
                    await quota.set_time(local("2024-05-01 10:30"))
                    # 10 calls at 0.0025: 0.025, rounded half up to 0.03.
                    await quota.report(
                        f"call-{account}", account, 10, occur=local("2024-05-01 10:30")
                    )

                # Zero balance, the 10:00 cycle settled at 11:00: GRACE from then.
                await billing.set_time(local("2024-05-01 11:00"))
                for account in ("late", "saved"):
                    got = await until(
                        lambda account=account: billing.get_account(account),
                        lambda a: a.standing == GRACE,
                        what=f"{account} in grace",
                    )
                    assert got.standing_change_time.ToDatetime(tzinfo=TZ) == local(
                        "2024-05-01 11:00"
                    )
                    assert micros(got.balance) == -30_000
                    assert got.grace_end_time.ToDatetime(tzinfo=TZ) == local("2024-05-16 11:00")
                    assert got.retention_end_time.ToDatetime(tzinfo=TZ) == local("2024-05-31 11:00")
                (line,) = (await billing.get_bill("late", "2024-05")).lines
                assert (line.kind, line.quantity, micros(line.amount)) == (PAY_PER_USE, 10, -30_000)

                # In grace: calls are admitted (pay-per-use too), purchases and subscribing are
                # refused.
                check = await until(
                    lambda: quota.check("late"),
                    lambda c: c.allowed and c.pay_per_use,
                    what="a call admitted in grace",
                )
                assert check.allowed
                # The balance is negative too: the reason tells arrears from a short balance.
                await expect_error(
                    billing.stub.PurchasePackage(
                        billing_service_pb2.PurchasePackageRequest(
                            request_id="buy",
                            account_id="late",
                            offer_id="passport-1k-1y",
                            region=HK,
                        ),
                        metadata=billing.admin,
                    ),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "ACCOUNT_IN_ARREARS",
                )
                await expect_error(
                    billing.stub.SubscribeApi(
                        billing_service_pb2.SubscribeApiRequest(
                            request_id="sub-more", account_id="late", region=HK, api="general-text"
                        ),
                        metadata=billing.admin,
                    ),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "ACCOUNT_IN_ARREARS",
                )

                # A top-up on 2024-05-10 that covers the debt: GOOD at once.
                await billing.set_time(local("2024-05-10 09:00"))
                assert (await billing.top_up("saved", "0.03")).standing == GOOD

                await billing.set_time(local("2024-05-16 11:00"))
                late = await billing.get_account("late")
                assert late.standing == FROZEN
                assert late.standing_change_time.ToDatetime(tzinfo=TZ) == local("2024-05-16 11:00")
                await until(
                    lambda: quota.check("late"),
                    lambda c: c.deny_reason == quota_service_pb2.DENY_REASON_ACCOUNT_FROZEN,
                    what="quota refusing the frozen account",
                )
                assert (await billing.get_account("saved")).standing == GOOD
                assert (await quota.check("saved")).allowed

                await billing.set_time(local("2024-05-31 11:00"))
                late = await billing.get_account("late")
                assert late.standing == RELEASED
                assert late.standing_change_time.ToDatetime(tzinfo=TZ) == local("2024-05-31 11:00")
                # Release cancelled the subscription at quota before AdvanceTime returned.
                found = await quota.subscriptions("late")
                assert [(s.api, s.state) for s in found.api_subscriptions] == [
                    (PASSPORT, quota_pb2.API_SUBSCRIPTION_STATE_CANCELLED)
                ]
                check = await quota.check("late")
                assert not check.allowed
                kept = await quota.subscriptions("saved")
                assert [s.state for s in kept.api_subscriptions] == [
                    quota_pb2.API_SUBSCRIPTION_STATE_ACTIVE
                ]


async def test_pay_per_use_then_a_package_bought_at_16_30_30(tmp_path):
    q_env, b_env = paired_env(tmp_path, utc_text(local("2024-05-01 15:00")))
    with quota_process(q_env, tmp_path / "quota.log") as quota_proc:
        b_env["ALLOT_QUOTA_ADDR"] = quota_proc.addr
        with billing_process(b_env, tmp_path / "billing.log") as billing_proc:
            async with (
                grpc.aio.insecure_channel(quota_proc.addr) as qc,
                grpc.aio.insecure_channel(billing_proc.addr) as bc,
            ):
                quota = quota_calls(qc)
                billing = BillingCalls(bc)
                await billing.create_account("acme")
                await billing.top_up("acme", "100", request_id="fund")
                calls = ["15:29:16", "15:40", "15:59:59", "16:00:00", "16:20", "16:30:29"]
                for i, at in enumerate(calls):
                    when = local(f"2024-05-01 {at}")
                    await quota.set_time(when)
                    response = await quota.report(f"ppu-{i}", "acme", 1, occur=when)
                    assert response.pay_per_use_quantity == 1

                bought_at = local("2024-05-01 16:30:30")
                await quota.set_time(bought_at)
                await billing.set_time(bought_at)  # settles 15:00-16:00
                order = await billing.stub.PurchasePackage(
                    billing_service_pb2.PurchasePackageRequest(
                        request_id="buy-1",
                        account_id="acme",
                        offer_id="passport-1k-1y",
                        region=HK,
                    ),
                    metadata=billing.admin,
                )
                await until(
                    lambda: billing.stub.GetOrder(
                        billing_service_pb2.GetOrderRequest(order_id=order.order_id),
                        metadata=billing.admin,
                    ),
                    lambda o: o.state == billing_pb2.ORDER_STATE_FULFILLED,
                    what="the order fulfilled",
                )
                # Calls after the purchase are paid by the package.
                after = local("2024-05-01 16:45")
                await quota.set_time(after)
                response = await quota.report("pkg-1", "acme", 1, occur=after)
                assert response.pay_per_use_quantity == 0

                await billing.set_time(local("2024-05-01 17:00"))
                bill = await until(
                    lambda: billing.get_bill("acme", "2024-05"),
                    lambda b: sum(line.kind == PAY_PER_USE for line in b.lines) == 2,
                    what="both cycles on the bill",
                )
                rows = [
                    (
                        line.kind,
                        line.cycle_start_time.ToDatetime(tzinfo=TZ)
                        if line.HasField("cycle_start_time")
                        else None,
                        line.quantity if line.kind == PAY_PER_USE else None,
                    )
                    for line in bill.lines
                    if line.kind != TOP_UP
                ]
                assert rows == [
                    (PAY_PER_USE, local("2024-05-01 15:00"), 3),
                    (PAY_PER_USE, local("2024-05-01 16:00"), 3),
                    (PURCHASE, None, None),
                ]
                purchase = bill.lines[-1]
                assert purchase.occur_time.ToDatetime(tzinfo=TZ) == bought_at
                effects = sum(micros(line.amount) for line in bill.lines)
                assert micros(bill.closing_balance) == effects  # opened at zero
                assert micros((await billing.get_account("acme")).balance) == effects
