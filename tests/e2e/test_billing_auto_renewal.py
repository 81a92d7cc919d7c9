"""Auto-renewal end to end: quota, billing and notification as processes (SQLite, manual clocks
that the test moves together), a real SMTP server on loopback as the customer's inbox.

"acme" buys passport-1k-1y (deploy/catalog.yaml: 1000 calls for 12 months at 2.40 USD) with
`auto_renew` and exactly 2.40, so the package is valid to 2024-04-19 23:59:59 and the balance
is 0. A contact of acme is subscribed by email to MESSAGE_TYPE_AUTO_RENEW_FAILED only.

- 2024-04-12 02:59:59: no attempt yet (no event, no email).
- 2024-04-12 03:00 (7 days before the expiry date): the attempt fails, billing emits
  `auto_renew_failed` (INSUFFICIENT_BALANCE, next attempt 2024-04-13 03:00) and notification
  turns it into exactly one email naming the package and the reason; again on the 13th.
- A top-up of 2.40, then 2024-04-14 03:00: a FULFILLED AUTO_RENEWAL order; quota's package
  now expires 2025-04-19 23:59:59 with 2000 calls, the balance is 0, no third failure or email,
  and April's bill has a PACKAGE_RENEWAL line of -2.40 with lines adding up to closing minus
  opening balance.

"Notification has seen it all" is a positive barrier, never a guessed sleep: every event of
billing's that notification follows has become a notification (they share the event id).
Times are in the billing time zone (Asia/Shanghai, UTC+08:00). Every wait is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.notification.v1 import notification_pb2
from allot.testing.v1 import clock_service_pb2

from services.notification.adapters.sources import BILLING_EVENT_TYPES
from tests.support.billing import (
    BILLING_TZ,
    SETTLE_TIMEOUT,
    BillingCalls,
    billing_process,
    local,
    micros,
    paired_env,
)
from tests.support.calls import ts
from tests.support.notification import (
    EMAIL,
    SENT,
    NotificationCalls,
    deliveries,
    notification_env,
    notification_process,
    until,
)
from tests.support.quota import QuotaCalls, quota_calls, quota_process
from tests.support.receivers import SmtpInbox, smtp_receiver

TZ = BILLING_TZ
START = "2023-04-19T06:25:10Z"  # 2023-04-19 14:25:10 in the billing time zone
ACCOUNT = "acme"
ADDRESS = "billing+acme@example.com"
HK = "ap-southeast-1"
OFFER = "passport-1k-1y"
PRICE = 2_400_000  # 2.40 USD in micros

AUTO_RENEW_FAILED = notification_pb2.MESSAGE_TYPE_AUTO_RENEW_FAILED
PURCHASE = billing_pb2.ORDER_KIND_PURCHASE
AUTO_RENEWAL = billing_pb2.ORDER_KIND_AUTO_RENEWAL
FULFILLED = billing_pb2.ORDER_STATE_FULFILLED
RENEWAL_LINE = billing_pb2.BILL_LINE_KIND_PACKAGE_RENEWAL
TOP_UP_LINE = billing_pb2.BILL_LINE_KIND_TOP_UP


@dataclass
class Suite:
    quota: QuotaCalls
    billing: BillingCalls
    notification: NotificationCalls
    inbox: SmtpInbox

    async def move(self, at: datetime) -> None:
        """Every manual clock to `at`: quota's first (billing renews there), billing's last,
        so its due work (auto-renewal) runs against the others' new time before this
        returns."""
        await self.quota.set_time(at)
        await self.notification.clock.SetTime(
            clock_service_pb2.SetTimeRequest(time=ts(at)),
            metadata=self.notification.admin,
            timeout=SETTLE_TIMEOUT,
        )
        await self.billing.set_time(at)

    async def seen_by_notification(self) -> list[billing_pb2.BillingEvent]:
        """Billing's events of the kinds notification follows, once notification has made
        each of them into a notification of acme."""
        events = await self.billing.events(types=BILLING_EVENT_TYPES)
        wanted = {event.event_id for event in events}
        await until(
            lambda: self.notification.notifications(ACCOUNT),
            lambda found: wanted <= {n.source_event_id for n in found},
            what=f"notifications of billing's {len(wanted)} events",
        )
        return events

    async def failures(self) -> tuple[list, list[notification_pb2.Notification]]:
        """acme's auto_renew_failed events (oldest first) and the notifications made of them
        (newest first), once notification has seen all of billing's events."""
        events = [
            event
            for event in await self.seen_by_notification()
            if event.WhichOneof("payload") == "auto_renew_failed"
        ]
        return events, await self.notification.notifications(ACCOUNT, [AUTO_RENEW_FAILED])

    def mails(self) -> list:
        return [m for m in self.inbox.messages if ADDRESS in m.rcpt_tos]

    async def mails_arrived(self, count: int) -> list:
        """The inbox once acme's `count` auto-renewal notifications are settled, each email
        delivery SENT at its first attempt: the send completed (the inbox has it) before it was
        recorded, and no other attempt follows, so the inbox must hold exactly `count` emails
        now. A known position, not a quiet spell."""
        notified = await self.notification.settled(ACCOUNT, count, [AUTO_RENEW_FAILED])
        sent = [(d.channel, d.state, d.attempts) for n in notified for d in n.deliveries]
        assert sent == [(EMAIL, SENT, 1)] * count, notified
        found = self.mails()
        assert len(found) == count, [m.message["Subject"] for m in found]
        return found

    async def orders(self) -> list[billing_pb2.Order]:
        listing = await self.billing.stub.ListOrders(
            billing_service_pb2.ListOrdersRequest(account_id=ACCOUNT), metadata=self.billing.admin
        )
        return list(listing.orders)

    async def balance(self) -> int:
        return micros((await self.billing.get_account(ACCOUNT)).balance)


