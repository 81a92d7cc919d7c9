"""What notification's use cases run against."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from services.notification.adapters.events import NotificationEvents
from services.notification.adapters.metrics import NotificationMetrics
from services.notification.domain.delivery import RetryPolicy
from shared.clock import Clock
from shared.db import Database
from shared.outbox import Outbox


@dataclass
class NotificationContext:
    db: Database
    clock: Clock
    outbox: Outbox  # WatchNotifications reads it; use cases stage events through `events`
    events: NotificationEvents
    retry: RetryPolicy
    senders: dict = field(default_factory=dict)  # Channel -> sender (adapters/senders.py)
    # ALLOT_WEBHOOK_ALLOW_PRIVATE: webhooks may also go to internal hosts and to any port.
    private_webhooks: bool = False
    # ALLOT_DELIVERY_CLAIM_SECONDS: how long (wall clock) a delivery being sent stays claimed;
    # longer than any send may take (each sender bounds its exchange).
    claim: timedelta = timedelta(minutes=2)
    # Delivery outcomes (docs/operations.md); a registry of its own unless the service's.
    metrics: NotificationMetrics = field(default_factory=NotificationMetrics)

    def now(self):
        return self.clock.now()
