"""Notification end to end (docs/design/notification.md): quota and notification as processes, a
real SMTP server (aiosmtpd) and real HTTP receivers on loopback that verify `Allot-Signature`.

One quota process and one notification process (SQLite, manual clocks at CLOCK_START, email
over SMTP to the module's inbox, retries after 10 s × 2^n, three attempts) serve the module;
every test has its own account, addresses and receivers. A crossing is a 20 % usage alert on a
100-call package reaching 20 calls left. Retries come due only when notification's manual clock
is advanced, and `AdvanceTime` runs them before it returns. "Nothing more arrived" is checked
after a barrier (`barrier`: another account's crossing, consumed after ours, and the due work
run), never after a quiet pause. One test repeats the main path with notification on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import grpc
import pytest
from allot.quota.v1 import quota_pb2

from tests.support.calls import expect_error
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.events import THRESHOLD_CROSSED, AlertCalls, events
from tests.support.notification import (
    ARREARS,
    CLOCK_START,
    EMAIL,
    FAILED,
    PENDING,
    SENT,
    TEST,
    USAGE_ALERT,
    WEBHOOK,
    NotificationCalls,
    deliveries,
    notification_env,
    notification_process,
    until,
)
from tests.support.quota import API, REGION, QuotaCalls, quota_calls, quota_env, quota_process
from tests.support.receivers import HttpReceiver, SmtpInbox, http_receiver, smtp_receiver

MAX_ATTEMPTS = 3
BACKOFF_SECONDS = 10
# Past the longest first backoff (10 s + 20 % jitter), and the second (20 s + 20 %).
PAST_BACKOFF = timedelta(seconds=60)
# After the last expected message, how long nothing more may arrive.
# No contract states how soon a notification is pushed: this tells a live stream from one that
# is not, with room for a loaded 2-core machine.
WATCH_WITHIN = 10.0

DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def smtp():
    with smtp_receiver() as inbox:
        yield inbox


@pytest.fixture(scope="module")
def quota_addr(tmp_path_factory):
    data = tmp_path_factory.mktemp("quota")
    env = quota_env(
        f"sqlite+aiosqlite:///{data / 'quota.db'}",
        data,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=CLOCK_START,
    )
    with quota_process(env, data / "quota.log") as process:
        yield process.addr


def delivery_settings(smtp: SmtpInbox) -> dict[str, str]:
    return {
        "ALLOT_SMTP_URL": smtp.url(),
        "ALLOT_DELIVERY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "ALLOT_DELIVERY_BACKOFF_SECONDS": str(BACKOFF_SECONDS),
        "ALLOT_DELIVERY_BACKOFF_FACTOR": "2",
    }


@pytest.fixture(scope="module")
def notification_addr(quota_addr, smtp, tmp_path_factory):
    data = tmp_path_factory.mktemp("notification")
    env = notification_env(
        f"sqlite+aiosqlite:///{data / 'notification.db'}",
        data,
        quota_addr,
        **delivery_settings(smtp),
    )
    with notification_process(env, data / "notification.log") as process:
        yield process.addr


@pytest.fixture
async def q(quota_addr) -> QuotaCalls:
    async with grpc.aio.insecure_channel(quota_addr) as channel:
        yield quota_calls(channel)


@pytest.fixture
async def n(notification_addr) -> NotificationCalls:
    async with grpc.aio.insecure_channel(notification_addr) as channel:
        yield NotificationCalls(channel)


async def arm(q: QuotaCalls, account: str) -> quota_pb2.UsageAlert:
    """A 100-call package and a 20 % usage alert on it (armed: 100 of 100 left)."""
    await q.grant(account, 100)
    rule = await AlertCalls(q).create(account, api=API, percent=20)
    assert rule.state == quota_pb2.USAGE_ALERT_STATE_ARMED
    return rule


async def cross(q: QuotaCalls, account: str) -> None:
    """Use 80 of the 100 calls in two reports: the second leaves 20 (20 %), one crossing."""
    assert (await q.report(f"{account}-use-1", account, 79)).remaining_quantity == 21
    assert (await q.report(f"{account}-use-2", account, 1)).remaining_quantity == 20


async def crossing_events(q: QuotaCalls, account: str, at_least: int = 1) -> list:
    """The account's threshold_crossed events in quota's stream (the QuotaEvent envelopes)."""
    found = await events(q.stub, q.admin, 0, [THRESHOLD_CROSSED], at_least=0)
    deadline = time.monotonic() + 15
    while True:
        mine = [e for e in found if e.threshold_crossed.account_id == account]
        if len(mine) >= at_least or time.monotonic() > deadline:
            return mine
        await asyncio.sleep(0.1)
        found = await events(q.stub, q.admin, 0, [THRESHOLD_CROSSED])


async def barrier(n: NotificationCalls, q: QuotaCalls, smtp: SmtpInbox, tag: str) -> None:
    """Notification has done all it will do for what happened so far: a crossing of a fresh
    account, made now, has been consumed (quota's events are consumed in order, so every
    notification of an earlier event exists by then) and its email has arrived, and every due
    delivery has run (AdvanceTime returns after them). What has not arrived by then is not
    coming: a negative check reads up to this point instead of waiting for quiet."""
    account = f"barrier-{tag}"
    address = f"barrier+{account}@example.com"
    await n.create(account, EMAIL, address, [USAGE_ALERT])
    await arm(q, account)
    await cross(q, account)
    await wait_mails(smtp, address, 1)
    await n.settled(account, 1)
    await n.advance(timedelta(0))


def mails_to(smtp: SmtpInbox, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


async def wait_mails(smtp: SmtpInbox, address: str, count: int) -> list:
    async def read():
        return mails_to(smtp, address)

    return await until(read, lambda found: len(found) >= count, what=f"{count} mail to {address}")


async def one_crossing_reaches_email_and_webhook(
    n: NotificationCalls, q: QuotaCalls, smtp: SmtpInbox, account: str
) -> None:
    """The main path: one crossing, one email, one signed webhook POST, two SENT deliveries."""
    address = f"ops+{account}@example.com"
    with http_receiver() as hook:
        mail_contact = await n.create(account, EMAIL, address, [USAGE_ALERT])
        hook_contact = await n.create(account, WEBHOOK, hook.url(), [USAGE_ALERT])
        assert mail_contact.webhook_secret == ""
        assert hook_contact.webhook_secret.startswith("whsec_")
        hook.secret = hook_contact.webhook_secret
        rule = await arm(q, account)

        await cross(q, account)

        [mail] = await wait_mails(smtp, address, 1)
        [request] = await hook.wait_for(1)
        await n.settled(account, 1)
        await barrier(n, q, smtp, account)  # a second email, POST or notification is here now
        [notification] = await n.notifications(account)
        assert len(mails_to(smtp, address)) == 1
        assert len(hook.requests) == 1

    [event] = await crossing_events(q, account)
    assert notification.account_id == account
    assert notification.message_type == USAGE_ALERT
    assert notification.source_event_id == event.event_id
    assert deliveries(notification) == {
        mail_contact.contact_id: (EMAIL, SENT, 1),
        hook_contact.contact_id: (WEBHOOK, SENT, 1),
    }
    assert all(d.last_error == "" and d.HasField("deliver_time") for d in notification.deliveries)

    # The email: what, where, how much of how much, which threshold.
    message = mail.message
    assert mail.rcpt_tos == [address]
    assert message["To"] == address
    assert message["X-Allot-Notification-Id"] == notification.notification_id
    subject, body = message["Subject"], message.get_content()
    assert subject == notification.subject
    for text in (subject, body):
        assert API in text and REGION in text
        assert "20 calls" in text
    assert account in body
    assert "20 calls left of 100" in body
    assert "20%" in body
    assert rule.alert_id in body

    # The webhook: signed with the contact's secret, keyed by the notification id.
    assert request.signature_valid is True
    assert request.status == 200
    assert request.headers["allot-notification-id"] == notification.notification_id
    assert request.headers["content-type"] == "application/json"
    document = request.json()
    assert document["notification_id"] == notification.notification_id
    assert document["account_id"] == account
    assert (document["subject"], document["body"]) == (notification.subject, notification.body)
    assert document["data"] == {
        "alert_id": rule.alert_id,
        "region": REGION,
        "api": API,
        "remaining_quantity": 20,
        "total_quantity": 100,
        "threshold": "20%",
    }


async def test_a_crossing_sends_one_email_and_one_signed_webhook(n, q, smtp):
    await one_crossing_reaches_email_and_webhook(n, q, smtp, "acct-main")


async def test_a_contact_for_arrears_only_gets_nothing_for_usage_alerts(n, q, smtp):
    account = "acct-arrears"
    arrears_address = f"arrears+{account}@example.com"
    with http_receiver() as alerts, http_receiver() as arrears:
        alert_contact = await n.create(account, WEBHOOK, alerts.url(), [USAGE_ALERT])
        arrears_hook = await n.create(account, WEBHOOK, arrears.url(), [ARREARS])
        arrears_mail = await n.create(account, EMAIL, arrears_address, [ARREARS])
        await arm(q, account)

        await cross(q, account)

        await alerts.wait_for(1)
        await n.settled(account, 1)
        await barrier(n, q, smtp, account)
        [notification] = await n.notifications(account)
        assert arrears.requests == [] and len(alerts.requests) == 1
    assert mails_to(smtp, arrears_address) == []
    assert deliveries(notification) == {alert_contact.contact_id: (WEBHOOK, SENT, 1)}
    for contact_id in (arrears_hook.contact_id, arrears_mail.contact_id):
        assert contact_id not in deliveries(notification)


async def test_a_forfeiture_forecast_crossing_sends_one_email_and_webhook(n, q, smtp):
    """docs/design/forecasts.md: a rule on "more than N calls forfeited" fires when created if
    the forecast already says so (no usage: the whole package is forfeited at its expiry)."""
    account = "acct-forfeit"
    address = f"ops+{account}@example.com"
    with http_receiver() as hook:
        await n.create(account, EMAIL, address, [USAGE_ALERT])
        await webhook_contact(n, account, hook)
        package = await q.grant(account, 1_000, expire="2024-06-30T15:59:59Z")
        rule = await AlertCalls(q).create(account, api=API, forfeiture=500)
        assert rule.state == quota_pb2.USAGE_ALERT_STATE_FIRED

        [mail] = await wait_mails(smtp, address, 1)
        [request] = await hook.wait_for(1)
        await n.settled(account, 1)
        await barrier(n, q, smtp, account)
        assert len(mails_to(smtp, address)) == 1 and len(hook.requests) == 1
        [notification] = await n.notifications(account)

    [event] = await crossing_events(q, account)
    assert event.threshold_crossed.condition == quota_pb2.ALERT_CONDITION_FORFEITURE_ABOVE_QUANTITY
    assert notification.source_event_id == event.event_id
    assert notification.message_type == USAGE_ALERT
    body = mail.message.get_content()
    # 2024-06-30 15:59:59 UTC on the billing time zone's clock (UTC+08:00).
    assert "1,000 calls will be forfeited at 2024-06-30 23:59:59+08:00" in body
    assert package.package_id in body and rule.alert_id in body
    assert "1,000 calls of passport" in mail.message["Subject"]
    data = request.json()["data"]
    assert (data["package_id"], data["forfeited_quantity"]) == (package.package_id, 1_000)
    assert (data["forfeiture_above_quantity"], data["daily_rate"]) == (500, "0")


async def webhook_contact(n: NotificationCalls, account: str, hook: HttpReceiver) -> str:
    created = await n.create(account, WEBHOOK, hook.url(), [USAGE_ALERT])
    hook.secret = created.webhook_secret
    return created.contact_id


async def one_delivery(n: NotificationCalls, account: str, attempts: int, state: int = PENDING):
    """The account's single notification once its single delivery made `attempts` attempts."""
    [notification] = await n.settled(
        account, 1, done=lambda d: d.attempts >= attempts and d.state == state
    )
    [delivery] = notification.deliveries
    return notification, delivery


