"""Notification's domain without I/O: the enums against the protos, the retry schedule
(exponential backoff with ±20 % jitter, bounded attempts, at most a day per wait), what each
source event becomes (quota event -> domain event -> message with subject, body and data)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from allot.notification.v1 import notification_pb2
from allot.quota.v1 import quota_pb2
from google.protobuf import timestamp_pb2

from services.notification.adapters.sources import QUOTA_EVENT_TYPES, from_quota_event
from services.notification.domain import delivery
from services.notification.domain.delivery import JITTER, MAX_DELAY, RetryPolicy
from services.notification.domain.messages import (
    Channel,
    ForecastAlertFired,
    MessageType,
    PackageExhausted,
    PackageExpiring,
    UsageAlertFired,
    compose,
    sample_message,
)

NOW = datetime(2024, 1, 1, tzinfo=UTC)
EXPIRE = datetime(2024, 3, 31, 16, 0, tzinfo=UTC)


# --- enums -------------------------------------------------------------------------------


def test_domain_enums_are_the_proto_enums():
    assert {m.name: int(m) for m in MessageType} == {
        name.removeprefix("MESSAGE_TYPE_"): value
        for name, value in notification_pb2.MessageType.items()
        if value
    }
    assert {c.name: int(c) for c in Channel} == {
        name.removeprefix("CHANNEL_"): value
        for name, value in notification_pb2.Channel.items()
        if value
    }
    assert (delivery.PENDING, delivery.SENT, delivery.FAILED) == (
        notification_pb2.DELIVERY_STATE_PENDING,
        notification_pb2.DELIVERY_STATE_SENT,
        notification_pb2.DELIVERY_STATE_FAILED,
    )


# --- retry schedule ----------------------------------------------------------------------


def nominal(policy: RetryPolicy, attempts: int) -> timedelta:
    return min(policy.first_delay * policy.factor ** (attempts - 1), MAX_DELAY)


@pytest.mark.parametrize("seed", range(20))
def test_each_wait_is_the_backoff_within_the_jitter(seed):
    policy = RetryPolicy()
    rng = random.Random(seed)
    for attempts in range(1, policy.max_attempts):
        wait = policy.next_attempt(attempts, NOW, rng) - NOW
        base = nominal(policy, attempts)
        assert base * (1 - JITTER) <= wait <= base * (1 + JITTER), (attempts, wait)


def test_the_default_waits_grow_by_the_factor_up_to_a_day():
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.first_delay, policy.factor) == (
        8,
        timedelta(seconds=60),
        3,
    )
    minutes = [nominal(policy, a) / timedelta(minutes=1) for a in range(1, policy.max_attempts)]
    assert minutes == [1, 3, 9, 27, 81, 243, 729]


def test_no_attempt_after_the_last():
    policy = RetryPolicy(max_attempts=3, first_delay=timedelta(seconds=10), factor=2)
    assert policy.next_attempt(1, NOW) is not None
    assert policy.next_attempt(2, NOW) is not None
    assert policy.next_attempt(3, NOW) is None
    assert policy.next_attempt(4, NOW) is None
    assert RetryPolicy(max_attempts=1).next_attempt(1, NOW) is None


def test_no_wait_is_longer_than_a_day_and_a_fifth_whatever_the_factor():
    policy = RetryPolicy(max_attempts=12, first_delay=timedelta(hours=1), factor=10)
    rng = random.Random(7)
    for attempts in range(1, 12):
        assert policy.next_attempt(attempts, NOW, rng) - NOW <= MAX_DELAY * (1 + JITTER)


def test_many_attempts_keep_waiting_a_day_each():
    policy = RetryPolicy(max_attempts=30)
    for attempts in range(1, 30):
        wait = policy.next_attempt(attempts, NOW, random.Random(attempts)) - NOW
        assert wait <= MAX_DELAY * (1 + JITTER)


def test_jitter_spreads_receivers_apart():
    policy = RetryPolicy()
    rng = random.Random(1)
    waits = {policy.next_attempt(1, NOW, rng) for _ in range(50)}
    assert len(waits) > 40


def test_a_receivers_retry_after_is_respected_up_to_the_cap():
    policy = RetryPolicy()  # the first retry would come after about 60 s
    rng = random.Random(7)
    assert policy.next_attempt(1, NOW, rng, retry_after=3600) - NOW == timedelta(hours=1)
    # A shorter Retry-After does not make the backoff shorter.
    assert policy.next_attempt(1, NOW, rng, retry_after=5) - NOW >= timedelta(seconds=48)
    assert policy.next_attempt(1, NOW, rng, retry_after=10**9) - NOW == MAX_DELAY
    # It does not buy attempts beyond the last.
    assert policy.next_attempt(policy.max_attempts, NOW, rng, retry_after=60) is None


def test_the_default_schedule_gives_up_within_about_a_day():
    policy = RetryPolicy()
    total = sum((nominal(policy, a) for a in range(1, policy.max_attempts)), timedelta())
    assert total <= timedelta(hours=24)


# --- quota events -> domain events -------------------------------------------------------


def stamp(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def crossed(**threshold) -> quota_pb2.QuotaEvent:
    return quota_pb2.QuotaEvent(
        sequence=5,
        event_id="evt-1",
        threshold_crossed=quota_pb2.ThresholdCrossed(
            alert_id="alr-1",
            account_id="acct-1",
            region="ap-southeast-1",
            api="passport",
            remaining_quantity=20_000,
            total_quantity=100_000,
            **threshold,
        ),
    )


def package(state: int) -> quota_pb2.Package:
    return quota_pb2.Package(
        package_id="pkg-1",
        account_id="acct-1",
        region="ap-southeast-1",
        api="passport",
        total_quantity=10_000,
        remaining_quantity=1_500,
        state=state,
        expire_time=stamp(EXPIRE),
    )


def test_the_consumed_event_types_are_quota_event_payloads():
    payloads = {f.name for f in quota_pb2.QuotaEvent.DESCRIPTOR.oneofs_by_name["payload"].fields}
    assert set(QUOTA_EVENT_TYPES) <= payloads


def test_threshold_crossed_becomes_a_usage_alert_with_its_threshold_in_words():
    assert from_quota_event(crossed(threshold_percent=20)) == UsageAlertFired(
        "alr-1", "acct-1", "ap-southeast-1", "passport", 20_000, 100_000, "20%"
    )
    assert from_quota_event(crossed(threshold_percent=12.5)).threshold == "12.5%"
    assert from_quota_event(crossed(threshold_quantity=5000)).threshold == "5,000 calls"


def test_forecast_crossings_become_forecast_alerts():
    depletion = crossed(
        threshold_depletion_days=7,
        condition=quota_pb2.ALERT_CONDITION_DEPLETION_WITHIN_DAYS,
        daily_rate="2500.5",
        depletion_time=stamp(EXPIRE),
    )
    assert from_quota_event(depletion) == ForecastAlertFired(
        "alr-1", "acct-1", "ap-southeast-1", "passport", "2500.5", 20_000, 7, EXPIRE
    )
    forfeiture = crossed(
        threshold_forfeiture_quantity=500,
        condition=quota_pb2.ALERT_CONDITION_FORFEITURE_ABOVE_QUANTITY,
        daily_rate="10",
        forfeiture=quota_pb2.ForecastForfeiture(
            package_id="pkg-9", expire_time=stamp(EXPIRE), quantity=1_200
        ),
    )
    assert from_quota_event(forfeiture) == ForecastAlertFired(
        "alr-1",
        "acct-1",
        "ap-southeast-1",
        "passport",
        "10",
        20_000,
        forfeiture_above=500,
        package_id="pkg-9",
        forfeited_quantity=1_200,
        expire_time=EXPIRE,
    )
    # A remaining-quantity crossing that names its condition is still a usage alert.
    named = crossed(threshold_quantity=5000, condition=quota_pb2.ALERT_CONDITION_REMAINING_QUANTITY)
    assert from_quota_event(named).threshold == "5,000 calls"


def test_forecast_alerts_say_within_how_many_days_around_when_and_how_much_is_forfeited():
    shanghai = ZoneInfo("Asia/Shanghai")
    depletion = compose(
        ForecastAlertFired("alr-1", "acct-1", "r1", "passport", "2500.5", 20_000, 7, EXPIRE),
        shanghai,
    )
    assert depletion.message_type == MessageType.USAGE_ALERT
    assert depletion.subject == "Usage alert: passport in r1 will be used up within 7 days"
    # 2024-03-31 16:00 UTC is April 1st on the billing time zone's clock.
    assert "will be used up within 7 days (around 2024-04-01)" in depletion.body
    assert "2500.5 calls a day" in depletion.body and "alr-1" in depletion.body
    assert depletion.data["depletion_within_days"] == 7
    assert depletion.data["depletion_time"] == EXPIRE.isoformat()
    forfeiture = compose(
        ForecastAlertFired(
            "alr-2",
            "acct-1",
            "r1",
            "passport",
            "10",
            0,
            forfeiture_above=500,
            package_id="pkg-9",
            forfeited_quantity=1_200,
            expire_time=EXPIRE,
        ),
        shanghai,
    )
    assert "1,200 calls of passport in r1 will be forfeited" in forfeiture.subject
    assert "1,200 calls will be forfeited at 2024-04-01 00:00:00+08:00" in forfeiture.body
    assert "pkg-9" in forfeiture.body and "500 calls" in forfeiture.body
    assert forfeiture.data["forfeited_quantity"] == 1_200


def test_package_events_become_expiring_and_exhausted_and_nothing_else():
    expiring = quota_pb2.QuotaEvent(
        event_id="evt-2",
        package_expiring=quota_pb2.PackageExpiring(
            package=package(quota_pb2.PACKAGE_STATE_ACTIVE), days_left=7
        ),
    )
    assert from_quota_event(expiring) == PackageExpiring(
        "pkg-1", "acct-1", "ap-southeast-1", "passport", 1_500, 10_000, EXPIRE, 7
    )
    exhausted = quota_pb2.QuotaEvent(
        event_id="evt-3",
        package_state_changed=quota_pb2.PackageStateChanged(
            package=package(quota_pb2.PACKAGE_STATE_EXHAUSTED),
            previous_state=quota_pb2.PACKAGE_STATE_ACTIVE,
        ),
    )
    assert from_quota_event(exhausted) == PackageExhausted(
        "pkg-1", "acct-1", "ap-southeast-1", "passport", 10_000, EXPIRE
    )
    for state in (
        quota_pb2.PACKAGE_STATE_ACTIVE,
        quota_pb2.PACKAGE_STATE_EXPIRED,
        quota_pb2.PACKAGE_STATE_REVOKED,
    ):
        other = quota_pb2.QuotaEvent(
            package_state_changed=quota_pb2.PackageStateChanged(package=package(state))
        )
        assert from_quota_event(other) is None
    ppu = quota_pb2.QuotaEvent(
        pay_per_use_recorded=quota_pb2.PayPerUseRecorded(usage_event_id="u1", account_id="a")
    )
    assert from_quota_event(ppu) is None
    assert from_quota_event(quota_pb2.QuotaEvent()) is None


# --- domain events -> messages -----------------------------------------------------------


def test_a_usage_alert_says_which_account_region_api_how_much_of_how_much_and_threshold():
    message = compose(
        UsageAlertFired("alr-1", "acct-1", "ap-southeast-1", "passport", 20_000, 100_000, "20%")
    )
    assert message.message_type == MessageType.USAGE_ALERT
    assert message.account_id == "acct-1"
    assert message.subject == "Usage alert: 20,000 calls of passport left in ap-southeast-1"
    assert "\n" not in message.subject
    for text in ("acct-1", "ap-southeast-1", "passport", "20,000 calls left of 100,000", "20%"):
        assert text in message.body
    assert "alr-1" in message.body
    assert message.data == {
        "alert_id": "alr-1",
        "region": "ap-southeast-1",
        "api": "passport",
        "remaining_quantity": 20_000,
        "total_quantity": 100_000,
        "threshold": "20%",
    }


def test_one_call_is_singular():
    message = compose(UsageAlertFired("a", "acct-1", "r", "passport", 1, 100, "1 calls"))
    assert "1 call of passport" in message.subject
    assert "1 call left of 100" in message.body


def test_expiring_and_exhausted_packages_say_what_and_when():
    expiring = compose(
        PackageExpiring("pkg-1", "acct-1", "ap-southeast-1", "passport", 1_500, 10_000, EXPIRE, 1),
        ZoneInfo("Asia/Shanghai"),
    )
    assert expiring.message_type == MessageType.PACKAGE_EXPIRING
    assert expiring.subject == "Package expires in 1 day: passport in ap-southeast-1"
    local_expiry = EXPIRE.astimezone(ZoneInfo("Asia/Shanghai")).isoformat(sep=" ")
    for text in ("acct-1", "pkg-1", "1,500 calls of 10,000", local_expiry):
        assert text in expiring.body
    assert expiring.data["expire_time"] == EXPIRE.isoformat()
    assert expiring.data["days_left"] == 1
    assert (
        "in 7 days"
        in compose(PackageExpiring("p", "acct-1", "r", "passport", 1, 2, EXPIRE, 7)).subject
    )

    exhausted = compose(
        PackageExhausted("pkg-1", "acct-1", "ap-southeast-1", "passport", 10_000, EXPIRE)
    )
    assert exhausted.message_type == MessageType.PACKAGE_EXHAUSTED
    assert exhausted.subject == "Package used up: passport in ap-southeast-1"
    for text in ("acct-1", "pkg-1", "10,000 calls"):
        assert text in exhausted.body
    assert exhausted.data["total_quantity"] == 10_000


def test_a_test_message_names_the_account_and_contact():
    message = sample_message("acct-1", "cnt-1")
    assert message.message_type == MessageType.TEST
    assert message.account_id == "acct-1"
    assert "acct-1" in message.body and "cnt-1" in message.body
    assert message.data == {"contact_id": "cnt-1"}
