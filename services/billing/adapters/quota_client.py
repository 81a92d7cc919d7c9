"""Billing's calls to the quota service of each region (grant, renew, revoke, enable APIs).

Every command carries a request id derived from the billing order or subscription, so a
retried call never grants twice. Only an explicit refusal is final (`QuotaRefused`, an
AllotError with quota's code and reason: the order fails and is refunded); every other answer
is `QuotaUnavailable` — the order stays pending and is offered again (docs/faults.md,
"Callers classify codes").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

import grpc
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from google.protobuf import field_mask_pb2

from services.billing.domain.line_explanations import Explained, NearMissSeen
from services.billing.domain.overview import AlertSeen, PackageSeen
from services.billing.domain.recommendations import Purchase, SimulatedOutcome
from services.billing.domain.replenish import RULE_OWNER
from shared.errors import AllotError, Kind, Unavailable
from shared.status import error_info
from shared.timeutil import from_timestamp, to_timestamp
from shared.tls import Channels
from shared.tokens import TokenSigner, internal_metadata

log = logging.getLogger("allot.billing.quota")

# A command to quota that takes longer than this is treated as unreachable and retried.
CALL_TIMEOUT = 10.0
# Quota looked at the request and said no: final, the caller may refund.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# Billing's own credentials were refused, or quota does not know the method: an operator's
# error (a rotated secret, a certificate, a rolling upgrade), fixed without the customer. Retried
# like an outage, and logged as an error so someone looks.
MISCONFIGURED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# Reads for the console's views (GetAccountOverview, ListAccountPackages): a region whose quota
# does not answer within this is shown as unavailable, never waited for
# (docs/design/billing.md, "Account overview").
READ_TIMEOUT = 3.0
# A what-if replay (RecommendPackages) reads up to a year of usage events: it may take longer.
SIMULATE_TIMEOUT = 60.0
# Everything else — UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED, CANCELLED,
# INTERNAL, UNKNOWN, DATA_LOSS — says nothing about the request: try again later. A retry is
# safe, every command carries its request id.


class QuotaUnavailable(Unavailable):
    def __init__(self, region: str, detail: str) -> None:
        super().__init__(
            "QUOTA_UNAVAILABLE",
            f"the quota service of {region} is unreachable: {detail}",
            region=region,
        )


class QuotaRefused(AllotError):
    """Quota answered with an error; keeps quota's code and reason."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        info = error_info(error)
        super().__init__(info.reason if info else error.code().name, error.details() or "")
        self.kind = (
            Kind[error.code().name]
            if error.code().name in Kind.__members__
            else (Kind.FAILED_PRECONDITION)
        )


