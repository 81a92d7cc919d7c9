"""Quota's business metrics (docs/operations.md), in the service's registry.

Each counter moves after the commit of the transaction that did the work (`uow.after_commit`),
so a transaction rolled back or retried counts once, or not at all.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from shared.db import UnitOfWork


class QuotaMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.events_deducted = Counter(
            "allot_quota_events_deducted",
            "usage events recorded that took quantity from packages",
            registry=registry,
        )
        self.deducted_quantity = Counter(
            "allot_quota_deducted_quantity", "quantity taken from packages", registry=registry
        )
        self.pay_per_use_quantity = Counter(
            "allot_quota_pay_per_use_quantity",
            "quantity recorded as pay-per-use (no package paid for it)",
            registry=registry,
        )
        self.duplicates = Counter(
            "allot_quota_usage_duplicates",
            "usage reports answered as repeats of an event already recorded",
            registry=registry,
        )
        self.threshold_crossings = Counter(
            "allot_quota_threshold_crossings",
            "usage alerts whose threshold was crossed (threshold_crossed events)",
            registry=registry,
        )

    def usage_recorded(
        self,
        uow: UnitOfWork,
        *,
        deducted_events: int,
        deducted: int,
        pay_per_use: int,
        duplicates: int,
    ) -> None:
        def count() -> None:
            self.events_deducted.inc(deducted_events)
            self.deducted_quantity.inc(deducted)
            self.pay_per_use_quantity.inc(pay_per_use)
            self.duplicates.inc(duplicates)

        uow.after_commit(count)

    def threshold_crossed(self, uow: UnitOfWork) -> None:
        uow.after_commit(lambda: self.threshold_crossings.inc())
