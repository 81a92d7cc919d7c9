"""The reads of near misses (docs/design/deduction-order.md, "Explaining a deduction"): an
account's packages of another API in the event's region, or of the event's API in another
region, that were in force at the call. Read at explain time only; the usage hot path
never runs them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import and_, or_, select

from services.quota.adapters import tables as t
from services.quota.adapters.packages_repository import ONE_SECOND_US, to_package
from services.quota.domain.packages import Package
from shared.db import UnitOfWork
from shared.timeutil import to_epoch_us

# At most this many packages are read; the explanation lists at most MAX_NEAR_MISSES anyway.
MAX_READ = 200

_p = t.packages.c


async def packages_near(
    uow: UnitOfWork,
    *,
    account_id: str,
    region: str,
    api: str,
    regions: Iterable[str],
    occur_time: datetime,
    recorded_at: datetime,
) -> list[Package]:
    """The account's packages of ``regions`` for another API in ``region`` or for ``api`` in
    another region, created and not revoked by ``recorded_at`` and in force at
    ``occur_time``, by package id."""
    regions = sorted(set(regions))
    if not regions:
        return []
    t_us, recorded_us = to_epoch_us(occur_time), to_epoch_us(recorded_at)
    query = (
        select(t.packages)
        .where(
            _p.account_id == account_id,
            _p.region.in_(regions),
            or_(
                and_(_p.region == region, _p.api != api),
                and_(_p.region != region, _p.api == api),
            ),
            _p.create_time_us <= recorded_us,
            _p.effective_time_us <= t_us,
            _p.expire_time_us + ONE_SECOND_US > t_us,
            or_(_p.revoke_time_us.is_(None), _p.revoke_time_us > recorded_us),
        )
        .order_by(_p.package_id)
        .limit(MAX_READ)
    )
    return [to_package(r) for r in (await uow.session.execute(query)).all()]
