"""Billing's business metrics (docs/operations.md), in the service's registry.

Each moves after the commit of the transaction that did the work (`uow.after_commit`), so a
transaction rolled back or retried counts once, or not at all.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.db import UnitOfWork

# Settlement runs hourly cycles as due work: its lag ranges from seconds to hours.
LAG_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)


class BillingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.orders = Counter(
            "allot_billing_orders",
            "orders entering a state (PENDING when placed, then FULFILLED, FAILED or CANCELLED)",
            ["kind", "state"],
            registry=registry,
        )
        self.settlement_lag = Histogram(
            "allot_billing_settlement_lag_seconds",
            "from the end of a pay-per-use cycle to the booking of its line (service clock)",
            buckets=LAG_BUCKETS,
            registry=registry,
        )

    def order_entered(self, uow: UnitOfWork, kind: str, state: str) -> None:
        uow.after_commit(lambda: self.orders.labels(kind, state).inc())

    def settled(self, uow: UnitOfWork, lag_seconds: float) -> None:
        uow.after_commit(lambda: self.settlement_lag.observe(max(0.0, lag_seconds)))
