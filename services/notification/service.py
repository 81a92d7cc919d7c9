"""The notification service as the shared bootstrap runs it: policies, servicer, consumers of
quota's streams, and the delivery worker."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from datetime import timedelta

import grpc
from allot.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from allot.notification.v1 import notification_pb2, notification_service_pb2
from allot.notification.v1 import notification_service_pb2_grpc as notification_grpc
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc

from services.notification.adapters import tables
from services.notification.adapters.events import NotificationEvents
from services.notification.adapters.metrics import NotificationMetrics
from services.notification.adapters.senders import build_senders, close_senders
from services.notification.adapters.sources import (
    BILLING_EVENT_TYPES,
    QUOTA_EVENT_TYPES,
    from_billing_event,
    from_quota_event,
)
from services.notification.api.servicer import NotificationServicer
from services.notification.app import deliveries, notifications
from services.notification.app.context import NotificationContext
from services.notification.domain.delivery import RetryPolicy
from services.notification.domain.messages import compose
from shared.auth import ADMIN, OWNERS, READERS, Policy, policy
from shared.clock import KickedWork
from shared.db import UnitOfWork
from shared.errors import Unavailable
from shared.idempotency import IdempotencyStore
from shared.outbox import Outbox
from shared.server import Runtime
from shared.streams.subscriptions import Subscriptions

log = logging.getLogger("allot.notification")

SERVICE_NAME = notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name


def _rpc(method: str) -> str:
    return f"/{SERVICE_NAME}/{method}"


# Who may call what (docs/security.md; the table is complete: a method missing here is refused).
# Account principals manage their own contacts and read their own notifications; admins
# everything. Billing (`internal`) only asks CheckAudience.
POLICIES: dict[str, Policy] = {
    _rpc("CreateContact"): policy(*OWNERS, account="contact.account_id"),
    _rpc("GetContact"): policy(*READERS),
    _rpc("ListContacts"): policy(*READERS, account="account_id"),
    _rpc("UpdateContact"): policy(*OWNERS, account="contact.account_id"),
    _rpc("DeleteContact"): policy(*OWNERS),
    _rpc("ListNotifications"): policy(*READERS, account="account_id"),
    _rpc("WatchNotifications"): policy(*READERS, account="account_id"),
    _rpc("RetryDelivery"): policy(*OWNERS),
    _rpc("SendTestNotification"): policy(*OWNERS),
    # Billing's account overview asks who would hear a usage alert (docs/design/billing.md,
    # "Account overview").
    _rpc("CheckAudience"): policy(ADMIN, internal=("billing",)),
}


class NotificationService:
    name = "notification"
    migrations_dir = pathlib.Path(__file__).resolve().parent / "migrations"
    service_names = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.outbox = Outbox(
            runtime.db,
            tables.outbox_events,
            tables.outbox_counter,
            notification_pb2.NotificationEvent,
        )
        self.context = NotificationContext(
            db=runtime.db,
            clock=runtime.clock,
            outbox=self.outbox,
            events=NotificationEvents(self.outbox),
            retry=RetryPolicy(
                max_attempts=settings.delivery_max_attempts,
                first_delay=timedelta(seconds=settings.delivery_backoff),
                factor=settings.delivery_backoff_factor,
            ),
            private_webhooks=settings.webhook_allow_private,
            claim=timedelta(seconds=settings.delivery_claim),
            metrics=NotificationMetrics(runtime.metrics.registry),
        )
        runtime.metrics.track_outbox(self.outbox)
        runtime.metrics.on_scrape(
            "deliveries_unsent", self.context.metrics.unsent_refresher(runtime.db)
        )
        # Deliveries: retries come due with the clock, new notifications are kicked.
        self._deliveries = KickedWork(
            runtime.clock,
            lambda now: deliveries.deliver_due(self.context, now),
            "delivery round",
        )
        self._tasks: list[asyncio.Task] = []
        # One notification per relevant event of quota's and billing's streams.
        self.subscriptions = Subscriptions.of(
            runtime, "notification", (tables.consumer_cursors, tables.consumer_leases)
        )

    def policies(self) -> dict[str, Policy]:
        return POLICIES

    def register(self, server: grpc.aio.Server) -> None:
        notification_grpc.add_NotificationServiceServicer_to_server(
            NotificationServicer(
                self.context, IdempotencyStore(tables.idempotency_keys), self.kick
            ),
            server,
        )

    def kick(self) -> None:
        """Deliver now: something became due (a new notification, a retry asked for)."""
        self._deliveries.kick()

    async def start(self) -> None:
        self.context.senders = build_senders(self.runtime.settings)
        # Retries come due with the clock (AdvanceTime on the manual one).
        self.runtime.scheduler.register("notification.deliveries", self._deliveries.run)
        self._tasks.append(asyncio.create_task(self._deliveries.loop(), name="deliveries"))
        probe = self.runtime.settings.delivery_probe
        if probe:
            self._tasks.append(asyncio.create_task(self._probe(probe), name="delivery-probe"))
        for addr in self.runtime.settings.quota_addresses(list(self.runtime.catalog.regions)):
            self.subscriptions.subscribe(
                f"quota@{addr}",
                addr,
                quota_service_pb2_grpc.QuotaServiceStub,
                quota_service_pb2.WatchEventsRequest,
                QUOTA_EVENT_TYPES,
                self._taking(from_quota_event),
            )
        if self.runtime.settings.billing_addr:
            # Billing is one global deployment: one stream, named so a new address keeps it.
            self.subscriptions.subscribe(
                "billing",
                self.runtime.settings.billing_addr,
                billing_service_pb2_grpc.BillingServiceStub,
                billing_service_pb2.WatchEventsRequest,
                BILLING_EVENT_TYPES,
                self._taking(from_billing_event),
            )
        self.subscriptions.start()

    async def _probe(self, every: int) -> None:
        """Every `every` seconds of wall time, probe each channel whose deliveries wait for a
        retry; a probe that gets through wakes the rest, and this round sends them."""
        while True:
            await asyncio.sleep(every)
            try:
                if await deliveries.probe_held_back(self.context):
                    self.kick()
            except Unavailable as exc:  # the database is away: health says so; try next round
                log.warning("delivery probe skipped: %s", exc)
            except Exception:  # keep probing; the next round starts from the database
                log.exception("delivery probe failed")

    def _taking(self, to_source):
        """One notification per relevant event of a stream, taken in the cursor's transaction."""

        async def apply(uow: UnitOfWork, event) -> None:
            source = to_source(event)
            if source is None:
                return
            await notifications.take(
                self.context, uow, compose(source, self.runtime.settings.tz), event.event_id
            )
            uow.after_commit(self.kick)

        return apply

    def quiesce(self) -> None:
        self.outbox.close()
        self.subscriptions.quiesce()

    async def stop(self) -> None:
        await self.subscriptions.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await close_senders(self.context.senders)
