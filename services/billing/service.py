"""The billing service as the shared bootstrap runs it: its policy table and servicer."""

from __future__ import annotations

import pathlib

import grpc
from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc

from services.billing.adapters import tables
from services.billing.adapters.quota_client import QuotaClient
from services.billing.api.servicer import BillingServicer
from services.billing.app.context import BillingContext
from shared.auth import OPERATORS, OWNERS, READERS, Policy, TokenVerifier, policy
from shared.idempotency import IdempotencyStore
from shared.outbox import Outbox
from shared.server import Runtime

SERVICE_NAME = billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name


def _rpc(method: str) -> str:
    return f"/{SERVICE_NAME}/{method}"


# Operators create accounts and top them up (payments arrive through a backend); account
# principals read their own account and, with account_full, buy and manage packages.
POLICIES: dict[str, Policy] = {
    _rpc("CreateAccount"): policy(*OPERATORS),
    _rpc("GetAccount"): policy(*READERS),
    _rpc("ListAccounts"): policy(*READERS),
    _rpc("TopUp"): policy(*OPERATORS),
    _rpc("SetBalanceAlert"): policy(*OWNERS, account="account_id"),
    _rpc("ListOffers"): policy(*READERS),
    _rpc("ListPriceTiers"): policy(*READERS),
    _rpc("PurchasePackage"): policy(*OWNERS, account="account_id", regions=("region",)),
    _rpc("RenewPackage"): policy(*OWNERS, account="account_id"),
    _rpc("SetAutoRenew"): policy(*OWNERS),
    _rpc("CancelOrder"): policy(*OWNERS),
    _rpc("GetOrder"): policy(*READERS),
    _rpc("ListOrders"): policy(*READERS, account="account_id"),
    _rpc("SubscribeApi"): policy(*OWNERS, account="account_id", regions=("region",)),
    _rpc("UnsubscribeApi"): policy(*OWNERS, account="account_id", regions=("region",)),
    _rpc("GetBill"): policy(*READERS, account="account_id"),
    _rpc("ExportBill"): policy(*READERS, account="account_id"),
    _rpc("WatchEvents"): policy(*OPERATORS),
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
                TokenVerifier(runtime.settings.signing_secret()),
            ),
        )

    def policies(self) -> dict[str, Policy]:
        return POLICIES

    def register(self, server: grpc.aio.Server) -> None:
        billing_service_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingServicer(self.context, IdempotencyStore(tables.idempotency_keys)), server
        )

    async def start(self) -> None:
        """Orders, settlement and arrears (clock-driven work) arrive with the billing issue."""

    def quiesce(self) -> None:
        self.outbox.close()

    async def stop(self) -> None:
        await self.context.quota.close()
