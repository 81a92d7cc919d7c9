"""The ledger: one row per change of a balance, signed by its effect, read back as bill lines.

A row is a ``domain.bills.BillLine``: ``amount_micros`` is the signed effect on the paying
balance (top-ups and refunds +, charges −), ``paying_account_id`` the account whose balance
moved. A pay-per-use row also holds its cycle and its tier breakdown as JSON.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal

from sqlalchemy import and_, func, insert, or_, select

from services.billing.adapters import tables as t
from services.billing.domain.bills import BillLine, BillLineKind
from services.billing.domain.usage import CycleKey
from shared.db import UnitOfWork
from shared.ids import new_id
from shared.pricing import TierCharge
from shared.timeutil import from_epoch_us, to_epoch_us

_lg = t.ledger.c
_PPU = int(BillLineKind.PAY_PER_USE)


def tiers_json(tiers: tuple[TierCharge, ...]) -> str:
    # The stored key stays "amount_micros": rows written before the name "price" read the same.
    return json.dumps(
        [
            {
                "tier": charge.tier,
                "quantity": charge.quantity,
                "unit_price": str(charge.unit_price),
                "amount_micros": charge.price_micros,
            }
            for charge in tiers
        ]
    )


def _tiers(text: str) -> tuple[TierCharge, ...]:
    return tuple(
        TierCharge(
            int(item["tier"]),
            int(item["quantity"]),
            Decimal(item["unit_price"]),
            int(item["amount_micros"]),
        )
        for item in json.loads(text or "[]")
    )


async def book(uow: UnitOfWork, line: BillLine) -> str:
    """Write ``line`` as a ledger row; returns its entry id."""
    entry_id = new_id("led")
    values = {
        "entry_id": entry_id,
        "account_id": line.account_id,
        "paying_account_id": line.payer,
        "kind": int(line.kind),
        "amount_micros": line.amount_micros,
        "region": line.region,
        "api": line.api,
        "enterprise_project_id": line.enterprise_project_id,
        "quantity": line.quantity,
        "description": line.description[:500],
        "occur_time_us": to_epoch_us(line.occur_time),
    }
    if line.order_id:
        values["order_id"] = line.order_id
    if line.kind == BillLineKind.PAY_PER_USE:
        assert line.cycle_start is not None and line.cycle_end is not None
        values.update(
            cycle_start_us=to_epoch_us(line.cycle_start),
            cycle_end_us=to_epoch_us(line.cycle_end),
            tiers=tiers_json(line.tiers),
        )
    await uow.session.execute(insert(t.ledger).values(**values))
    return entry_id


def to_line(row) -> BillLine:
    """A ledger row as a bill line."""
    kind = BillLineKind(row.kind)
    payer = "" if row.paying_account_id == row.account_id else row.paying_account_id
    common = {
        "kind": kind,
        "account_id": row.account_id,
        "payer_account_id": payer,
        "amount_micros": row.amount_micros,
        "occur_time": from_epoch_us(row.occur_time_us),
        "region": row.region,
        "api": row.api,
        "enterprise_project_id": row.enterprise_project_id,
        "quantity": row.quantity,
        "order_id": row.order_id,
        "description": row.description,
    }
    if kind != BillLineKind.PAY_PER_USE:
        return BillLine(**common)
    tiers = _tiers(row.tiers)
    return BillLine(
        **common,
        cycle_start=from_epoch_us(row.cycle_start_us),
        cycle_end=from_epoch_us(row.cycle_end_us),
        tiers=tiers,
        free_quantity=row.quantity - sum(charge.quantity for charge in tiers),
    )


async def billed_quantity(uow: UnitOfWork, key: CycleKey) -> int:
    """Calls of the cycle already on ledger lines (a re-opened cycle)."""
    total = await uow.session.execute(
        select(func.coalesce(func.sum(_lg.quantity), 0)).where(
            _lg.account_id == key.account_id,
            _lg.kind == _PPU,
            _lg.region == key.region,
            _lg.api == key.api,
            _lg.enterprise_project_id == key.enterprise_project_id,
            _lg.cycle_start_us == key.cycle_start_us,
        )
    )
    return int(total.scalar_one())


async def rated_in_month(
    uow: UnitOfWork, account_id: str, region: str, api: str, start: datetime, end: datetime
) -> int:
    """The account's pay-per-use calls of the region and API already rated in cycles starting
    in ``[start, end)`` (a month), every enterprise project, free calls included."""
    low, high = to_epoch_us(start), to_epoch_us(end)
    total = await uow.session.execute(
        select(func.coalesce(func.sum(_lg.quantity), 0)).where(
            _lg.account_id == account_id,
            # Settled after the cycle ended, so after the month began: keeps the index range.
            _lg.occur_time_us >= low,
            _lg.kind == _PPU,
            _lg.region == region,
            _lg.api == api,
            _lg.cycle_start_us >= low,
            _lg.cycle_start_us < high,
        )
    )
    return int(total.scalar_one())


def _bill_time():
    """Where a ledger line falls in the calendar: its cycle's start, else its booking."""
    return func.coalesce(_lg.cycle_start_us, _lg.occur_time_us)


async def effects_before(uow: UnitOfWork, payer_id: str, before: datetime) -> int:
    """The sum of the signed effects on ``payer_id``'s balance placed before ``before``."""
    total = await uow.session.execute(
        select(func.coalesce(func.sum(_lg.amount_micros), 0)).where(
            _lg.paying_account_id == payer_id, _bill_time() < to_epoch_us(before)
        )
    )
    return int(total.scalar_one())


async def month_lines(
    uow: UnitOfWork, account_id: str, start: datetime, end: datetime
) -> list[BillLine]:
    """The lines placed in ``[start, end)`` that are the account's or that it paid."""
    start_us, end_us = to_epoch_us(start), to_epoch_us(end)
    rows = (
        await uow.session.execute(
            select(t.ledger).where(
                or_(_lg.account_id == account_id, _lg.paying_account_id == account_id),
                # Booked at or after the start of the month (a cycle is settled after it ends).
                _lg.occur_time_us >= start_us,
                and_(_bill_time() >= start_us, _bill_time() < end_us),
            )
        )
    ).all()
    return [to_line(row) for row in rows]


async def charged_for(
    uow: UnitOfWork, account_id: str, region: str, api: str, start: datetime, end: datetime
) -> int:
    """What `account_id` was charged for `region` and `api` by lines placed in [start, end)
    (a pay-per-use line by its cycle's start, others by their booking, as on bills): every
    line but top-ups, negated (charges are negative, refunds positive)."""
    total = await uow.session.execute(
        select(func.coalesce(func.sum(_lg.amount_micros), 0)).where(
            _lg.account_id == account_id,
            _lg.region == region,
            _lg.api == api,
            _lg.kind != int(BillLineKind.TOP_UP),
            _bill_time() >= to_epoch_us(start),
            _bill_time() < to_epoch_us(end),
        )
    )
    return -int(total.scalar_one())
