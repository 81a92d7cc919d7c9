"""The quota service as the shared bootstrap runs it: its policy table, servicers, due work."""

from __future__ import annotations

import pathlib
from datetime import timedelta

import grpc
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from services.quota.adapters import tables
from services.quota.adapters.events import QuotaEvents
from services.quota.api.servicer import QuotaServicer
from services.quota.app.clock_work import announce_packages
from services.quota.app.context import QuotaContext
from services.quota.domain.deduction import DeductionPolicy
from shared.auth import OPERATORS, OWNERS, READERS, Policy, policy
from shared.idempotency import IdempotencyStore
from shared.outbox import Outbox
from shared.server import Runtime
from shared.settings import SettingsError

SERVICE_NAME = quota_service_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name


def _rpc(method: str) -> str:
    return f"/{SERVICE_NAME}/{method}"


# Who may call what (DESIGN §7). Gateways (`service`) report usage and check quota for any
# account; billing (`service`) grants, renews, revokes and enables APIs; account principals
# read their own account, and `account_full` manages its own usage alerts.
POLICIES: dict[str, Policy] = {
    _rpc("ReportUsage"): policy(*OPERATORS, regions=("region",)),
    _rpc("BatchReportUsage"): policy(*OPERATORS, regions=("requests[].region",)),
    _rpc("CheckQuota"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("GrantPackage"): policy(*OPERATORS, regions=("package.region",)),
    _rpc("GetPackage"): policy(*READERS),
    _rpc("ListPackages"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("RenewPackage"): policy(*OPERATORS),
    _rpc("RevokePackage"): policy(*OPERATORS),
    _rpc("EnableApi"): policy(*OPERATORS, regions=("region",)),
    _rpc("DisableApi"): policy(*OPERATORS, regions=("region",)),
    _rpc("ListApiSubscriptions"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("GetQuotaSummary"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("ExplainUsage"): policy(*READERS),
    _rpc("GetUsageStats"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("CreateUsageAlert"): policy(
        *OWNERS, account="usage_alert.account_id", regions=("usage_alert.region",)
    ),
    _rpc("GetUsageAlert"): policy(*READERS),
    _rpc("ListUsageAlerts"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("UpdateUsageAlert"): policy(*OWNERS, account="usage_alert.account_id"),
    _rpc("DeleteUsageAlert"): policy(*OWNERS),
    _rpc("WatchEvents"): policy(*OPERATORS),
}


class QuotaService:
    name = "quota"
    migrations_dir = pathlib.Path(__file__).resolve().parent / "migrations"
    service_names = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        catalog = runtime.catalog
        served = runtime.settings.served_regions or tuple(catalog.regions)
        unknown = [r for r in served if not catalog.has_region(r)]
        if unknown:
            raise SettingsError(f"ALLOT_QUOTA_REGIONS names regions not in the catalog: {unknown}")
        self.runtime = runtime
        self.outbox = Outbox(
            runtime.db, tables.outbox_events, tables.outbox_counter, quota_pb2.QuotaEvent
        )
        self.context = QuotaContext(
            db=runtime.db,
            clock=runtime.clock,
            catalog=catalog,
            served_regions=tuple(served),
            policy=DeductionPolicy(runtime.settings.deduction_policy),
            events=QuotaEvents(self.outbox),
            expiring_notice=timedelta(days=int(runtime.settings.expiring_notice_days)),
            tz=runtime.settings.tz,
        )

    def policies(self) -> dict[str, Policy]:
        return POLICIES

    def register(self, server: grpc.aio.Server) -> None:
        self.servicer = QuotaServicer(
            self.context, IdempotencyStore(tables.idempotency_keys), self.outbox
        )
        quota_service_pb2_grpc.add_QuotaServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Announce package activation, expiry and expiring warnings as the clock moves."""
        self.runtime.scheduler.register(
            "quota.packages", lambda now: announce_packages(self.context, now)
        )

    def quiesce(self) -> None:
        self.outbox.close()

    async def stop(self) -> None:
        await self.servicer.close(grace=float(self.runtime.settings.shutdown_grace))
