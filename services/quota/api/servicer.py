"""allot.quota.v1.QuotaService: requests in, use cases called, responses out. Nothing else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from google.protobuf import empty_pb2

from services.quota.api import convert
from services.quota.app import (
    alerts,
    forecasts,
    packages,
    simulation,
    stats,
    subscriptions,
    usage,
)
from services.quota.app.admission_reads import AdmissionReads
from services.quota.app.coalescer import UsageCoalescer
from services.quota.app.context import QuotaContext
from services.quota.app.rate_limits import RateLimits
from services.quota.domain.alerts import AlertRule
from services.quota.domain.packages import Package
from shared import status
from shared.auth import check_scope, current_principal, hiding_absence
from shared.errors import AllotError
from shared.idempotency import IdempotencyStore
from shared.outbox import Outbox
from shared.pagination import paged
from shared.timeutil import from_timestamp
from shared.validity import month_key

T = TypeVar("T")


def _optional_time(request, name: str):
    return from_timestamp(getattr(request, name), name) if request.HasField(name) else None


def _check_package(package: Package) -> None:
    check_scope(package.account_id, package.region)


def _check_rule(rule: AlertRule) -> None:
    """The caller may change or delete the rule: its account and region, and not an owned
    rule for an account token (USAGE_ALERT_OWNED, docs/design/usage-alerts.md)."""
    check_scope(rule.account_id, rule.region)
    alerts.check_may_change(rule, current_principal().is_operator)


async def _owned(load: Awaitable[T], scope_of: Callable[[T], tuple[str, str]]) -> T:
    """Load a resource by id for the caller (its account and region)."""
    resource = await hiding_absence(load)
    check_scope(*scope_of(resource))
    return resource


class QuotaServicer(quota_service_pb2_grpc.QuotaServiceServicer):
    def __init__(self, ctx: QuotaContext, idempotency: IdempotencyStore, outbox: Outbox) -> None:
        self.ctx = ctx
        self._idempotent = idempotency.bound(ctx.db, ctx.now)
        self.outbox = outbox
        self.coalescer = UsageCoalescer(ctx)
        self.admission_reads = AdmissionReads(
            ctx.db, ctx.now, month_of=lambda now: month_key(now, ctx.tz)
        )
        self.rate_limits = RateLimits(ctx)

    async def close(self, grace: float) -> None:
        await self.coalescer.close(grace)
        await self.rate_limits.close()

    def _package(self, record) -> quota_pb2.Package:
        return convert.to_proto_package(record, self.ctx.now())

    # --- usage ---------------------------------------------------------------------------

    async def ReportUsage(self, request, context):
        result = await self.coalescer.report(convert.from_proto_usage(request))
        if isinstance(result, AllotError):
            raise result
        return convert.to_proto_usage(result)

    async def BatchReportUsage(self, request, context):
        inputs: list = []
        for item in request.requests:
            try:
                inputs.append(convert.from_proto_usage(item))
            except AllotError as error:
                inputs.append(error)
        results = await self.coalescer.report_many(inputs)
        responses = []
        for i, result in enumerate(results):
            if isinstance(result, AllotError):
                error = result.within(f"requests[{i}].")
                responses.append(
                    quota_service_pb2.ReportUsageResponse(error=status.to_status(error))
                )
            else:
                responses.append(convert.to_proto_usage(result))
        return quota_service_pb2.BatchReportUsageResponse(responses=responses)

    async def CheckQuota(self, request, context):
        admission = await subscriptions.check_quota(
            self.ctx,
            self.admission_reads,
            request.account_id,
            request.region,
            request.api,
            request.enterprise_project_id,
            request.quantity,
            self.rate_limits,
        )
        return convert.to_proto_admission(admission)

    async def ExplainUsage(self, request, context):
        # Near misses of other regions only in the regions the caller's token may see.
        visible = current_principal().visible_regions(self.ctx.served_regions)
        found = await _owned(
            usage.explain_usage(self.ctx, request.event_id, visible),
            lambda e: (e.usage.account_id, e.usage.region),
        )
        return convert.to_proto_explanation(found.usage, found.near_misses)

    # --- packages ------------------------------------------------------------------------

    async def GrantPackage(self, request, context):
        spec = convert.from_proto_grant(request.package)

        async def work(uow):
            return self._package(await packages.grant_package(self.ctx, uow, spec))

        return await self._idempotent("GrantPackage", request, quota_pb2.Package, work)

    async def GetPackage(self, request, context):
        record = await _owned(
            packages.get_package(self.ctx, request.package_id),
            lambda r: (r.package.account_id, r.package.region),
        )
        return self._package(record)

    async def ListPackages(self, request, context):
        principal = current_principal()
        account_id = principal.scoped_account(request.account_id)
        page, token = await paged(
            request,
            lambda after, limit: packages.list_packages(
                self.ctx,
                account_id=account_id,
                region=request.region,
                visible_regions=principal.regions,
                api=request.api,
                states=list(request.states),
                project=request.enterprise_project_id,
                after_id=after[0] if after else None,
                limit=limit,
            ),
            lambda r: [r.package.package_id],
        )
        return quota_service_pb2.ListPackagesResponse(
            packages=[self._package(r) for r in page], next_page_token=token
        )

    async def _change_package(self, scope, request, change):
        """Renew and revoke: a locked read-modify-write under the request's idempotency key."""

        async def work(uow):
            record = await change(uow)
            return self._package(record)

        return await self._idempotent(scope, request, quota_pb2.Package, work)

    async def RenewPackage(self, request, context):
        expire = _optional_time(request, "expire_time")
        return await self._change_package(
            "RenewPackage",
            request,
            lambda uow: packages.renew_package(
                self.ctx, uow, request.package_id, expire, request.add_quantity, _check_package
            ),
        )

    async def RevokePackage(self, request, context):
        return await self._change_package(
            "RevokePackage",
            request,
            lambda uow: packages.revoke_package(
                self.ctx, uow, request.package_id, request.reason, _check_package
            ),
        )

    async def GetQuotaSummary(self, request, context):
        principal = current_principal()
        account_id = principal.scoped_account(request.account_id)
        items = await packages.quota_summary(
            self.ctx,
            account_id,
            request.region,
            principal.regions,
            request.api,
            request.enterprise_project_id,
        )
        return quota_pb2.QuotaSummary(
            account_id=account_id,
            items=[
                quota_pb2.QuotaSummaryItem(
                    region=i.region,
                    api=i.api,
                    total_quantity=i.totals.quantity_in_force,
                    used_quantity=i.totals.used_quantity,
                    remaining_quantity=i.totals.remaining_quantity,
                    active_package_count=i.totals.active_package_count,
                )
                for i in items
            ],
        )

    async def GetQuotaForecast(self, request, context):
        principal = current_principal()
        account_id = principal.scoped_account(request.account_id)
        items = await forecasts.quota_forecast(
            self.ctx, account_id, request.region, principal.regions, request.api
        )
        return quota_service_pb2.GetQuotaForecastResponse(
            forecasts=[convert.to_proto_forecast(item) for item in items]
        )

    # --- API subscriptions ---------------------------------------------------------------

    async def EnableApi(self, request, context):
        async def work(uow):
            row = await subscriptions.enable_api(
                self.ctx, uow, request.account_id, request.region, request.api
            )
            return convert.to_proto_subscription(row)

        return await self._idempotent("EnableApi", request, quota_pb2.ApiSubscription, work)

    async def DisableApi(self, request, context):
        async def work(uow):
            row = await subscriptions.disable_api(
                self.ctx, uow, request.account_id, request.region, request.api
            )
            return convert.to_proto_subscription(row)

        return await self._idempotent("DisableApi", request, quota_pb2.ApiSubscription, work)

    async def ListApiSubscriptions(self, request, context):
        principal = current_principal()
        account_id = principal.scoped_account(request.account_id)
        page, token = await paged(
            request,
            lambda after, limit: subscriptions.list_subscriptions(
                self.ctx, account_id, request.region, principal.regions, after, limit
            ),
            lambda r: [r.region, r.api],
        )
        return quota_service_pb2.ListApiSubscriptionsResponse(
            api_subscriptions=[convert.to_proto_subscription(r) for r in page],
            next_page_token=token,
        )

    # --- built by the usage alerts and events issue --------------------------------------

    async def GetUsageStats(self, request, context):
        buckets = await stats.usage_stats(
            self.ctx,
            self.ctx.tz,
            account_id=current_principal().scoped_account(request.account_id),
            region=request.region,
            api=request.api,
            start_time=_optional_time(request, "start_time"),
            end_time=_optional_time(request, "end_time"),
            granularity=request.granularity,
            group_by=request.group_by,
            enterprise_project_id=request.enterprise_project_id,
            user_id=request.user_id,
        )
        return convert.to_proto_usage_stats(buckets)

    async def CreateUsageAlert(self, request, context):
        spec = convert.from_proto_alert(request.usage_alert)

        by_service = current_principal().service is not None

        async def work(uow):
            view = await alerts.create_alert(self.ctx, uow, spec, by_service)
            return convert.to_proto_alert(view)

        return await self._idempotent("CreateUsageAlert", request, quota_pb2.UsageAlert, work)

    async def GetUsageAlert(self, request, context):
        view = await _owned(
            alerts.get_alert(self.ctx, request.alert_id),
            lambda v: (v.rule.account_id, v.rule.region),
        )
        return convert.to_proto_alert(view)

    async def ListUsageAlerts(self, request, context):
        principal = current_principal()
        account_id = principal.scoped_account(request.account_id)
        page, token = await paged(
            request,
            lambda after, limit: alerts.list_alerts(
                self.ctx,
                account_id,
                request.region,
                principal.regions,
                after[0] if after else None,
                limit,
            ),
            lambda v: [v.rule.alert_id],
        )
        return quota_service_pb2.ListUsageAlertsResponse(
            usage_alerts=[convert.to_proto_alert(v) for v in page], next_page_token=token
        )

    async def UpdateUsageAlert(self, request, context):
        spec = convert.from_proto_alert(request.usage_alert)
        paths = list(request.update_mask.paths)

        async def work(uow):
            view = await alerts.update_alert(
                self.ctx, uow, request.usage_alert.alert_id, spec, paths, _check_rule
            )
            return convert.to_proto_alert(view)

        return await hiding_absence(
            self._idempotent("UpdateUsageAlert", request, quota_pb2.UsageAlert, work)
        )

    async def DeleteUsageAlert(self, request, context):
        async def work(uow):
            await alerts.delete_alert(self.ctx, uow, request.alert_id, _check_rule)
            return empty_pb2.Empty()

        return await hiding_absence(self.ctx.db.transaction(work))

    # --- rate limits (docs/design/deduction-order.md "Rate limits") ---------------------

    async def SetRateLimit(self, request, context):
        async def work(uow):
            limit = await self.rate_limits.set(
                uow,
                request.account_id,
                request.region,
                request.api,
                request.per_second,
                request.burst,
            )
            return convert.to_proto_rate_limit(limit)

        return await self._idempotent("SetRateLimit", request, quota_pb2.RateLimit, work)

    async def GetRateLimit(self, request, context):
        limit = await self.rate_limits.get(request.account_id, request.region, request.api)
        return convert.to_proto_rate_limit(limit)

    # --- what-if (docs/design/what-if.md) ------------------------------------------------

    async def SimulateUsage(self, request, context):
        account_id = current_principal().scoped_account(request.account_id)
        spec = convert.from_proto_simulation(request, account_id)
        return convert.to_proto_simulation(await simulation.simulate_usage(self.ctx, spec))

    # --- events --------------------------------------------------------------------------

    async def WatchEvents(self, request, context):
        # A region-limited token sees its regions' events and those about no region (an
        # account's standing, its balance): docs/security.md.
        async for event in self.outbox.watch(
            request.after_sequence,
            request.event_types,
            stopped=context.done,
            regions=current_principal().regions,
        ):
            yield event