class QuotaClient:
    def __init__(
        self, endpoints: dict[str, str], channels: Channels, signer: TokenSigner | None
    ) -> None:
        self.endpoints = endpoints
        self._channels = channels
        self._metadata = internal_metadata(signer, "billing")

    def _stub(self, region: str) -> quota_service_pb2_grpc.QuotaServiceStub:
        return quota_service_pb2_grpc.QuotaServiceStub(self._channels.get(self.endpoints[region]))

    async def _call(self, region: str, method: str, request, within: float = CALL_TIMEOUT):
        try:
            return await getattr(self._stub(region), method)(
                request, metadata=self._metadata(), timeout=within
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code in REFUSALS:
                raise QuotaRefused(error) from error
            if code in MISCONFIGURED:
                log.error(
                    "quota of %s refused billing's %s (%s: %s): check billing's credentials "
                    "and quota's version; retrying",
                    region,
                    method,
                    code.name,
                    error.details(),
                )
            detail = f"{code.name} {error.details() or ''}".strip()
            raise QuotaUnavailable(region, detail) from error

    async def grant_package(
        self,
        request_id: str,
        *,
        account_id: str,
        region: str,
        api: str,
        enterprise_project_id: str,
        quantity: int,
        effective_time: datetime,
        expire_time: datetime,
        order_id: str,
    ) -> quota_pb2.Package:
        return await self._call(
            region,
            "GrantPackage",
            quota_service_pb2.GrantPackageRequest(
                request_id=request_id,
                package=quota_pb2.Package(
                    account_id=account_id,
                    region=region,
                    api=api,
                    enterprise_project_id=enterprise_project_id,
                    source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                    total_quantity=quantity,
                    effective_time=to_timestamp(effective_time),
                    expire_time=to_timestamp(expire_time),
                    order_id=order_id,
                ),
            ),
        )

    async def get_package(self, region: str, package_id: str) -> quota_pb2.Package:
        return await self._call(
            region, "GetPackage", quota_service_pb2.GetPackageRequest(package_id=package_id)
        )

    async def renew_package(
        self,
        request_id: str,
        region: str,
        package_id: str,
        expire_time: datetime,
        add_quantity: int,
    ) -> quota_pb2.Package:
        return await self._call(
            region,
            "RenewPackage",
            quota_service_pb2.RenewPackageRequest(
                request_id=request_id,
                package_id=package_id,
                expire_time=to_timestamp(expire_time),
                add_quantity=add_quantity,
            ),
        )

    async def revoke_package(
        self, request_id: str, region: str, package_id: str, reason: str
    ) -> quota_pb2.Package:
        return await self._call(
            region,
            "RevokePackage",
            quota_service_pb2.RevokePackageRequest(
                request_id=request_id, package_id=package_id, reason=reason
            ),
        )

    async def enable_api(self, request_id: str, account_id: str, region: str, api: str):
        return await self._call(
            region,
            "EnableApi",
            quota_service_pb2.EnableApiRequest(
                request_id=request_id, account_id=account_id, region=region, api=api
            ),
        )

    async def disable_api(self, request_id: str, account_id: str, region: str, api: str):
        return await self._call(
            region,
            "DisableApi",
            quota_service_pb2.DisableApiRequest(
                request_id=request_id, account_id=account_id, region=region, api=api
            ),
        )

    async def create_usage_alert(
        self, request_id: str, account_id: str, region: str, api: str, below: int, enabled: bool
    ) -> str:
        """Create the usage alert rule of an auto-replenish setting, owned by auto-replenish
        (UsageAlert.owner: kept out of the customer's messages and alerts); its alert id."""
        rule = await self._call(
            region,
            "CreateUsageAlert",
            quota_service_pb2.CreateUsageAlertRequest(
                request_id=request_id,
                usage_alert=quota_pb2.UsageAlert(
                    account_id=account_id,
                    region=region,
                    api=api,
                    remaining_quantity=below,
                    enabled=enabled,
                    owner=RULE_OWNER,
                ),
            ),
        )
        return rule.alert_id

    async def update_usage_alert(
        self, request_id: str, region: str, alert_id: str, api: str, below: int, enabled: bool
    ) -> str:
        """Set the rule's API, threshold and switch; quota re-arms and evaluates it at once."""
        rule = await self._call(
            region,
            "UpdateUsageAlert",
            quota_service_pb2.UpdateUsageAlertRequest(
                request_id=request_id,
                usage_alert=quota_pb2.UsageAlert(
                    alert_id=alert_id, api=api, remaining_quantity=below, enabled=enabled
                ),
                update_mask=field_mask_pb2.FieldMask(
                    paths=["api", "remaining_quantity", "enabled"]
                ),
            ),
        )
        return rule.alert_id

    # --- reads of the console's views ---------------------------------------------------

    async def list_packages(
        self,
        region: str,
        *,
        account_id: str,
        api: str = "",
        states: tuple[int, ...] = (),
        enterprise_project_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        within: float = READ_TIMEOUT,
    ) -> tuple[list[PackageSeen], str]:
        """One page of the account's packages in the region and quota's next page token
        (a project: the packages designated to it and those for every project)."""
        response = await self._call(
            region,
            "ListPackages",
            quota_service_pb2.ListPackagesRequest(
                account_id=account_id,
                region=region,
                api=api,
                states=states,
                enterprise_project_id=enterprise_project_id,
                page_size=page_size,
                page_token=page_token,
            ),
            within,
        )
        return [_package_seen(p) for p in response.packages], response.next_page_token

    async def list_usage_alerts(
        self, region: str, account_id: str, page_token: str = "", within: float = READ_TIMEOUT
    ) -> tuple[list[AlertSeen], str]:
        """One page of the account's usage alert rules in the region, and the next token."""
        response = await self._call(
            region,
            "ListUsageAlerts",
            quota_service_pb2.ListUsageAlertsRequest(
                account_id=account_id, region=region, page_size=1000, page_token=page_token
            ),
            within,
        )
        return [_alert_seen(a) for a in response.usage_alerts], response.next_page_token

    async def explain_usage(
        self, region: str, usage_event_id: str, within: float = READ_TIMEOUT
    ) -> Explained:
        """Quota's explanation of a usage event, with its near misses."""
        explanation = await self._call(
            region,
            "ExplainUsage",
            quota_service_pb2.ExplainUsageRequest(event_id=usage_event_id),
            within,
        )
        return Explained(
            explanation,
            tuple(
                NearMissSeen(m.package_id, m.region, m.api, m.enterprise_project_id, m.reason)
                for m in explanation.near_misses
            ),
        )

    async def simulate_usage(
        self,
        region: str,
        *,
        account_id: str,
        api: str,
        start: datetime,
        end: datetime,
        purchases: Sequence[Purchase],
        within: float = SIMULATE_TIMEOUT,
    ) -> SimulatedOutcome:
        """Quota's what-if replay of the account's usage with `purchases` as its only packages
        (none: pay-per-use only)."""
        response = await self._call(
            region,
            "SimulateUsage",
            quota_service_pb2.SimulateUsageRequest(
                account_id=account_id,
                region=region,
                api=api,
                start_time=to_timestamp(start),
                end_time=to_timestamp(end),
                packages=[
                    quota_service_pb2.HypotheticalPackage(
                        offer_id=p.offer.id, start_time=to_timestamp(p.start), count=p.count
                    )
                    for p in purchases
                ],
                use_real_packages=False,
            ),
            within,
        )
        return SimulatedOutcome(
            package_paid_quantity=response.package_paid_quantity,
            pay_per_use_quantity=response.pay_per_use_quantity,
            forfeited_quantity=sum(f.quantity for f in response.forfeited),
            monthly_pay_per_use=tuple(m.pay_per_use_quantity for m in response.months),
        )


# What ListPackages is asked for to find the packages in force.
IN_FORCE_STATES = (quota_pb2.PACKAGE_STATE_ACTIVE, quota_pb2.PACKAGE_STATE_EXHAUSTED)


def _package_seen(package: quota_pb2.Package) -> PackageSeen:
    return PackageSeen(
        package_id=package.package_id,
        region=package.region,
        api=package.api,
        enterprise_project_id=package.enterprise_project_id,
        total_quantity=package.total_quantity,
        remaining_quantity=package.remaining_quantity,
        expire_time=from_timestamp(package.expire_time, "expire_time"),
        wire=package,
    )


def _alert_seen(alert: quota_pb2.UsageAlert) -> AlertSeen:
    return AlertSeen(
        alert_id=alert.alert_id,
        region=alert.region,
        api=alert.api,
        # Unset means enabled (quota's default for a new rule).
        enabled=alert.enabled if alert.HasField("enabled") else True,
        owner=alert.owner,
        wire=alert,
    )
