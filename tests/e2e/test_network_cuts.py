"""The network between the services cut silently and healed (docs/faults.md, "The network
between the services"): nothing lost, nothing done twice, and the services find each other
again promptly on their own.

Every service-to-service path goes through a `TcpProxy` (tests/support/proxy.py): the dialing
service's address setting names the proxy, the proxy forwards to the real process. `cut()` is
a failover without reset — nothing errors, nothing arrives, and the connections that lived
through it stay dead after `heal()` — so a service recovers only by noticing the dead HTTP/2
connection itself (gRPC keepalive, call deadlines) and dialing again.

- billing ↔ quota (both on PostgreSQL): purchases made during the cut are paid and stay
  PENDING (neither FAILED nor refunded); after the heal they are FULFILLED within RECOVERY;
  quota holds exactly one package per order, the balance is charged once per order, the bill
  has no refund. Quota follows billing's stream through the other proxy: standing changes made
  during the cut reach quota's admission after the heal, and quota's cursor ends at billing's
  last standing change.
- notification ↔ quota and billing (quota and notification on PostgreSQL, billing on SQLite,
  email to a real SMTP receiver): usage-alert crossings made at quota and an arrears change
  made at billing during the cut reach notification after the heal from its stored cursors;
  each gives exactly one notification and one email, the crossing before the cut is not sent
  again. Both streams are left idle first: gRPC stops pinging a connection on
  which no data flows unless told otherwise.
- a consumer gone behind a cut that never heals: quota's own keepalive ends its stream, which
  would otherwise hold one of the caller's ALLOT_MAX_STREAMS_PER_CALLER for hours.

Each test prints how long recovery took. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc

from tests.support.billing import BillingCalls, billing_env, billing_process, micros, write_catalog
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.events import AlertCalls
from tests.support.notification import (
    ARREARS,
    CLOCK_START,
    EMAIL,
    SENT,
    USAGE_ALERT,
    NotificationCalls,
    deliveries,
    notification_env,
    notification_process,
    until,
)
from tests.support.proxy import tcp_proxy
from tests.support.quota import API, REGION, QuotaCalls, quota_calls, quota_env, quota_process
from tests.support.receivers import smtp_receiver
from tests.support.servers import Tokens, free_port
from tests.support.standings import (
    DEBT_MICROS,
    FROZEN,
    FROZEN_AT,
    GRACE,
    GRACE_START,
    billing_database,
    publish_standing,
    read_db,
)

# After heal(), how long the services may take to find each other again: a connection that went
# silent is dropped by gRPC keepalive at most 10 s after its last read (a ping after 5 s without
# reads, even on an idle stream, and 5 s for its ack: CHANNEL_OPTIONS in shared/channels.py) and
# dialled again at once; then billing offers pending orders within 2 s, a consumer reconnects
# within its backoff (at most 5 s). Measured here: 1-4 s after a cut longer than 10 s (the
# channel waits out its reconnect backoff), 2-7 s after a 3 s one. Generous for a loaded 2-core
# machine, and well short of the 66 s it took with gRPC's one-minute default ping timeout.
RECOVERY = 30.0
# A call during the cut that waits on the other service: billing's grant call gives up after
# 10 s (services/billing/adapters/quota_client.py), and the purchase answers then.
CUT_CALL_TIMEOUT = 40.0
CALL_TIMEOUT = 20.0

TOKENS = Tokens()
OFFER = "passport-100-1y"
PRICE_MICROS = 1_000_000  # USD 1.00, TEST_CATALOG's price of OFFER
BUYER = "acct-buyer"
FROZEN_ACCOUNT = "acct-frozen"
DENY_FROZEN = quota_service_pb2.DENY_REASON_ACCOUNT_FROZEN
PENDING = billing_pb2.ORDER_STATE_PENDING
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED
REFUND = billing_pb2.BILL_LINE_KIND_REFUND
# A consumer asks its producer for the event types it uses, and its cursor ends at the last.
LAST_OF = "SELECT max(sequence) FROM outbox_events WHERE event_type = '%s'"


@pytest.fixture
async def postgres_urls():
    """Two fresh PostgreSQL databases (skips when PostgreSQL is unreachable)."""
    urls = [await create_postgres_database(), await create_postgres_database()]
    try:
        yield urls
    finally:
        for url in urls:
            await drop_postgres_database(url)


async def purchase(b: BillingCalls, request_id: str, within: float) -> billing_pb2.Order:
    return await b.stub.PurchasePackage(
        billing_service_pb2.PurchasePackageRequest(
            request_id=request_id, account_id=BUYER, offer_id=OFFER, region=REGION
        ),
        metadata=b.admin,
        timeout=within,
    )


async def order_states(b: BillingCalls, order_ids: list[str]) -> list[int]:
    out = []
    for order_id in order_ids:
        order = await b.stub.GetOrder(
            billing_service_pb2.GetOrderRequest(order_id=order_id),
            metadata=b.admin,
            timeout=CALL_TIMEOUT,
        )
        out.append(order.state)
    return out


async def test_billing_and_quota_cut_apart_complete_every_order_once(postgres_urls, tmp_path):
    quota_url, billing_url = postgres_urls
    billing_addr = f"127.0.0.1:{free_port()}"
    q_env = quota_env(
        quota_url,
        tmp_path,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=CLOCK_START,
        ALLOT_CONSUMER_LEASE_SECONDS="2",
        ALLOT_SHUTDOWN_GRACE_SECONDS="2",
    )
    with (
        tcp_proxy(q_env["ALLOT_QUOTA_ADDR"]) as to_quota,
        tcp_proxy(billing_addr) as to_billing,
    ):
        q_env["ALLOT_BILLING_ADDR"] = to_billing.addr
        b_env = billing_env(
            billing_url,
            tmp_path,
            to_quota.addr,
            CLOCK_START,
            ALLOT_BILLING_ADDR=billing_addr,
            ALLOT_CATALOG=str(write_catalog(tmp_path)),
        )
        with (
            quota_process(q_env, tmp_path / "quota.log") as quota,
            billing_process(b_env, tmp_path / "billing.log") as billing,
        ):
            async with (
                grpc.aio.insecure_channel(quota.addr) as q_channel,
                grpc.aio.insecure_channel(billing.addr) as b_channel,
            ):
                q = quota_calls(q_channel)
                b = BillingCalls(b_channel)
                for account in (BUYER, FROZEN_ACCOUNT):
                    await b.create_account(account)
                await b.top_up(BUYER, "10.00", request_id="top-up-buyer")
                await q.enable(FROZEN_ACCOUNT)
                await q.grant(FROZEN_ACCOUNT, 10)
                # Both paths in use before the cut: an order through, the stream followed.
                first = await purchase(b, "buy-0", CALL_TIMEOUT)
                assert first.state == FULFILLED
                assert (await q.check(FROZEN_ACCOUNT)).allowed

                to_quota.cut()
                to_billing.cut()
                cut_at = time.monotonic()
                during = await asyncio.gather(
                    *(purchase(b, f"buy-{i}", CUT_CALL_TIMEOUT) for i in (1, 2))
                )
                assert [o.state for o in during] == [PENDING, PENDING]
                async with billing_database(billing_url) as b_db:
                    await publish_standing(b_db, FROZEN_ACCOUNT, GRACE, DEBT_MICROS, GRACE_START)
                    await publish_standing(b_db, FROZEN_ACCOUNT, FROZEN, DEBT_MICROS, FROZEN_AT)
                # Billing retries pending orders every 2 s: still pending, paid, not refunded.
                await asyncio.sleep(2.5)
                ids = [o.order_id for o in during]
                assert await order_states(b, ids) == [PENDING, PENDING]
                assert (await q.check(FROZEN_ACCOUNT)).allowed  # quota has not heard yet
                print(f"\ncut for {time.monotonic() - cut_at:.1f} s")

                to_quota.heal()
                to_billing.heal()
                healed_at = time.monotonic()
                await until(
                    lambda: order_states(b, ids),
                    lambda states: states == [FULFILLED, FULFILLED],
                    RECOVERY,
                    "the orders of the cut fulfilled after the heal",
                )
                orders_after = time.monotonic() - healed_at
                await until(
                    lambda: q.check(FROZEN_ACCOUNT),
                    lambda r: r.deny_reason == DENY_FROZEN,
                    RECOVERY,
                    "FROZEN reaching quota after the heal",
                )
                standing_after = time.monotonic() - healed_at
                print(
                    f"after the heal: orders fulfilled in {orders_after:.1f} s, "
                    f"standing followed in {standing_after:.1f} s"
                )

                # One package per order at quota, one charge per order, no refund.
                packages = [await q.get(package_id) for package_id in await q.package_ids(BUYER)]
                assert sorted(p.order_id for p in packages) == sorted([first.order_id, *ids])
                assert all(p.total_quantity == 100 for p in packages)
                account = await b.get_account(BUYER)
                assert micros(account.balance) == 10_000_000 - 3 * PRICE_MICROS
                bill = await b.get_bill(BUYER, CLOCK_START[:7])
                assert [line for line in bill.lines if line.kind == REFUND] == []
                assert sorted(line.order_id for line in bill.lines if line.order_id) == sorted(
                    [first.order_id, *ids]
                )
                # Quota's cursor of billing's stream (standing changes only) at the last one.
                [(last,)] = await read_db(billing_url, LAST_OF % "account_standing_changed")
                await until(
                    lambda: read_db(
                        quota_url, "SELECT sequence FROM consumer_cursors WHERE stream = 'billing'"
                    ),
                    lambda cursor: cursor == [(last,)],
                    RECOVERY,
                    f"quota's cursor of billing's stream at {last}",
                )


# --- notification ↔ quota and billing -------------------------------------------------------

# A cut shorter than keepalive's 10 s: the connections that lived through it still look alive
# when healed, so this is the slowest recovery after heal() (each dead connection found by
# keepalive first).
SHORT_CUT = 3.0
ALERTED = ["acct-alert-0", "acct-alert-1", "acct-alert-2"]
OWING = "acct-owing"
# gRPC sends two keepalive pings on a connection that receives no data, then none unless told
# otherwise (`grpc.http2.max_pings_without_data`); pings every 5 s make that 10 s.
IDLE_BEFORE_CUT = 15.0
# After the last expected email, how long nothing more may arrive.
QUIET = 1.0


def address(account: str) -> str:
    return f"ops+{account}@example.com"


async def cross(q: QuotaCalls, account: str) -> None:
    """A 100-call package with a 20 % usage alert, and 80 calls: one crossing."""
    await q.grant(account, 100)
    await AlertCalls(q).create(account, api=API, percent=20)
    assert (await q.report(f"{account}-use", account, 80)).remaining_quantity == 20


async def test_notification_cut_from_quota_and_billing_resumes_and_sends_each_once(
    postgres_urls, tmp_path
):
    """Billing on SQLite (its stream is what is cut here, not its database)."""
    quota_url, notification_url = postgres_urls
    billing_url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    billing_addr = f"127.0.0.1:{free_port()}"
    q_env = quota_env(quota_url, tmp_path, ALLOT_CLOCK="manual", ALLOT_CLOCK_START=CLOCK_START)
    b_env = billing_env(
        billing_url,
        tmp_path,
        q_env["ALLOT_QUOTA_ADDR"],
        CLOCK_START,
        ALLOT_BILLING_ADDR=billing_addr,
    )
    with (
        smtp_receiver() as smtp,
        tcp_proxy(q_env["ALLOT_QUOTA_ADDR"]) as to_quota,
        tcp_proxy(billing_addr) as to_billing,
        quota_process(q_env, tmp_path / "quota.log") as quota,
        billing_process(b_env, tmp_path / "billing.log") as billing,
        notification_process(
            notification_env(
                notification_url,
                tmp_path,
                to_quota.addr,
                ALLOT_BILLING_ADDR=to_billing.addr,
                ALLOT_SMTP_URL=smtp.url(),
            ),
            tmp_path / "notification.log",
        ) as notification,
    ):
        started = time.monotonic()
        async with (
            grpc.aio.insecure_channel(quota.addr) as q_channel,
            grpc.aio.insecure_channel(billing.addr) as b_channel,
            grpc.aio.insecure_channel(notification.addr) as n_channel,
        ):
            q = quota_calls(q_channel)
            await BillingCalls(b_channel).create_account(OWING)
            n = NotificationCalls(n_channel)
            contacts = {
                account: (await n.create(account, EMAIL, address(account))).contact_id
                for account in ALERTED
            }
            contacts[OWING] = (await n.create(OWING, EMAIL, address(OWING), [ARREARS])).contact_id
            everyone = [*ALERTED, OWING]

            def mails(account: str) -> list:
                return [m for m in smtp.messages if address(account) in m.rcpt_tos]

            async def mail_counts() -> list[int]:
                return [len(mails(account)) for account in everyone]

            # Before the cut: one crossing through, notification's cursor moved past it.
            await cross(q, ALERTED[0])
            await until(mail_counts, lambda c: c == [1, 0, 0, 0], RECOVERY, "the first email")
            # Billing's stream has carried nothing since notification started: left idle past
            # the pings gRPC sends by default without data, it is the stream a consumer would
            # wait on for ever after a silent cut.
            await asyncio.sleep(max(0.0, started + IDLE_BEFORE_CUT - time.monotonic()))

            to_quota.cut()
            to_billing.cut()
            for account in ALERTED[1:]:
                await cross(q, account)
            async with billing_database(billing_url) as b_db:
                await publish_standing(b_db, OWING, GRACE, DEBT_MICROS, GRACE_START)
            await asyncio.sleep(SHORT_CUT)
            assert await mail_counts() == [1, 0, 0, 0]  # nothing reached notification

            to_quota.heal()
            to_billing.heal()
            healed_at = time.monotonic()
            await until(
                mail_counts,
                lambda c: c == [1, 1, 1, 1],
                RECOVERY,
                "an email for each crossing and the arrears of the cut after the heal",
            )
            print(
                f"\nafter a {SHORT_CUT} s cut: every email sent "
                f"{time.monotonic() - healed_at:.1f} s after the heal"
            )

            for account in everyone:
                [sent] = await n.settled(account, 1, within=RECOVERY)
                assert sent.message_type == (ARREARS if account == OWING else USAGE_ALERT)
                assert deliveries(sent) == {contacts[account]: (EMAIL, SENT, 1)}
                assert mails(account)[0].message["X-Allot-Notification-Id"] == sent.notification_id
            await asyncio.sleep(QUIET)  # a second email or notification would be there now
            assert await mail_counts() == [1, 1, 1, 1]
            for account in everyone:
                assert len(await n.notifications(account)) == 1

            # Notification's cursors at the last event of each stream it uses.
            [(last_crossing,)] = await read_db(quota_url, LAST_OF % "threshold_crossed")
            [(last_standing,)] = await read_db(billing_url, LAST_OF % "account_standing_changed")
            await until(
                lambda: read_db(
                    notification_url, "SELECT stream, sequence FROM consumer_cursors ORDER BY 1"
                ),
                lambda cursors: [c[1] for c in cursors] == [last_standing, last_crossing],
                RECOVERY,
                "notification's cursors at the last events",
            )


# --- a consumer gone behind a silent cut ------------------------------------------------------


async def stream_admitted(stub, metadata) -> bool:
    """Whether quota lets this caller open one more `WatchEvents` stream now (it answers the
    first event; a caller at ALLOT_MAX_STREAMS_PER_CALLER is refused RESOURCE_EXHAUSTED)."""
    call = stub.WatchEvents(
        quota_service_pb2.WatchEventsRequest(after_sequence=0), metadata=metadata, timeout=10
    )
    try:
        await call.read()
        return True
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        return False
    finally:
        call.cancel()


async def test_a_stream_whose_consumer_went_silent_is_ended_by_quota(tmp_path):
    """Quota on SQLite: its database plays no part. A consumer's network goes silent for good
    (the proxy is cut and never healed, the consumer's socket stays open): quota's keepalive
    finds the dead connection and ends its stream, so the stream does not hold one of the
    caller's ALLOT_MAX_STREAMS_PER_CALLER for ever — the consumer, dialling again from
    elsewhere, is admitted."""
    q_env = quota_env(
        f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}",
        tmp_path,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=CLOCK_START,
        ALLOT_MAX_STREAMS_PER_CALLER="1",
    )
    consumer = TOKENS.md(TOKENS.internal("billing"))
    with quota_process(q_env, tmp_path / "quota.log") as quota, tcp_proxy(quota.addr) as proxy:
        async with (
            grpc.aio.insecure_channel(quota.addr) as direct,
            grpc.aio.insecure_channel(proxy.addr) as through_proxy,
        ):
            await cross(quota_calls(direct), BUYER)  # an event to read
            stub = quota_service_pb2_grpc.QuotaServiceStub(direct)
            gone = quota_service_pb2_grpc.QuotaServiceStub(through_proxy).WatchEvents(
                quota_service_pb2.WatchEventsRequest(after_sequence=0), metadata=consumer
            )
            try:
                await asyncio.wait_for(gone.read(), CALL_TIMEOUT)
                assert not await stream_admitted(stub, consumer)  # the slot is taken

                proxy.cut()
                cut_at = time.monotonic()
                await until(
                    lambda: stream_admitted(stub, consumer),
                    bool,
                    RECOVERY,
                    "the silent consumer's stream ended by quota",
                )
                ended = time.monotonic() - cut_at
                print(f"\nquota ended the silent stream {ended:.1f} s after the cut")
            finally:
                gone.cancel()
