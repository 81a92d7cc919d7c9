"""Quota's events, staged in the outbox in the transaction that causes them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from allot.quota.v1 import quota_pb2

from services.quota.adapters.metrics import QuotaMetrics
from services.quota.adapters.packages_repository import PackageRecord
from services.quota.domain.alerts import AlertRule
from services.quota.domain.deduction import UsageEvent
from services.quota.domain.forecast import Forecast, Forfeiture
from services.quota.domain.packages import PackageState
from shared.db import UnitOfWork
from shared.outbox import Outbox
from shared.timeutil import to_timestamp


class QuotaEvents:
    def __init__(
        self, outbox: Outbox[quota_pb2.QuotaEvent], metrics: QuotaMetrics | None = None
    ) -> None:
        self.outbox = outbox
        self.metrics = metrics if metrics is not None else QuotaMetrics()

    def threshold_crossed(
        self,
        uow: UnitOfWork,
        rule: AlertRule,
        api: str,
        remaining: int,
        quantity_in_force: int,
        now: datetime,
        forecast: Forecast | None = None,
    ) -> str:
        threshold = rule.threshold
        payload = quota_pb2.ThresholdCrossed(
            alert_id=rule.alert_id,
            account_id=rule.account_id,
            region=rule.region,
            api=api,
            remaining_quantity=remaining,
            total_quantity=quantity_in_force,
            condition=int(threshold.condition),
            owner=rule.owner,
        )
        if threshold.quantity is not None:
            payload.threshold_quantity = threshold.quantity
        elif threshold.percent is not None:
            payload.threshold_percent = float(threshold.percent)
        elif threshold.depletion_days is not None:
            payload.threshold_depletion_days = threshold.depletion_days
        else:
            payload.threshold_forfeiture_quantity = threshold.forfeiture_quantity
        if forecast is not None and threshold.is_forecast:
            payload.daily_rate = format_rate(forecast.daily_rate)
            if threshold.depletion_days is not None and forecast.depletion_time is not None:
                payload.depletion_time.CopyFrom(to_timestamp(forecast.depletion_time))
            largest = forecast.largest_forfeiture()
            if threshold.forfeiture_quantity is not None and largest is not None:
                payload.forfeiture.CopyFrom(forfeiture_message(largest))
        self.metrics.threshold_crossed(uow)
        return self.outbox.add(
            uow,
            "threshold_crossed",
            payload,
            now,
            account_id=rule.account_id,
            region=rule.region,
        )

    def pay_per_use_recorded(
        self, uow: UnitOfWork, event: UsageEvent, quantity: int, now: datetime
    ) -> str:
        payload = quota_pb2.PayPerUseRecorded(
            usage_event_id=event.event_id,
            account_id=event.account_id,
            user_id=event.user_id,
            region=event.region,
            api=event.api,
            enterprise_project_id=event.enterprise_project_id,
            quantity=quantity,
            occur_time=to_timestamp(event.occur_time),
        )
        return self.outbox.add(
            uow,
            "pay_per_use_recorded",
            payload,
            now,
            account_id=event.account_id,
            region=event.region,
        )

    def package_state_changed(
        self, uow: UnitOfWork, record: PackageRecord, previous: PackageState, now: datetime
    ) -> str:
        payload = quota_pb2.PackageStateChanged(
            package=package_message(record, now), previous_state=int(previous)
        )
        return self.outbox.add(uow, "package_state_changed", payload, now, **_about(record))

    def package_expiring(
        self, uow: UnitOfWork, record: PackageRecord, days_left: int, now: datetime
    ) -> str:
        payload = quota_pb2.PackageExpiring(
            package=package_message(record, now), days_left=days_left
        )
        return self.outbox.add(uow, "package_expiring", payload, now, **_about(record))


def _about(record: PackageRecord) -> dict[str, str]:
    """What a package's event is about, for the streams' filters."""
    return {"account_id": record.package.account_id, "region": record.package.region}


def package_message(record: PackageRecord, now: datetime) -> quota_pb2.Package:
    """The wire form of a package as it is at `now` (also what the API answers)."""
    p = record.package
    message = quota_pb2.Package(
        package_id=p.package_id,
        account_id=p.account_id,
        region=p.region,
        api=p.api,
        enterprise_project_id=p.enterprise_project_id,
        source=int(p.source),
        total_quantity=p.total_quantity,
        used_quantity=p.used_quantity,
        remaining_quantity=p.remaining_quantity,
        effective_time=to_timestamp(p.effective_time),
        expire_time=to_timestamp(p.expire_time),
        create_time=to_timestamp(p.create_time),
        state=int(p.state_at(now)),
        order_id=p.order_id,
        revoke_reason=record.revoke_reason,
    )
    if p.revoke_time is not None:
        message.revoke_time.CopyFrom(to_timestamp(p.revoke_time))
    return message


def format_rate(rate: Decimal) -> str:
    """A daily rate on the wire: a plain decimal string without exponent or trailing zeros."""
    text = format(rate.normalize(), "f")
    return text if text != "-0" else "0"


def forfeiture_message(item: Forfeiture) -> quota_pb2.ForecastForfeiture:
    return quota_pb2.ForecastForfeiture(
        package_id=item.package_id,
        expire_time=to_timestamp(item.expire_time),
        quantity=item.quantity,
    )
