"""Notification's business metrics (docs/operations.md), in the service's registry.

Delivery outcomes are counted once their transaction has committed; the deliveries still
pending or given up are counted on scrape, by two indexed counts (`ix_deliveries_due`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import func, select

from services.notification.adapters import tables as t
from services.notification.domain.delivery import FAILED, PENDING
from shared.db import Database, UnitOfWork

UNSENT = {"PENDING": PENDING, "FAILED": FAILED}


class NotificationMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.deliveries = Counter(
            "allot_notification_deliveries",
            "deliveries that ended: SENT, or FAILED after the last attempt (or not retryable)",
            ["channel", "state"],
            registry=registry,
        )
        self.retries = Counter(
            "allot_notification_delivery_retries",
            "failed attempts scheduled to be tried again",
            ["channel"],
            registry=registry,
        )
        self.unsent = Gauge(
            "allot_notification_deliveries_unsent",
            "deliveries waiting to be sent (PENDING) or given up (FAILED), now",
            ["state"],
            registry=registry,
        )

    def attempt(self, channel: str, outcome: str) -> None:
        """After the outcome of an attempt committed: SENT, RETRY or FAILED."""
        if outcome == "RETRY":
            self.retries.labels(channel).inc()
        else:
            self.deliveries.labels(channel, outcome).inc()

    def unsent_refresher(self, db: Database):
        """For `Metrics.on_scrape`: the PENDING and FAILED counts."""

        async def refresh() -> None:
            async def work(uow: UnitOfWork) -> dict[str, int]:
                counts = {}
                for name, state in UNSENT.items():
                    query = select(func.count()).where(t.deliveries.c.state == state)
                    counts[name] = (await uow.session.execute(query)).scalar_one()
                return counts

            for name, count in (await db.read(work)).items():
                self.unsent.labels(name).set(count)

        return refresh