async def test_a_webhook_answering_500_twice_then_200_gets_three_attempts(n, q):
    account = "acct-retry"
    with http_receiver(statuses=(500, 500, 200)) as hook:
        contact_id = await webhook_contact(n, account, hook)
        await arm(q, account)
        await cross(q, account)

        notification, delivery = await one_delivery(n, account, 1)
        assert delivery.contact_id == contact_id
        assert "500" in delivery.last_error
        assert [r.status for r in hook.requests] == [500]

        # Not due yet: the first retry waits about 10 s of notification's clock.
        await n.advance(timedelta(seconds=1))
        assert len(hook.requests) == 1

        await n.advance(PAST_BACKOFF)  # runs the due retry before it returns
        [after_second] = await n.notifications(account)
        assert deliveries(after_second) == {contact_id: (WEBHOOK, PENDING, 2)}
        assert [r.status for r in hook.requests] == [500, 500]

        await n.advance(PAST_BACKOFF)
        [sent] = await n.notifications(account)
        assert deliveries(sent) == {contact_id: (WEBHOOK, SENT, 3)}
        assert sent.deliveries[0].last_error == ""

        # Nothing is sent after SENT: the due work up to two days on has run when this returns.
        await n.advance(timedelta(days=2))
        requests = hook.requests
    assert [r.status for r in requests] == [500, 500, 200]
    assert all(r.signature_valid for r in requests)
    assert {r.headers["allot-notification-id"] for r in requests} == {notification.notification_id}


