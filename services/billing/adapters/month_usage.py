"""Billing's own pay-per-use figures of an account in a month, per region and API, for the
account overview: the calls recorded in ``usage_cycles`` and the charges of the settled
cycles on the ledger (docs/design/billing.md, "Account overview")."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select

from services.billing.adapters import tables as t
from services.billing.domain.bills import BillLineKind
from services.billing.domain.overview import MonthUsage
from shared.db import UnitOfWork
from shared.timeutil import to_epoch_us

_c = t.usage_cycles.c
_lg = t.ledger.c


async def month_usage(
    uow: UnitOfWork, account_id: str, start: datetime, end: datetime
) -> dict[tuple[str, str], MonthUsage]:
    """``(region, api) -> MonthUsage`` of the cycles starting in ``[start, end)``, every
    enterprise project together."""
    low, high = to_epoch_us(start), to_epoch_us(end)
    calls = await uow.rows(
        select(_c.region, _c.api, func.sum(_c.quantity).label("quantity"))
        .where(_c.account_id == account_id, _c.cycle_start_us >= low, _c.cycle_start_us < high)
        .group_by(_c.region, _c.api)
    )
    charges = await uow.rows(
        select(_lg.region, _lg.api, func.sum(_lg.amount_micros).label("amount"))
        .where(
            _lg.account_id == account_id,
            # Settled after the cycle ended, so after the month began: keeps the index range.
            _lg.occur_time_us >= low,
            _lg.kind == int(BillLineKind.PAY_PER_USE),
            _lg.cycle_start_us >= low,
            _lg.cycle_start_us < high,
        )
        .group_by(_lg.region, _lg.api)
    )
    quantities = {(r.region, r.api): int(r.quantity) for r in calls}
    # Ledger amounts are balance effects (negative for charges); the overview shows the cost.
    costs = {(r.region, r.api): -int(r.amount) for r in charges}
    return {
        key: MonthUsage(quantities.get(key, 0), costs.get(key, 0))
        for key in set(quantities) | set(costs)
    }


async def settled_by_region(
    uow: UnitOfWork, account_id: str, start: datetime, end: datetime
) -> dict[str, int]:
    """``region -> micros`` the account's own settled pay-per-use cycles starting in
    ``[start, end)`` cost (non-negative): what a spending cap counts of other regions
    (docs/design/spending-cap.md)."""
    low, high = to_epoch_us(start), to_epoch_us(end)
    rows = await uow.rows(
        select(_lg.region, func.sum(_lg.amount_micros).label("amount"))
        .where(
            _lg.account_id == account_id,
            _lg.occur_time_us >= low,
            _lg.kind == int(BillLineKind.PAY_PER_USE),
            _lg.cycle_start_us >= low,
            _lg.cycle_start_us < high,
        )
        .group_by(_lg.region)
    )
    return {r.region: -int(r.amount) for r in rows if int(r.amount)}
