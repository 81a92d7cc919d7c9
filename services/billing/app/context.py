"""What billing's use cases run against."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from services.billing.adapters.events import BillingEvents
from services.billing.adapters.quota_client import QuotaClient
from shared.catalog import Catalog
from shared.clock import Clock
from shared.db import Database
from shared.errors import InvalidArgument
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

    def now(self) -> datetime:
        return self.clock.now()

    def check_region(self, region: str, required: bool = True) -> str:
        """A catalog region (billing is global: every catalog region is billed here)."""
        if not region:
            if required:
                raise InvalidArgument("region", "region is required")
            return region
        if not self.catalog.has_region(region):
            raise InvalidArgument("region", f"unknown region {region!r}", reason="UNKNOWN_REGION")
        return region

    def check_api(self, api: str, required: bool = True) -> str:
        if not api:
            if required:
                raise InvalidArgument("api", "api is required")
            return api
        if not self.catalog.has_api(api):
            raise InvalidArgument("api", f"unknown api {api!r}", reason="UNKNOWN_API")
        return api
