"""Auto-replenish settings and the crossings they acted on (tables ``auto_replenish`` and
``auto_replenish_crossings``): rows <-> ``domain.replenish`` values, in the caller's unit of
work."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, insert, select, update

from services.billing.adapters import tables as t
from services.billing.domain.replenish import AutoReplenish
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us

_s = t.auto_replenish.c
_c = t.auto_replenish_crossings.c


def _to_setting(row) -> AutoReplenish:
    return AutoReplenish(
        account_id=row.account_id,
        region=row.region,
        api=row.api,
        offer_id=row.offer_id,
        below_quantity=row.below_quantity,
        max_per_month=row.max_per_month,
        enabled=row.enabled,
        alert_id=row.alert_id,
        last_failure_reason=row.last_failure_reason,
        rearm_time=None if row.rearm_time_us is None else from_epoch_us(row.rearm_time_us),
        rearm_request_id=row.rearm_request_id,
        create_time=from_epoch_us(row.create_time_us),
        update_time=from_epoch_us(row.update_time_us),
    )


def _key(account_id: str, region: str, api: str):
    return (_s.account_id == account_id) & (_s.region == region) & (_s.api == api)


async def get(
    uow: UnitOfWork, account_id: str, region: str, api: str, for_update: bool = False
) -> AutoReplenish | None:
    query = select(t.auto_replenish).where(_key(account_id, region, api))
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    return None if row is None else _to_setting(row)


async def put(uow: UnitOfWork, setting: AutoReplenish) -> None:
    """Insert or replace the setting of its account, region and API."""
    values = {
        "offer_id": setting.offer_id,
        "below_quantity": setting.below_quantity,
        "max_per_month": setting.max_per_month,
        "enabled": setting.enabled,
        "alert_id": setting.alert_id,
        "last_failure_reason": setting.last_failure_reason,
        "rearm_time_us": None if setting.rearm_time is None else to_epoch_us(setting.rearm_time),
        "rearm_request_id": setting.rearm_request_id,
        "update_time_us": to_epoch_us(setting.update_time),
    }
    key = _key(setting.account_id, setting.region, setting.api)
    done = await uow.session.execute(update(t.auto_replenish).where(key).values(**values))
    if done.rowcount:
        return
    # A concurrent twin inserting the same key fails on the primary key; the transaction is
    # retried and then updates.
    await uow.session.execute(
        insert(t.auto_replenish).values(
            account_id=setting.account_id,
            region=setting.region,
            api=setting.api,
            create_time_us=to_epoch_us(setting.create_time),
            **values,
        )
    )


async def due_rearms(uow: UnitOfWork, now: datetime, limit: int) -> list[AutoReplenish]:
    """Settings whose month's limit was reached and whose next month has begun."""
    query = (
        select(t.auto_replenish)
        .where(_s.rearm_time_us.is_not(None), _s.rearm_time_us <= to_epoch_us(now))
        .order_by(_s.rearm_time_us)
        .limit(limit)
    )
    return [_to_setting(row) for row in await uow.rows(query)]


async def crossing_seen(uow: UnitOfWork, event_id: str) -> bool:
    query = select(_c.event_id).where(_c.event_id == event_id)
    return bool(await uow.rows(query))


async def month_purchases(uow: UnitOfWork, account_id: str, region: str, api: str, month: str):
    """How many crossings of the scope bought an order in ``month``."""
    query = select(func.count()).where(
        _c.account_id == account_id,
        _c.region == region,
        _c.api == api,
        _c.month == month,
        _c.order_id != "",
    )
    return int((await uow.session.execute(query)).scalar_one())


async def record_crossing(
    uow: UnitOfWork,
    event_id: str,
    setting: AutoReplenish,
    month: str,
    order_id: str,
    failure_reason: str,
    now: datetime,
) -> None:
    """Keep the crossing (its event id is the primary key: a second one fails the
    transaction, which is retried and then finds it)."""
    await uow.session.execute(
        insert(t.auto_replenish_crossings).values(
            event_id=event_id,
            account_id=setting.account_id,
            region=setting.region,
            api=setting.api,
            month=month,
            order_id=order_id,
            failure_reason=failure_reason[:500],
            create_time_us=to_epoch_us(now),
        )
    )
