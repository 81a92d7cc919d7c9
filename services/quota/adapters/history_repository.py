"""The history a what-if replay reads (docs/design/what-if.md): the order usage events were
recorded in (`usage_events.record_seq`) and every grant, renewal and revocation of a package
(`package_changes`), numbered from one counter.

PostgreSQL numbers them from the sequence `quota_history_seq` (no writer waits on it; a usage
batch takes its numbers while it holds the locks of the packages it read, so a change of one
of those packages is numbered on the same side of the batch as it happened). SQLite serializes
its writers, so a one-row counter numbers them in commit order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime

from sqlalchemy import bindparam, func, insert, select, update

from services.quota.adapters import tables as t
from services.quota.adapters.packages_repository import to_package
from services.quota.adapters.scopes import Scope
from services.quota.domain.deduction import UsageEvent
from services.quota.domain.packages import Package
from services.quota.domain.simulation import ChangeKind, PackageChange, RecordedEvent
from shared.db import UnitOfWork
from shared.direct_sql import hot
from shared.timeutil import from_epoch_us, to_epoch_us

_BUMP = hot(
    update(t.history_counter)
    .where(t.history_counter.c.id == 1)
    .values(last_seq=t.history_counter.c.last_seq + bindparam("step"))
    .returning(t.history_counter.c.last_seq)
)


def next_seq_expression():
    """PostgreSQL: the next number, as an expression of an INSERT."""
    return t.history_sequence.next_value()


async def take_seqs(uow: UnitOfWork, count: int) -> list[int]:
    """SQLite: `count` consecutive numbers from the counter (the writer holds the lock)."""
    connection = await uow.connection()
    last = (await connection.execute(_BUMP, {"step": count})).scalar_one()
    return list(range(last - count + 1, last + 1))


async def record_change(
    uow: UnitOfWork, package: Package, kind: ChangeKind, now: datetime, forfeit: bool = False
) -> None:
    """Append a grant, renewal or revocation of `package` (its state after the change)."""
    values = {
        "package_id": package.package_id,
        "account_id": package.account_id,
        "region": package.region,
        "api": package.api,
        "kind": int(kind),
        "change_time_us": to_epoch_us(now),
        "total_quantity": package.total_quantity,
        "expire_time_us": to_epoch_us(package.expire_time),
        "forfeit": forfeit,
    }
    if uow.dialect == "postgresql":
        values["seq"] = next_seq_expression()
    else:
        values["seq"] = (await take_seqs(uow, 1))[0]
    connection = await uow.connection()
    await connection.execute(insert(t.package_changes).values(**values))


async def scope_changes(uow: UnitOfWork, scope: Scope) -> list[PackageChange]:
    """Every change of the scope's packages, in order, with the packages' fixed attributes."""
    account_id, region, api = scope
    c, p = t.package_changes.c, t.packages.c
    query = (
        select(t.package_changes, t.packages)
        .join(t.packages, p.package_id == c.package_id)
        .where(c.account_id == account_id, c.region == region, c.api == api)
        .order_by(c.seq)
    )
    connection = await uow.connection()
    rows = (await connection.execute(query)).mappings().all()
    return [
        PackageChange(
            seq=row[c.seq],
            kind=ChangeKind(row[c.kind]),
            package_id=row[c.package_id],
            change_time=from_epoch_us(row[c.change_time_us]),
            total_quantity=row[c.total_quantity],
            expire_time=from_epoch_us(row[c.expire_time_us]),
            forfeit=row[c.forfeit],
            enterprise_project_id=row[p.enterprise_project_id],
            source=row[p.source],
            effective_time=from_epoch_us(row[p.effective_time_us]),
            create_time=from_epoch_us(row[p.create_time_us]),
        )
        for row in rows
    ]


async def packages_without_history(uow: UnitOfWork, scope: Scope) -> list[Package]:
    """The scope's packages granted before the history existed (no grant recorded)."""
    account_id, region, api = scope
    p = t.packages.c
    c = t.package_changes.c
    granted = select(c.package_id).where(
        c.account_id == account_id,
        c.region == region,
        c.api == api,
        c.kind == int(ChangeKind.GRANT),
    )
    query = select(t.packages).where(
        p.account_id == account_id,
        p.region == region,
        p.api == api,
        p.package_id.not_in(granted),
    )
    connection = await uow.connection()
    return [to_package(r) for r in (await connection.execute(query)).all()]


def _events_query(scope: Scope, before: datetime, since: datetime | None):
    account_id, region, api = scope
    e = t.usage_events.c
    conditions = [
        e.account_id == account_id,
        e.region == region,
        e.api == api,
        e.occur_time_us < to_epoch_us(before),
        # Every event recorded through quota has its number (migration 0008 numbered the
        # older ones); a row written around it has none and no place in the history.
        e.record_seq.is_not(None),
    ]
    if since is not None:
        conditions.append(e.occur_time_us >= to_epoch_us(since))
    return conditions


async def count_events(
    uow: UnitOfWork, scope: Scope, before: datetime, since: datetime | None
) -> int:
    query = select(func.count()).select_from(t.usage_events)
    query = query.where(*_events_query(scope, before, since))
    connection = await uow.connection()
    return int((await connection.execute(query)).scalar_one())


PAGE = 2000


async def recorded_events(
    uow: UnitOfWork, scope: Scope, before: datetime, since: datetime | None
) -> AsyncIterator[list[RecordedEvent]]:
    """The scope's events that occurred before `before` (and at or after `since`), in the
    order they were recorded (record_seq; events recorded before migration 0008 were numbered
    by it in record-time order), a page at a time by keyset on the index
    `ix_usage_events_scope_seq`."""
    e = t.usage_events.c
    numbered = select(*_COLUMNS).where(*_events_query(scope, before, since)).order_by(e.record_seq)
    connection = await uow.connection()
    last_seq: int | None = None
    while True:
        query = numbered if last_seq is None else numbered.where(e.record_seq > last_seq)
        rows = (await connection.execute(query.limit(PAGE))).all()
        if rows:
            yield [_recorded(r, scope) for r in rows]
            last_seq = rows[-1].record_seq
        if len(rows) < PAGE:
            return


_e = t.usage_events.c
_COLUMNS = (
    _e.event_id,
    _e.user_id,
    _e.enterprise_project_id,
    _e.quantity,
    _e.http_status,
    _e.occur_time_us,
    _e.deductions,
    _e.pay_per_use_quantity,
    _e.record_seq,
    _e.record_time_us,
)


def _recorded(row, scope: Scope) -> RecordedEvent:
    account_id, region, api = scope
    return RecordedEvent(
        event=UsageEvent(
            event_id=row.event_id,
            account_id=account_id,
            user_id=row.user_id,
            region=region,
            api=api,
            enterprise_project_id=row.enterprise_project_id,
            quantity=row.quantity,
            http_status=row.http_status,
            occur_time=from_epoch_us(row.occur_time_us),
        ),
        seq=row.record_seq,
        deductions=tuple((d[0], d[1]) for d in json.loads(row.deductions)),
        pay_per_use_quantity=row.pay_per_use_quantity,
    )
