"""What billing's use cases run against."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from services.billing.adapters.events import BillingEvents
from services.billing.adapters.notification_client import NotificationClient
from services.billing.adapters.quota_client import QuotaClient
from shared.catalog import Catalog
from shared.clock import Clock
from shared.db import Database
from shared.outbox import Outbox


@dataclass(frozen=True)
class BillingContext:
    db: Database
    clock: Clock
    catalog: Catalog
    outbox: Outbox
    tz: ZoneInfo
    quota: QuotaClient
    events: BillingEvents
    # Asked who hears usage alerts (the account overview); None: not configured.
    notification: NotificationClient | None = None

    def now(self) -> datetime:
        return self.clock.now()

    def check_region(self, region: str, required: bool = True) -> str:
        """A catalog region (billing is global: every catalog region is billed here)."""
        return self.catalog.check_region(region, required=required)

    def check_api(self, api: str, required: bool = True) -> str:
        """A catalog API."""
        return self.catalog.check_api(api, required=required)
