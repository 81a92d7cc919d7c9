"""The billing service as the shared bootstrap runs it: its policy table and servicer."""

from __future__ import annotations

import asyncio
import logging
import pathlib

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc

from services.billing.adapters import tables
from services.billing.adapters.events import BillingEvents
from services.billing.adapters.metrics import BillingMetrics
from services.billing.adapters.notification_client import NotificationClient
from services.billing.adapters.quota_client import QuotaClient
from services.billing.api.servicer import BillingServicer
from services.billing.app import accounts, fulfilment, renewals, replenish, standing
from services.billing.app.context import BillingContext
from services.billing.pay_per_use import PayPerUse
from shared.auth import ADMIN, OWNERS, READERS, Policy, policy
from shared.idempotency import IdempotencyStore
from shared.outbox import Outbox
from shared.server import Runtime

log = logging.getLogger("allot.billing")

SERVICE_NAME = billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name


def _rpc(method: str) -> str:
    return f"/{SERVICE_NAME}/{method}"


# Who may call what (docs/security.md; the table is complete: a method missing here is refused).
# Admins create accounts and top them up (payments arrive through an operator's backend);
# account principals read their own account and, with account_full, buy and manage packages;
# quota and notification (`internal`) read the event stream. Gateways call nothing here.
# An enterprise master's tokens also read its members' accounts, orders and bills
# (`master_reads`; ListAccounts{master_account_id} lists them) but change nothing of theirs.
POLICIES: dict[str, Policy] = {
    _rpc("CreateAccount"): policy(ADMIN),
    _rpc("GetAccount"): policy(*READERS, master_reads=True),
    _rpc("ListAccounts"): policy(*READERS),
    _rpc("UpdateAccount"): policy(*OWNERS, account="account.account_id"),
    _rpc("TopUp"): policy(ADMIN),
    _rpc("SetBalanceAlert"): policy(*OWNERS, account="account_id"),
    _rpc("SetSpendingCap"): policy(*OWNERS, account="account_id"),
    _rpc("ListOffers"): policy(*READERS),
    _rpc("ListPriceTiers"): policy(*READERS),
    _rpc("PurchasePackage"): policy(*OWNERS, account="account_id", regions=("region",)),
    _rpc("RenewPackage"): policy(*OWNERS, account="account_id"),
    _rpc("RenewPackages"): policy(*OWNERS, account="account_id"),
    _rpc("SetAutoRenew"): policy(*OWNERS),
    _rpc("GetAutoRenew"): policy(*READERS),
    _rpc("CancelOrder"): policy(*OWNERS),
    _rpc("GetOrder"): policy(*READERS, master_reads=True),
    _rpc("ListOrders"): policy(*READERS, account="account_id", master_reads=True),
    _rpc("SubscribeApi"): policy(*OWNERS, account="account_id", regions=("region",)),
    _rpc("UnsubscribeApi"): policy(*OWNERS, account="account_id", regions=("region",)),
    _rpc("GetBill"): policy(*READERS, account="account_id", master_reads=True),
    _rpc("ExportBill"): policy(*READERS, account="account_id", master_reads=True),
    _rpc("GetAccountOverview"): policy(*READERS, account="account_id"),
    # What-if: read-only, the account's own tokens and admins (docs/design/what-if.md).
    _rpc("RecommendPackages"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("ListAccountPackages"): policy(*READERS, account="account_id", regions=("region",)),
    _rpc("ExplainBillLine"): policy(
        *READERS, account="account_id", regions=("region",), master_reads=True
    ),
    _rpc("WatchEvents"): policy(ADMIN, internal=("quota", "notification")),
    _rpc("SetAutoReplenish"): policy(*OWNERS, account="account_id", regions=("region",)),
    _rpc("GetAutoReplenish"): policy(*READERS, account="account_id", regions=("region",)),
}


class BillingService:
    name = "billing"
    migrations_dir = pathlib.Path(__file__).resolve().parent / "migrations"
    service_names = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.outbox = Outbox(
            runtime.db, tables.outbox_events, tables.outbox_counter, billing_pb2.BillingEvent
        )
        self.context = BillingContext(
            db=runtime.db,
            clock=runtime.clock,
            catalog=runtime.catalog,
            outbox=self.outbox,
            tz=runtime.settings.tz,
            quota=QuotaClient(
                runtime.settings.quota_endpoint_map(list(runtime.catalog.regions)),
                runtime.channels,
                runtime.signer,
            ),
            events=BillingEvents(self.outbox, BillingMetrics(runtime.metrics.registry)),
            notification=NotificationClient(
                runtime.settings.notification_addr, runtime.channels, runtime.signer
            ),
        )

        runtime.metrics.track_outbox(self.outbox)
        self._tasks: list[asyncio.Task] = []
        self.pay_per_use: PayPerUse | None = None

    def policies(self) -> dict[str, Policy]:
        return POLICIES

    async def members_of(self, master_account_id: str) -> frozenset[str]:
        """For the interceptor: whose resources a master's tokens may read (`master_reads`)."""
        return await accounts.members_of(self.context, master_account_id)

    def register(self, server: grpc.aio.Server) -> None:
        billing_service_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingServicer(self.context, IdempotencyStore(tables.idempotency_keys)), server
        )

    async def start(self) -> None:
        # Orders quota could not take yet are offered again every few (wall-clock) seconds:
        # quota coming back must not wait for anyone to move a manual clock.
        self._tasks.append(asyncio.create_task(self._fulfil_pending(), name="pending-orders"))
        # Pay-per-use: a consumer of each quota deployment's events and the hourly settlement
        # as due work; then the arrears clock, so one pass of due work sees a grace it started.
        if self.pay_per_use is None:
            self.pay_per_use = PayPerUse(self.runtime, self.context)
            self.pay_per_use.start()
        standing.wire_standing(self)
        # Auto-renewal after the arrears clock: an attempt sees the standing of its instant.
        self.runtime.scheduler.register(
            "billing.renewals", lambda now: renewals.renew_due(self.context, now)
        )
        # Auto-replenish rules to switch on or re-arm (a new month after the month's limit).
        self.runtime.scheduler.register(
            "billing.replenish", lambda now: replenish.rearm_due(self.context, now)
        )

    async def _fulfil_pending(self) -> None:
        while True:
            try:
                await fulfilment.fulfil_pending(self.context)
            except Exception:  # keep retrying; the next round starts from the database
                log.exception("fulfilling pending orders failed")
            await asyncio.sleep(fulfilment.RETRY_PENDING.total_seconds())

    def quiesce(self) -> None:
        self.outbox.close()
        if self.pay_per_use is not None:
            self.pay_per_use.quiesce()

    async def stop(self) -> None:
        if self.pay_per_use is not None:
            await self.pay_per_use.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
