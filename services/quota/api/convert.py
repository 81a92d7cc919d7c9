"""Protobuf <-> quota domain and use-case types. Nothing else crosses this line."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from allot.quota.v1 import quota_pb2, quota_service_pb2

from services.quota.adapters.events import forfeiture_message, format_rate, package_message
from services.quota.adapters.packages_repository import PackageRecord
from services.quota.adapters.usage_repository import StoredUsage
from services.quota.app.alerts import AlertInput, AlertView
from services.quota.app.forecasts import ScopeForecast
from services.quota.app.packages import GrantInput
from services.quota.app.simulation import HypotheticalInput, SimulationInput
from services.quota.app.stats import StatsBucket
from services.quota.app.usage import UsageInput, UsageResult
from services.quota.domain.admission import Admission
from services.quota.domain.near_misses import NearMiss
from services.quota.domain.rate_limits import EffectiveLimit
from services.quota.domain.simulation import SimulationResult
from shared.timeutil import from_epoch_us, from_timestamp, to_timestamp


def _optional_time(message, name: str, field: str) -> datetime | None:
    return from_timestamp(getattr(message, name), field) if message.HasField(name) else None


def to_proto_package(record: PackageRecord, now: datetime) -> quota_pb2.Package:
    return package_message(record, now)


def from_proto_grant(package: quota_pb2.Package) -> GrantInput:
    return GrantInput(
        account_id=package.account_id,
        region=package.region,
        api=package.api,
        enterprise_project_id=package.enterprise_project_id,
        source=package.source,
        total_quantity=package.total_quantity,
        effective_time=_optional_time(package, "effective_time", "package.effective_time"),
        expire_time=_optional_time(package, "expire_time", "package.expire_time"),
        order_id=package.order_id,
    )


def from_proto_usage(request: quota_service_pb2.ReportUsageRequest) -> UsageInput:
    return UsageInput(
        event_id=request.event_id,
        account_id=request.account_id,
        user_id=request.user_id,
        region=request.region,
        api=request.api,
        enterprise_project_id=request.enterprise_project_id,
        quantity=request.quantity,
        http_status=request.http_status,
        occur_time=_optional_time(request, "occur_time", "occur_time"),
    )


def to_proto_usage(result: UsageResult) -> quota_service_pb2.ReportUsageResponse:
    return quota_service_pb2.ReportUsageResponse(
        event_id=result.event_id,
        duplicate=result.duplicate,
        billable=result.billable,
        deductions=[
            quota_pb2.Deduction(package_id=pid, quantity=qty) for pid, qty in result.deductions
        ],
        pay_per_use_quantity=result.pay_per_use_quantity,
        remaining_quantity=result.remaining_quantity,
    )


def to_proto_subscription(row) -> quota_pb2.ApiSubscription:
    return quota_pb2.ApiSubscription(
        account_id=row.account_id,
        region=row.region,
        api=row.api,
        state=row.state,
        create_time=to_timestamp(from_epoch_us(row.create_time_us)),
        update_time=to_timestamp(from_epoch_us(row.update_time_us)),
    )


def to_proto_admission(admission: Admission) -> quota_service_pb2.CheckQuotaResponse:
    response = quota_service_pb2.CheckQuotaResponse(
        allowed=admission.allowed,
        deny_reason=int(admission.deny_reason),
        remaining_quantity=admission.remaining_quantity,
        pay_per_use=admission.pay_per_use,
    )
    if admission.retry_after is not None:
        response.retry_after.FromTimedelta(admission.retry_after)
    return response


def to_proto_rate_limit(limit: EffectiveLimit) -> quota_pb2.RateLimit:
    return quota_pb2.RateLimit(
        account_id=limit.account_id,
        region=limit.region,
        api=limit.api,
        per_second=limit.limit.per_second if limit.limit else 0,
        burst=limit.limit.burst if limit.limit else 0,
        source=int(limit.source),
        update_time=to_timestamp(limit.update_time),
    )


def from_proto_alert(alert: quota_pb2.UsageAlert) -> AlertInput:
    which = alert.WhichOneof("threshold")
    return AlertInput(
        account_id=alert.account_id,
        region=alert.region,
        api=alert.api,
        threshold_quantity=alert.remaining_quantity if which == "remaining_quantity" else None,
        threshold_percent=alert.remaining_percent if which == "remaining_percent" else None,
        depletion_within_days=(
            alert.depletion_within_days if which == "depletion_within_days" else None
        ),
        forfeiture_above_quantity=(
            alert.forfeiture_above_quantity if which == "forfeiture_above_quantity" else None
        ),
        # Unset on create means enabled: a rule nobody asked to switch off should work.
        enabled=alert.enabled if alert.HasField("enabled") else True,
        owner=alert.owner,
    )


def to_proto_alert(view: AlertView) -> quota_pb2.UsageAlert:
    rule = view.rule
    message = quota_pb2.UsageAlert(
        alert_id=rule.alert_id,
        account_id=rule.account_id,
        region=rule.region,
        api=rule.api,
        enabled=rule.enabled,
        state=int(view.state),
        create_time=to_timestamp(rule.create_time),
        update_time=to_timestamp(rule.update_time),
        owner=rule.owner,
    )
    threshold = rule.threshold
    if threshold.quantity is not None:
        message.remaining_quantity = threshold.quantity
    elif threshold.percent is not None:
        message.remaining_percent = float(threshold.percent)
    elif threshold.depletion_days is not None:
        message.depletion_within_days = threshold.depletion_days
    else:
        message.forfeiture_above_quantity = threshold.forfeiture_quantity
    return message


def to_proto_forecast(item: ScopeForecast) -> quota_pb2.QuotaForecast:
    message = quota_pb2.QuotaForecast(
        region=item.region,
        api=item.api,
        daily_rate=format_rate(item.forecast.daily_rate),
        forfeitures=[forfeiture_message(f) for f in item.forecast.forfeitures],
    )
    if item.forecast.depletion_time is not None:
        message.depletion_time.CopyFrom(to_timestamp(item.forecast.depletion_time))
    return message


_RULES = {r.lower(): v for r, v in quota_pb2.DecisiveRule.items()}
_REASONS = {r.lower(): v for r, v in quota_pb2.IneligibleReason.items()}


def to_proto_explanation(
    usage: StoredUsage, near_misses: Sequence[NearMiss] = ()
) -> quota_pb2.UsageExplanation:
    explanation = usage.explanation
    return quota_pb2.UsageExplanation(
        event_id=usage.event_id,
        policy=explanation["policy"],
        candidates=[
            quota_pb2.UsageCandidate(
                package_id=package_id,
                rank=rank,
                eligible=eligible,
                ineligible_reason=_REASONS.get(f"ineligible_reason_{reason}", 0),
                deducted_quantity=deducted,
            )
            for package_id, rank, eligible, reason, deducted in explanation["candidates"]
        ],
        decisive_rule=_RULES[f"decisive_rule_{explanation['decisive_rule']}"],
        pay_per_use_quantity=usage.pay_per_use_quantity,
        billable=usage.billable,
        account_id=usage.account_id,
        region=usage.region,
        api=usage.api,
        enterprise_project_id=usage.enterprise_project_id,
        occur_time=to_timestamp(usage.occur_time),
        near_misses=[
            quota_pb2.NearMiss(
                package_id=m.package_id,
                region=m.region,
                api=m.api,
                enterprise_project_id=m.enterprise_project_id,
                reason=int(m.reason),
            )
            for m in near_misses
        ],
    )


def to_proto_usage_stats(buckets: Sequence[StatsBucket]) -> quota_service_pb2.GetUsageStatsResponse:
    return quota_service_pb2.GetUsageStatsResponse(
        buckets=[
            quota_pb2.UsageStatsBucket(
                start_time=to_timestamp(b.start_time),
                successful_calls=b.successful_calls,
                failed_calls=b.failed_calls,
                package_quantity=b.package_quantity,
                pay_per_use_quantity=b.pay_per_use_quantity,
                enterprise_project_id=b.enterprise_project_id,
                user_id=b.user_id,
            )
            for b in buckets
        ]
    )


def from_proto_simulation(
    request: quota_service_pb2.SimulateUsageRequest, account_id: str
) -> SimulationInput:
    return SimulationInput(
        account_id=account_id,
        region=request.region,
        api=request.api,
        start_time=_optional_time(request, "start_time", "start_time"),
        end_time=_optional_time(request, "end_time", "end_time"),
        policy=request.policy,
        packages=tuple(
            HypotheticalInput(
                offer_id=p.offer_id,
                start_time=_optional_time(p, "start_time", f"packages[{i}].start_time"),
                count=p.count,
                enterprise_project_id=p.enterprise_project_id,
            )
            for i, p in enumerate(request.packages)
        ),
        use_real_packages=(
            request.use_real_packages if request.HasField("use_real_packages") else None
        ),
    )


def to_proto_simulation(result: SimulationResult) -> quota_service_pb2.SimulateUsageResponse:
    return quota_service_pb2.SimulateUsageResponse(
        package_paid_quantity=result.package_paid_quantity,
        pay_per_use_quantity=result.pay_per_use_quantity,
        forfeited=[
            quota_service_pb2.SimulatedForfeiture(
                package_id=f.package_id,
                quantity=f.quantity,
                expire_time=to_timestamp(f.expire_time),
            )
            for f in result.forfeited
        ],
        per_package=[
            quota_service_pb2.SimulatedPackageUse(package_id=package_id, used_quantity=used)
            for package_id, used in result.per_package.items()
        ],
        event_count=result.event_count,
        months=[
            quota_service_pb2.SimulatedMonth(
                month_start=to_timestamp(m.month_start),
                package_paid_quantity=m.package_paid_quantity,
                pay_per_use_quantity=m.pay_per_use_quantity,
            )
            for m in result.months
        ],
    )
