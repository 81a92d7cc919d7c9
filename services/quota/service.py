"""The quota service as the shared bootstrap runs it: its policy table, servicers, due work,
and the consumer of billing's stream that keeps the standing projection (`app/standings.py`)."""

from __future__ import annotations

import logging
import pathlib
from datetime import timedelta

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from services.quota.adapters import billing_events, tables
from services.quota.adapters.events import QuotaEvents
from services.quota.adapters.metrics import QuotaMetrics
from services.quota.api.servicer import QuotaServicer
from services.quota.app import forecasts, standings
from services.quota.app.clock_work import announce_packages
from services.quota.app.context import QuotaContext
from services.quota.domain.deduction import DeductionPolicy
from services.quota.domain.rate_limits import MAX_PER_SECOND
from shared.auth import ADMIN, GATEWAY, OWNERS, READERS, Policy, policy
from shared.db import UnitOfWork
from shared.idempotency import IdempotencyStore
from shared.outbox import Outbox
from shared.server import Runtime
from shared.settings import SettingsError
from shared.streams.consumer import StreamConsumer
from shared.streams.subscriptions import Subscriptions

log = logging.getLogger("allot.quota")

SERVICE_NAME = quota_service_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name


def _rpc(method: str) -> str:
    return f"/{SERVICE_NAME}/{method}"