def check_failure(event, package_id: str, next_attempt: str) -> None:
    failure = event.auto_renew_failed
    assert (failure.account_id, failure.package_id) == (ACCOUNT, package_id)
    assert failure.reason == "INSUFFICIENT_BALANCE"
    assert failure.next_attempt_time.ToDatetime(tzinfo=TZ) == local(next_attempt)
    assert failure.expire_time.ToJsonString() == "2024-04-19T15:59:59Z"


def check_email(
    mail, notification: notification_pb2.Notification, package_id: str, next_attempt: str
) -> None:
    """The email is the notification's, sent to the contact, and names package, reason and
    the next attempt on the billing time zone's clock."""
    assert notification.message_type == AUTO_RENEW_FAILED
    assert len(notification.deliveries) == 1
    assert (notification.deliveries[0].channel, notification.deliveries[0].state) == (EMAIL, SENT)
    message = mail.message
    assert mail.rcpt_tos == [ADDRESS]
    assert message["X-Allot-Notification-Id"] == notification.notification_id
    subject, body = message["Subject"], message.get_content()
    assert subject == notification.subject
    assert package_id in subject
    assert package_id in body and "INSUFFICIENT_BALANCE" in body
    assert ACCOUNT in body
    assert f"Next attempt {next_attempt}:00+08:00" in body


async def test_auto_renewal_fails_twice_by_email_then_renews_after_a_top_up(tmp_path):
    q_env, b_env = paired_env(tmp_path, START)
    n_data = tmp_path / "notification"
    n_data.mkdir()
    with (
        smtp_receiver() as inbox,
        quota_process(q_env, tmp_path / "quota.log") as quota_proc,
    ):
        b_env["ALLOT_QUOTA_ADDR"] = quota_proc.addr
        n_env = notification_env(
            f"sqlite+aiosqlite:///{n_data / 'notification.db'}",
            n_data,
            quota_proc.addr,
            ALLOT_BILLING_ADDR=b_env["ALLOT_BILLING_ADDR"],
            ALLOT_CLOCK_START=START,
            ALLOT_SMTP_URL=inbox.url(),
        )
        with (
            billing_process(b_env, tmp_path / "billing.log") as billing_proc,
            notification_process(n_env, n_data / "notification.log") as notification_proc,
        ):
            async with (
                grpc.aio.insecure_channel(quota_proc.addr) as qc,
                grpc.aio.insecure_channel(billing_proc.addr) as bc,
                grpc.aio.insecure_channel(notification_proc.addr) as nc,
            ):
                suite = Suite(quota_calls(qc), BillingCalls(bc), NotificationCalls(nc), inbox)
                await walk_through_the_renewal(suite)


