"""What a forecast reads (docs/design/forecasts.md): the packages not yet ended of an account,
and the billable calls of its recent whole days. Read-only; never on the usage path."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import BigInteger, literal, select

from services.quota.adapters import tables as t
from services.quota.adapters.packages_repository import ONE_SECOND_US, to_package
from services.quota.adapters.stats_queries import usage_per_bucket
from services.quota.domain.forecast import DAY_US
from services.quota.domain.packages import Package
from services.quota.domain.stats import BucketRun
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us


async def packages_not_ended(
    uow: UnitOfWork, account_id: str, regions: Iterable[str], api: str, now: datetime
) -> list[Package]:
    """The account's packages in `regions` (of `api`; '' = every API) that are not revoked
    and have not ended at `now`: in force (used up or not) or yet to begin."""
    p = t.packages.c
    query = select(t.packages).where(
        p.account_id == account_id,
        p.region.in_(sorted(set(regions))),
        p.revoke_time_us.is_(None),
        # Valid up to and including the second expire_time.
        p.expire_time_us > literal(to_epoch_us(now) - ONE_SECOND_US, BigInteger),
    )
    if api:
        query = query.where(p.api == api)
    rows = (await uow.session.execute(query.order_by(p.region, p.api, p.package_id))).all()
    return [to_package(row) for row in rows]


def _day_start_us(day: date) -> int:
    return to_epoch_us(datetime(day.year, day.month, day.day, tzinfo=UTC))


async def billable_calls_by_day(
    uow: UnitOfWork, account_id: str, region: str, api: str, first: date, last: date
) -> dict[date, int]:
    """Billable calls per UTC day of [first, last] (days without any are left out)."""
    start_us = _day_start_us(first)
    end_us = _day_start_us(last + timedelta(days=1))
    rows = await usage_per_bucket(
        uow,
        account_id=account_id,
        region=region,
        api=api,
        start_us=start_us,
        end_us=end_us,
        runs=[BucketRun(start_us, DAY_US)],
    )
    return {from_epoch_us(bucket_us).date(): ok for bucket_us, _, ok, *_ in rows if ok}


async def used_before(uow: UnitOfWork, account_id: str, region: str, api: str, day: date) -> bool:
    """Whether the scope had a billable call before the UTC day `day`."""
    u = t.usage_events.c
    query = (
        select(u.event_id)
        .where(
            u.account_id == account_id,
            u.region == region,
            u.api == api,
            u.occur_time_us < literal(_day_start_us(day), BigInteger),
            u.billable.is_(True),
        )
        .limit(1)
    )
    return (await uow.session.execute(query)).first() is not None