# Who may call what (docs/security.md; the table is complete: a method missing here is refused).
# Gateways report usage and ask for admission, in the regions of their token; billing
# (`internal`) grants, renews, revokes, reads packages and enables APIs, and lists packages and
# usage alerts for its account overview, creates and updates the usage alert rule of each
# auto-replenish setting (docs/design/auto-replenish.md), and explains usage events (its
# ExplainBillLine);
# billing and notification read the event stream;
# account principals read their own account (and its rate limits), and `account_full` manages
# its own usage alerts. An enterprise master's tokens may also read its members' packages,
# subscriptions and usage (`master_reads`; never alerts, admission or a change). Admins may do
# everything; only they set rate limits.
BILLING, NOTIFICATION = ("billing",), ("billing", "notification")
POLICIES: dict[str, Policy] = {
    _rpc("ReportUsage"): policy(ADMIN, GATEWAY, regions=("region",)),
    _rpc("BatchReportUsage"): policy(ADMIN, GATEWAY, regions=("requests[].region",)),
    _rpc("CheckQuota"): policy(GATEWAY, *READERS, account="account_id", regions=("region",)),
    _rpc("GrantPackage"): policy(ADMIN, internal=BILLING, regions=("package.region",)),
    _rpc("GetPackage"): policy(*READERS, internal=BILLING, master_reads=True),
    _rpc("ListPackages"): policy(
        *READERS, internal=BILLING, account="account_id", regions=("region",), master_reads=True
    ),
    _rpc("RenewPackage"): policy(ADMIN, internal=BILLING),
    _rpc("RevokePackage"): policy(ADMIN, internal=BILLING),
    _rpc("EnableApi"): policy(ADMIN, internal=BILLING, regions=("region",)),
    _rpc("DisableApi"): policy(ADMIN, internal=BILLING, regions=("region",)),
    _rpc("ListApiSubscriptions"): policy(
        *READERS, account="account_id", regions=("region",), master_reads=True
    ),
    _rpc("GetQuotaSummary"): policy(
        *READERS, account="account_id", regions=("region",), master_reads=True
    ),
    _rpc("ExplainUsage"): policy(*READERS, internal=BILLING, master_reads=True),
    _rpc("GetUsageStats"): policy(
        *READERS, account="account_id", regions=("region",), master_reads=True
    ),
    _rpc("CreateUsageAlert"): policy(
        *OWNERS,
        internal=BILLING,
        account="usage_alert.account_id",
        regions=("usage_alert.region",),
    ),
    _rpc("GetUsageAlert"): policy(*READERS),
    _rpc("ListUsageAlerts"): policy(
        *READERS, internal=BILLING, account="account_id", regions=("region",)
    ),
    _rpc("UpdateUsageAlert"): policy(*OWNERS, internal=BILLING, account="usage_alert.account_id"),
    _rpc("DeleteUsageAlert"): policy(*OWNERS),
    _rpc("SetRateLimit"): policy(ADMIN, regions=("region",)),
    _rpc("GetRateLimit"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("WatchEvents"): policy(ADMIN, internal=NOTIFICATION),
    _rpc("GetQuotaForecast"): policy(
        *READERS, account="account_id", regions=("region",), master_reads=True
    ),
    # What-if replay: read-only; the account's own tokens, admins and billing (its
    # RecommendPackages).
    _rpc("SimulateUsage"): policy(
        *READERS, internal=BILLING, account="account_id", regions=("region",)
    ),
}


class QuotaService:
    name = "quota"
    migrations_dir = pathlib.Path(__file__).resolve().parent / "migrations"
    service_names = (SERVICE_NAME,)

    # Billing is one global deployment with one event sequence: its stream has one name, so a
    # change of ALLOT_BILLING_ADDR (a new host name for the same billing) keeps the cursor.
    BILLING_STREAM = "billing"

    def __init__(self, runtime: Runtime) -> None:
        catalog = runtime.catalog
        served = runtime.settings.quota_regions or tuple(catalog.regions)
        unknown = [r for r in served if not catalog.has_region(r)]
        if unknown:
            raise SettingsError(f"ALLOT_QUOTA_REGIONS names regions not in the catalog: {unknown}")
        too_fast = [
            a.id for a in catalog.apis.values() if (a.rate_limit_per_second or 0) > MAX_PER_SECOND
        ]
        if too_fast:
            raise SettingsError(
                f"the catalog's rate_limit_per_second is above {MAX_PER_SECOND} for: {too_fast}"
            )
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
            events=QuotaEvents(self.outbox, QuotaMetrics(runtime.metrics.registry)),
            expiring_notice=timedelta(days=runtime.settings.expiring_notice_days),
            tz=runtime.settings.tz,
        )
        runtime.metrics.track_outbox(self.outbox)
        # Follows billing's account_standing_changed events (started by start()).
        self.subscriptions = Subscriptions.of(
            runtime, "quota", (tables.consumer_cursors, tables.consumer_leases)
        )
        self.standings_consumer: StreamConsumer | None = None

    def policies(self) -> dict[str, Policy]:
        return POLICIES

    async def members_of(self, master_account_id: str) -> frozenset[str]:
        """For the interceptor: whose resources a master's tokens may read (`master_reads`)."""
        return await standings.members_of(self.context, master_account_id)

    def register(self, server: grpc.aio.Server) -> None:
        self.servicer = QuotaServicer(
            self.context, IdempotencyStore(tables.idempotency_keys), self.outbox
        )
        quota_service_pb2_grpc.add_QuotaServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Announce package activation, expiry and expiring warnings as the clock moves, and
        follow billing's standings (unless ALLOT_BILLING_ADDR is empty)."""
        self.runtime.scheduler.register(
            "quota.packages", lambda now: announce_packages(self.context, now)
        )
        # After the packages' announcements, so a forecast sees the clock's expiries.
        self.runtime.scheduler.register(
            "quota.forecasts", lambda now: forecasts.forecast_due(self.context, now)
        )
        addr = self.runtime.settings.billing_addr
        if not addr:
            log.info("ALLOT_BILLING_ADDR is empty: not following billing's account standings")
            return
        self.standings_consumer = self.subscriptions.subscribe(
            self.BILLING_STREAM,
            addr,
            billing_service_pb2_grpc.BillingServiceStub,
            billing_service_pb2.WatchEventsRequest,
            standings.EVENT_TYPES,
            self._apply_standing,
        )
        # Never awaited: while billing is not running the consumer retries with backoff in the
        # background and quota serves on (absent standings are GOOD).
        self.subscriptions.start()

    async def _apply_standing(self, uow: UnitOfWork, event: billing_pb2.BillingEvent) -> None:
        await standings.apply(self.context, uow, billing_events.standing_change(event))

    def quiesce(self) -> None:
        self.outbox.close()
        self.subscriptions.quiesce()

    async def stop(self) -> None:
        await self.subscriptions.stop()  # bounded: a consumer stuck on the database is left
        await self.servicer.close(grace=self.runtime.settings.shutdown_grace)