async def test_a_webhook_that_always_fails_ends_failed_and_retry_delivery_sends_it_again(n, q):
    account = "acct-failing"
    # Three failures use up the attempts; the fourth request (RetryDelivery's) gets 200.
    with http_receiver(statuses=(500, 500, 500, 200)) as hook:
        contact_id = await webhook_contact(n, account, hook)
        await arm(q, account)
        await cross(q, account)

        notification, _ = await one_delivery(n, account, 1)
        await n.advance(PAST_BACKOFF)
        await n.advance(PAST_BACKOFF)
        [failed] = await n.notifications(account)
        assert deliveries(failed) == {contact_id: (WEBHOOK, FAILED, MAX_ATTEMPTS)}
        assert "HTTP 500" in failed.deliveries[0].last_error
        await n.advance(timedelta(days=2))  # FAILED stays failed
        assert len(hook.requests) == MAX_ATTEMPTS

        # Only the owner (or an operator) may retry, and only a delivery that exists.
        other = n.account("acct-someone-else")
        await expect_error(
            n.retry(notification.notification_id, contact_id, other), DENIED, "PERMISSION_DENIED"
        )
        await expect_error(
            n.retry(notification.notification_id, "cnt-missing"), NOT_FOUND, "DELIVERY_NOT_FOUND"
        )
        assert len(hook.requests) == MAX_ATTEMPTS

        retried = await n.retry(notification.notification_id, contact_id, n.account(account))
        assert retried.notification_id == notification.notification_id
        assert deliveries(retried)[contact_id][:2] == (WEBHOOK, PENDING)

        _, delivery = await one_delivery(n, account, 1, SENT)
        assert (delivery.state, delivery.attempts, delivery.last_error) == (SENT, 1, "")
        await n.advance(timedelta(days=2))  # anything still due has run when this returns
        requests = hook.requests
    assert [r.status for r in requests] == [500, 500, 500, 200]
    assert all(r.signature_valid for r in requests)