async def walk_through_the_renewal(suite: Suite) -> None:
    billing, notification = suite.billing, suite.notification
    contact = await notification.create(ACCOUNT, EMAIL, ADDRESS, [AUTO_RENEW_FAILED])

    # Exactly the price, bought with auto-renewal: nothing left for the renewal.
    await billing.create_account(ACCOUNT)
    await billing.top_up(ACCOUNT, "2.40", request_id="fund-1")
    placed = await billing.stub.PurchasePackage(
        billing_service_pb2.PurchasePackageRequest(
            request_id="buy", account_id=ACCOUNT, offer_id=OFFER, region=HK, auto_renew=True
        ),
        metadata=billing.admin,
    )
    bought = await until(
        lambda: billing.stub.GetOrder(
            billing_service_pb2.GetOrderRequest(order_id=placed.order_id), metadata=billing.admin
        ),
        lambda o: o.state == FULFILLED,
        what="the purchase fulfilled",
    )
    package_id = bought.package_id
    assert (bought.kind, bought.quantity, micros(bought.amount)) == (PURCHASE, 1000, PRICE)
    assert bought.expire_time.ToJsonString() == "2024-04-19T15:59:59Z"  # 23:59:59 +08:00
    package = await suite.quota.get(package_id)
    assert (package.total_quantity, package.expire_time.ToJsonString()) == (
        1000,
        "2024-04-19T15:59:59Z",
    )
    assert await suite.balance() == 0
    # Notification follows billing: the purchase's order events became notifications (of a
    # type the contact does not want, so no email).
    await suite.seen_by_notification()

    # One second before the first attempt: nothing.
    await suite.move(local("2024-04-12 02:59:59"))
    events, notified = await suite.failures()
    assert (events, notified) == ([], [])
    assert suite.mails() == []

    # 03:00, 7 days before the expiry date: the balance is short.
    await suite.move(local("2024-04-12 03:00"))
    [first_mail] = await suite.mails_arrived(1)
    events, notified = await suite.failures()
    [first] = events
    check_failure(first, package_id, "2024-04-13 03:00")
    [first_notice] = await notification.settled(ACCOUNT, 1, [AUTO_RENEW_FAILED])
    assert [n.source_event_id for n in notified] == [first.event_id]
    assert deliveries(first_notice) == {contact.contact_id: (EMAIL, SENT, 1)}
    check_email(first_mail, first_notice, package_id, "2024-04-13 03:00")

    # The next day at 03:00: still short, a second failure and a second email.
    await suite.move(local("2024-04-13 03:00"))
    second_mail = (await suite.mails_arrived(2))[-1]
    events, _ = await suite.failures()
    assert [e.event_id for e in events[:1]] == [first.event_id]
    [second] = events[1:]
    check_failure(second, package_id, "2024-04-14 03:00")
    notified = await notification.settled(ACCOUNT, 2, [AUTO_RENEW_FAILED])
    assert [n.source_event_id for n in notified] == [second.event_id, first.event_id]
    check_email(second_mail, notified[0], package_id, "2024-04-14 03:00")

    # Topped up, the third attempt renews by one period from the original expiry.
    await billing.top_up(ACCOUNT, "2.40", request_id="fund-2")
    await suite.move(local("2024-04-14 03:00"))
    renewal = await until(
        suite.orders,
        lambda found: any(o.kind == AUTO_RENEWAL and o.state == FULFILLED for o in found),
        what="a fulfilled auto-renewal",
    )
    [renewal] = [o for o in renewal if o.kind == AUTO_RENEWAL]
    assert (renewal.package_id, renewal.quantity, renewal.periods) == (package_id, 1000, 1)
    assert micros(renewal.amount) == PRICE
    assert renewal.expire_time.ToJsonString() == "2025-04-19T15:59:59Z"
    package = await suite.quota.get(package_id)
    assert package.expire_time.ToJsonString() == "2025-04-19T15:59:59Z"  # 23:59:59 +08:00
    assert package.total_quantity == 2000
    assert await suite.balance() == 0

    # The renewal's order events reached notification, and no third failure came with them.
    events, notified = await suite.failures()
    assert [e.event_id for e in events] == [first.event_id, second.event_id]
    assert len(notified) == 2
    assert len(await suite.mails_arrived(2)) == 2

    bill = await billing.get_bill(ACCOUNT, "2024-04")
    assert [(line.kind, micros(line.amount)) for line in bill.lines] == [
        (TOP_UP_LINE, PRICE),
        (RENEWAL_LINE, -PRICE),
    ]
    renewal_line = bill.lines[1]
    assert renewal_line.order_id == renewal.order_id
    assert (renewal_line.region, renewal_line.api, renewal_line.quantity) == (HK, "passport", 1000)
    assert renewal_line.occur_time.ToDatetime(tzinfo=TZ) == local("2024-04-14 03:00")
    assert sum(micros(line.amount) for line in bill.lines) == micros(bill.closing_balance) - micros(
        bill.opening_balance
    )
    assert (micros(bill.opening_balance), micros(bill.closing_balance)) == (0, 0)
