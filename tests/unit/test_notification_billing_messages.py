"""Billing's events become notifications that say what happened and what it means."""

from zoneinfo import ZoneInfo

from allot.billing.v1 import billing_pb2
from google.type import money_pb2

from services.notification.adapters.sources import from_billing_event
from services.notification.domain.messages import MessageType, compose


def usd(units: int, nanos: int = 0) -> money_pb2.Money:
    return money_pb2.Money(currency_code="USD", units=units, nanos=nanos)


def test_grace_names_the_standing_and_its_deadlines():
    event = billing_pb2.BillingEvent(
        event_id="e1",
        account_standing_changed=billing_pb2.AccountStandingChanged(
            account_id="acme",
            previous_standing=billing_pb2.ACCOUNT_STANDING_GOOD,
            standing=billing_pb2.ACCOUNT_STANDING_GRACE,
            balance=usd(-12, -500_000_000),
            grace_end_time={"seconds": 1715828400},  # 2024-05-16T03:00:00Z
            retention_end_time={"seconds": 1717124400},  # 2024-05-31T03:00:00Z
        ),
    )
    message = compose(from_billing_event(event), ZoneInfo("Asia/Shanghai"))
    assert message.message_type == MessageType.ARREARS
    assert message.account_id == "acme"
    assert "grace" in message.subject
    assert "-12.50 USD" in message.body
    assert "Top up by 2024-05-16 11:00:00+08:00" in message.body
    assert "released at 2024-05-31 11:00:00+08:00" in message.body
    assert message.data["standing"] == "GRACE"


def test_balance_order_and_auto_renewal_messages():
    balance = billing_pb2.BillingEvent(
        balance_below_threshold=billing_pb2.BalanceBelowThreshold(
            account_id="acme", balance=usd(4, 990_000_000), threshold=usd(5)
        )
    )
    message = compose(from_billing_event(balance))
    assert message.message_type == MessageType.BALANCE_ALERT
    assert "4.99 USD" in message.body and "5.00 USD" in message.body

    order = billing_pb2.BillingEvent(
        order_updated=billing_pb2.OrderUpdated(
            order=billing_pb2.Order(
                order_id="ord-1",
                account_id="acme",
                state=billing_pb2.ORDER_STATE_FULFILLED,
                offer_id="passport-100k-1y",
                region="ap-southeast-1",
                api="passport",
                amount=usd(180),
            )
        )
    )
    message = compose(from_billing_event(order))
    assert message.message_type == MessageType.ORDER
    assert "FULFILLED" in message.body and "180.00 USD" in message.body

    failed = billing_pb2.BillingEvent(
        auto_renew_failed=billing_pb2.AutoRenewFailed(
            account_id="acme",
            package_id="pkg-1",
            reason="INSUFFICIENT_BALANCE",
            region="ap-southeast-1",
        )
    )
    message = compose(from_billing_event(failed))
    assert message.message_type == MessageType.AUTO_RENEW_FAILED
    assert "pkg-1" in message.subject and "INSUFFICIENT_BALANCE" in message.body
    assert "pkg-1 in ap-southeast-1 failed" in message.body
    # Its region decides who sees it (ListNotifications, WatchNotifications of a region token).
    assert message.region == "ap-southeast-1"


def test_other_billing_events_are_not_messages():
    assert from_billing_event(billing_pb2.BillingEvent()) is None


def test_times_read_on_the_billing_time_zone_clock_and_stay_exact_in_the_data():
    failed = billing_pb2.BillingEvent(
        auto_renew_failed=billing_pb2.AutoRenewFailed(
            account_id="acme",
            package_id="pkg-1",
            reason="INSUFFICIENT_BALANCE",
            next_attempt_time={"seconds": 1712948400},  # 2024-04-12T19:00:00Z
            expire_time={"seconds": 1713542399},  # 2024-04-19T15:59:59Z
        )
    )
    message = compose(from_billing_event(failed), ZoneInfo("Asia/Shanghai"))
    assert "Next attempt 2024-04-13 03:00:00+08:00" in message.body
    assert "expires at 2024-04-19 23:59:59+08:00" in message.body
    assert message.data["next_attempt_time"] == "2024-04-12T19:00:00+00:00"
