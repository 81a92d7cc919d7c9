"""What quota's use cases run against, and the request checks they all share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from services.quota.adapters.events import QuotaEvents
from services.quota.domain.deduction import DeductionPolicy
from shared.catalog import Catalog
from shared.clock import Clock
from shared.db import Database
from shared.errors import FailedPrecondition


@dataclass(frozen=True)
class QuotaContext:
    db: Database
    clock: Clock
    catalog: Catalog
    served_regions: tuple[str, ...]
    policy: DeductionPolicy
    events: QuotaEvents
    # The billing time zone: day buckets of usage statistics start at its midnight.
    tz: ZoneInfo = ZoneInfo("Asia/Shanghai")
    # package_expiring goes out this long before a package expires with quantity left.
    expiring_notice: timedelta = timedelta(days=7)

    def now(self) -> datetime:
        return self.clock.now()

    def check_region(self, region: str, field: str = "region") -> str:
        """A region the catalog knows and this process serves."""
        self.catalog.check_region(region, field)
        if region not in self.served_regions:
            raise FailedPrecondition(
                "REGION_NOT_SERVED",
                f"region {region!r} is not served by this quota process",
                region=region,
                served=",".join(self.served_regions),
            )
        return region

    def check_api(self, api: str, field: str = "api") -> str:
        """An API the catalog knows."""
        return self.catalog.check_api(api, field)

    def regions_or_all(
        self, region: str, visible: tuple[str, ...] | None = None, field: str = "region"
    ) -> tuple[str, ...]:
        """One checked region, or every served region (of `visible`, if given) when empty."""
        if region:
            return (self.check_region(region, field),)
        if visible is None:
            return self.served_regions
        return tuple(r for r in self.served_regions if r in visible)