async def test_watch_notifications_pushes_the_crossing_live(n, q):
    account = "acct-watch"
    mail = await n.create(account, EMAIL, f"watch+{account}@example.com", [USAGE_ALERT])
    await arm(q, account)
    # Another account's stream is not ours to read.
    foreign = n.watch("acct-other", n.account(account, read_only=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(foreign.read(), 10)
    assert caught.value.code() == DENIED

    stream = n.watch(account, n.account(account, read_only=True))
    try:
        # The stream is live once a test notification sent now comes through it.
        live = False
        for _ in range(20):
            await n.send_test(mail.contact_id, n.account(account))
            try:
                got = await asyncio.wait_for(stream.read(), 1.0)
            except TimeoutError:
                continue
            assert got.message_type == TEST
            live = True
            break
        assert live, "WatchNotifications never delivered a test notification"

        started = time.monotonic()
        await q.report(f"{account}-use", account, 80)  # 20 of 100 left: the crossing
        while True:
            left = started + WATCH_WITHIN + 20 - time.monotonic()
            got = await asyncio.wait_for(stream.read(), max(left, 0.01))
            if got.message_type != TEST:  # a late probe may still be on its way
                break
        elapsed = time.monotonic() - started
    finally:
        stream.cancel()
    assert got.message_type == USAGE_ALERT
    assert got.account_id == account
    assert got.source_event_id
    assert [d.contact_id for d in got.deliveries] == [mail.contact_id]
    assert elapsed <= WATCH_WITHIN, f"the notification came {elapsed:.3f} s after the crossing"


async def test_the_main_path_with_notification_on_postgresql(q, quota_addr, smtp, tmp_path):
    url = await create_postgres_database()
    try:
        env = notification_env(url, tmp_path, quota_addr)
        env.update(delivery_settings(smtp))
        with notification_process(env, tmp_path / "notification.log") as process:
            async with grpc.aio.insecure_channel(process.addr) as channel:
                await one_crossing_reaches_email_and_webhook(
                    NotificationCalls(channel), q, smtp, "acct-postgres"
                )
    finally:
        await drop_postgres_database(url)
