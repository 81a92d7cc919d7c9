"""Clock-driven work: announce what the clock did to packages.

Package states are computed from the clock on every read; this work makes the outbox follow:
activation and expiry become `package_state_changed` events (and re-arm the scope's alerts,
since the aggregate total changed), and a package with quantity left gets one
`package_expiring` warning `expiring_notice` before it expires. On the manual clock it runs
before `AdvanceTime` returns; on the system clock every few seconds.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timedelta

from services.quota.adapters import packages_repository as packages_repo
from services.quota.app import alerts
from services.quota.app.context import QuotaContext
from services.quota.domain.packages import IN_FORCE
from shared.db import UnitOfWork

# Packages handled per transaction; a pass repeats until less than this is due.
CHUNK = 100
ONE_DAY = timedelta(days=1)


async def announce_packages(ctx: QuotaContext, now: datetime) -> int:
    """Everything due at `now`, in transactions of at most CHUNK packages."""
    done = 0
    for work in (_announce_states, _announce_expiring):
        while True:
            count = await ctx.db.transaction(lambda uow, work=work: work(ctx, uow, now))
            done += count
            if count < CHUNK:
                break
    return done


async def _announce_states(ctx: QuotaContext, uow: UnitOfWork, now: datetime) -> int:
    records = await packages_repo.due_announcements(uow, now, CHUNK)
    scopes = set()
    for record in records:
        state = record.package.state_at(now)
        announced = dataclasses.replace(record, announced_state=state)
        ctx.events.package_state_changed(uow, announced, record.announced_state, now)
        await packages_repo.save_package(uow, announced)
        # Only a package that entered or left the aggregate in force re-arms alerts (one that
        # started and ended between two clock moves never counted).
        if (state in IN_FORCE) != (record.announced_state in IN_FORCE):
            scopes.add((record.package.account_id, record.package.region, record.package.api))
    for account_id, region, api in sorted(scopes):
        await alerts.reevaluate(ctx, uow, account_id, region, [api], now)
    return len(records)


async def _announce_expiring(ctx: QuotaContext, uow: UnitOfWork, now: datetime) -> int:
    records = await packages_repo.due_expiring(uow, now, ctx.expiring_notice, CHUNK)
    for record in records:
        left = record.package.expire_time + timedelta(seconds=1) - now
        days_left = math.ceil(left / ONE_DAY)
        warned = dataclasses.replace(record, expiring_announced=True)
        ctx.events.package_expiring(uow, warned, days_left, now)
        await packages_repo.save_package(uow, warned)
    return len(records)
