"""Pay-per-use cycles (table ``usage_cycles``): the calls of one account, region, API and
enterprise project in one hourly cycle, and whether they are settled."""

from __future__ import annotations

from sqlalchemy import false, insert, select, tuple_, update

from services.billing.adapters import tables as t
from services.billing.domain.usage import CycleKey, RecordedUsage, UsageCycle
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us

_c = t.usage_cycles.c
_ORDER = (_c.cycle_start_us, _c.account_id, _c.region, _c.api, _c.enterprise_project_id)


def _is(key: CycleKey) -> tuple:
    return (
        _c.account_id == key.account_id,
        _c.region == key.region,
        _c.api == key.api,
        _c.enterprise_project_id == key.enterprise_project_id,
        _c.cycle_start_us == key.cycle_start_us,
    )


async def locked_cycle(uow: UnitOfWork, key: CycleKey) -> UsageCycle | None:
    """The cycle, its row locked (None: no calls recorded for it yet)."""
    query = select(t.usage_cycles).where(*_is(key)).with_for_update()
    row = (await uow.session.execute(query)).first()
    if row is None:
        return None
    return UsageCycle(key, row.cycle_end_us, row.quantity, row.settled, row.entry_id)


async def insert_cycle(uow: UnitOfWork, key: CycleKey, cycle_end_us: int, quantity: int):
    """A new, unsettled cycle with ``quantity`` calls."""
    await uow.session.execute(
        insert(t.usage_cycles).values(
            account_id=key.account_id,
            region=key.region,
            api=key.api,
            enterprise_project_id=key.enterprise_project_id,
            cycle_start_us=key.cycle_start_us,
            cycle_end_us=cycle_end_us,
            quantity=quantity,
            settled=False,
        )
    )


async def add_calls(uow: UnitOfWork, key: CycleKey, quantity: int) -> None:
    """Add calls to a cycle and (re-)open it."""
    await uow.session.execute(
        update(t.usage_cycles)
        .where(*_is(key))
        .values(quantity=_c.quantity + quantity, settled=False)
    )


async def mark_settled(uow: UnitOfWork, key: CycleKey, entry_id: str | None = None) -> None:
    """The cycle is settled (by the ledger line ``entry_id``, when one was booked)."""
    values: dict = {"settled": True}
    if entry_id is not None:
        values["entry_id"] = entry_id
    await uow.session.execute(update(t.usage_cycles).where(*_is(key)).values(**values))


async def due_cycles(
    uow: UnitOfWork, now_us: int, after: CycleKey | None, limit: int
) -> list[CycleKey]:
    """Unsettled cycles that ended by ``now_us`` (epoch microseconds), in cycle order after
    ``after``; cycles of accounts billing does not know yet wait for them."""
    query = (
        select(*_ORDER)
        .where(
            _c.settled == false(),
            _c.cycle_end_us <= now_us,
            _c.account_id.in_(select(t.accounts.c.account_id)),
        )
        .order_by(*_ORDER)
        .limit(limit)
    )
    if after is not None:
        position = (
            after.cycle_start_us,
            after.account_id,
            after.region,
            after.api,
            after.enterprise_project_id,
        )
        query = query.where(tuple_(*_ORDER) > tuple_(*position))
    return [
        CycleKey(r.account_id, r.region, r.api, r.enterprise_project_id, r.cycle_start_us)
        for r in await uow.rows(query)
    ]


# --- the events of a cycle (ExplainBillLine) ------------------------------------------------

_e = t.pay_per_use_events.c


async def record_event(uow: UnitOfWork, key: CycleKey, usage: RecordedUsage) -> None:
    """Remember the usage event behind pay-per-use of ``key``'s cycle (once per event: a
    second delivery of the same event id changes nothing)."""
    where = (
        _e.account_id == key.account_id,
        _e.region == key.region,
        _e.api == key.api,
        _e.cycle_start_us == key.cycle_start_us,
        _e.usage_event_id == usage.usage_event_id,
    )
    if (await uow.session.execute(select(_e.quantity).where(*where))).first() is not None:
        return
    await uow.session.execute(
        insert(t.pay_per_use_events).values(
            account_id=key.account_id,
            region=key.region,
            api=key.api,
            cycle_start_us=key.cycle_start_us,
            usage_event_id=usage.usage_event_id,
            enterprise_project_id=key.enterprise_project_id,
            quantity=usage.quantity,
            occur_time_us=to_epoch_us(usage.occur_time),
        )
    )


async def line_exists(uow: UnitOfWork, account_id: str, region: str, api: str, start_us: int):
    """Whether pay-per-use was recorded for the cycle (any enterprise project)."""
    query = (
        select(_c.quantity)
        .where(
            _c.account_id == account_id,
            _c.region == region,
            _c.api == api,
            _c.cycle_start_us == start_us,
        )
        .limit(1)
    )
    return (await uow.session.execute(query)).first() is not None


async def line_events(
    uow: UnitOfWork,
    account_id: str,
    region: str,
    api: str,
    start_us: int,
    after_id: str | None,
    limit: int,
) -> list[RecordedUsage]:
    """The usage events of the cycle (every project) by usage event id, after ``after_id``."""
    query = (
        select(t.pay_per_use_events)
        .where(
            _e.account_id == account_id,
            _e.region == region,
            _e.api == api,
            _e.cycle_start_us == start_us,
        )
        .order_by(_e.usage_event_id)
        .limit(limit)
    )
    if after_id is not None:
        query = query.where(_e.usage_event_id > after_id)
    return [
        RecordedUsage(
            event_id="",
            account_id=r.account_id,
            region=r.region,
            api=r.api,
            enterprise_project_id=r.enterprise_project_id,
            quantity=r.quantity,
            occur_time=from_epoch_us(r.occur_time_us),
            usage_event_id=r.usage_event_id,
        )
        for r in await uow.rows(query)
    ]
