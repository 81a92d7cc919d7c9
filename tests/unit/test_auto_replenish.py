"""Auto-replenish's pure rules (services/billing/domain/replenish.py) and the message
notification makes of a purchase that bought nothing (docs/design/auto-replenish.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from allot.billing.v1 import billing_pb2

from services.billing.domain.replenish import (
    AutoReplenish,
    Crossing,
    Outcome,
    check_below_quantity,
    check_lifts,
    check_max_per_month,
    decide,
    next_month_start,
)
from services.notification.adapters.sources import BILLING_EVENT_TYPES, from_billing_event
from services.notification.domain.messages import MessageType, compose
from shared.errors import InvalidArgument
from shared.validity import month_key

TZ = ZoneInfo("Asia/Shanghai")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
SETTING = AutoReplenish(
    account_id="acme",
    region="ap-southeast-1",
    api="passport",
    offer_id="passport-100-1y",
    below_quantity=20,
    max_per_month=2,
    enabled=True,
    alert_id="alr_1",
    last_failure_reason="",
    rearm_time=None,
    create_time=T0,
    update_time=T0,
)
CROSSING = Crossing("evt-1", "alr_1", "acme", "ap-southeast-1", "passport", 20)


def test_a_crossing_of_the_settings_rule_at_or_below_the_threshold_buys():
    assert decide(SETTING, CROSSING, 0) == Outcome.BUY
    assert decide(SETTING, CROSSING, 1) == Outcome.BUY


def test_the_month_limit_stops_buying():
    assert decide(SETTING, CROSSING, 2) == Outcome.LIMIT_REACHED
    assert decide(SETTING, CROSSING, 3) == Outcome.LIMIT_REACHED


@pytest.mark.parametrize(
    "setting, crossing",
    [
        (None, CROSSING),
        (AutoReplenish(**{**SETTING.__dict__, "enabled": False}), CROSSING),
        (SETTING, Crossing("evt-1", "alr_customer", "acme", "ap-southeast-1", "passport", 20)),
        (SETTING, Crossing("evt-1", "alr_1", "other", "ap-southeast-1", "passport", 20)),
        (SETTING, Crossing("evt-1", "alr_1", "acme", "ap-southeast-1", "passport", 21)),
    ],
    ids=["no-setting", "disabled", "customer-rule", "other-account", "above-threshold"],
)
def test_other_crossings_buy_nothing(setting, crossing):
    assert decide(setting, crossing, 0) == Outcome.IGNORE


def test_checks_name_the_field():
    with pytest.raises(InvalidArgument) as raised:
        check_below_quantity(-1)
    assert raised.value.field == "below_quantity"
    for bad in (0, 101):
        with pytest.raises(InvalidArgument) as raised:
            check_max_per_month(bad)
        assert raised.value.field == "max_per_month"
    with pytest.raises(InvalidArgument) as raised:
        check_lifts(100, 100)  # one purchase would leave it at the threshold: buy again at once
    assert raised.value.field == "below_quantity"
    check_lifts(100, 99)
    assert check_max_per_month(100) == 100


def test_months_are_the_billing_time_zones():
    # 2024-01-31 16:00 UTC is 2024-02-01 00:00 in UTC+08:00.
    assert month_key(datetime(2024, 1, 31, 15, 59, 59, tzinfo=UTC), TZ) == "2024-01"
    assert month_key(datetime(2024, 1, 31, 16, tzinfo=UTC), TZ) == "2024-02"
    assert next_month_start(datetime(2024, 1, 10, tzinfo=UTC), TZ) == datetime(
        2024, 1, 31, 16, tzinfo=UTC
    )


def test_a_failed_auto_replenish_is_a_message_of_its_own_type():
    assert "auto_replenish_failed" in BILLING_EVENT_TYPES
    event = billing_pb2.BillingEvent(
        auto_replenish_failed=billing_pb2.AutoReplenishFailed(
            account_id="acme",
            region="ap-southeast-1",
            api="passport",
            offer_id="passport-100-1y",
            reason="INSUFFICIENT_BALANCE",
            crossing_event_id="evt-1",
            remaining_quantity=20,
            month_purchases=1,
            max_per_month=2,
        )
    )
    message = compose(from_billing_event(event))
    assert message.message_type == MessageType.AUTO_REPLENISH_FAILED
    assert message.account_id == "acme"
    assert "INSUFFICIENT_BALANCE" in message.body and "passport-100-1y" in message.body
    assert "20 calls" in message.body and "1 of 2" in message.body
    assert message.region == "ap-southeast-1"
