"""Quota's packages repository: package rows <-> domain objects, the packages' statements of the
hot path, and the read models over packages in force.

The hot path is shaped for batches: one locking read of every package the batch touches (in
package-id order, so concurrent batches never deadlock) and one executemany UPDATE of their
used quantities; the usage events of the batch are `usage_repository`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, case, func, insert, or_, select, update
from sqlalchemy.sql import ColumnElement

from services.quota.adapters import tables as t
from services.quota.adapters.scopes import Scope, scope_bindparams, scope_parameters
from services.quota.domain.packages import ALL_PROJECTS, Package, PackageSource, PackageState
from shared.db import UnitOfWork
from shared.direct_sql import hot
from shared.timeutil import from_epoch_us, to_epoch_us

ONE_SECOND_US = 1_000_000
# How long an expired package is still listed by ExplainUsage among an event's candidates.
CANDIDATE_HISTORY = timedelta(days=31)


def to_package(row) -> Package:
    return Package(
        package_id=row.package_id,
        account_id=row.account_id,
        region=row.region,
        api=row.api,
        enterprise_project_id=row.enterprise_project_id,
        source=PackageSource(row.source),
        total_quantity=row.total_quantity,
        used_quantity=row.used_quantity,
        effective_time=from_epoch_us(row.effective_time_us),
        expire_time=from_epoch_us(row.expire_time_us),
        create_time=from_epoch_us(row.create_time_us),
        revoke_time=from_epoch_us(row.revoke_time_us) if row.revoke_time_us is not None else None,
        order_id=row.order_id,
    )


@dataclass(frozen=True)
class PackageRecord:
    """A package with the columns the domain object does not carry."""

    package: Package
    revoke_reason: str = ""
    # The state the outbox last announced, and whether package_expiring was sent.
    announced_state: PackageState = PackageState.PENDING
    expiring_announced: bool = False


def to_record(row) -> PackageRecord:
    return PackageRecord(
        to_package(row),
        row.revoke_reason,
        PackageState(row.announced_state),
        row.expiring_announced,
    )


def _package_values(package: Package) -> dict:
    return {
        "package_id": package.package_id,
        "account_id": package.account_id,
        "region": package.region,
        "api": package.api,
        "enterprise_project_id": package.enterprise_project_id,
        "source": int(package.source),
        "total_quantity": package.total_quantity,
        "used_quantity": package.used_quantity,
        "effective_time_us": to_epoch_us(package.effective_time),
        "expire_time_us": to_epoch_us(package.expire_time),
        "create_time_us": to_epoch_us(package.create_time),
        "revoke_time_us": to_epoch_us(package.revoke_time) if package.revoke_time else None,
        "order_id": package.order_id,
    }


def _record_values(record: PackageRecord) -> dict:
    values = _package_values(record.package)
    values["revoke_reason"] = record.revoke_reason
    values["announced_state"] = int(record.announced_state)
    values["expiring_announced"] = record.expiring_announced
    return values


async def insert_package(uow: UnitOfWork, record: PackageRecord) -> None:
    await uow.session.execute(insert(t.packages).values(**_record_values(record)))


async def save_package(uow: UnitOfWork, record: PackageRecord) -> None:
    values = _record_values(record)
    values.pop("package_id")
    await uow.session.execute(
        update(t.packages)
        .where(t.packages.c.package_id == record.package.package_id)
        .values(**values)
    )


async def get_package(
    uow: UnitOfWork, package_id: str, for_update: bool = False
) -> PackageRecord | None:
    query = select(t.packages).where(t.packages.c.package_id == package_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    return to_record(row) if row else None


def state_condition(state: PackageState, now_us: int) -> ColumnElement[bool]:
    """SQL for "the package is in `state` at now" (mirrors Package.state_at)."""
    p = t.packages.c
    revoked = p.revoke_time_us.is_not(None)
    expired = p.expire_time_us + ONE_SECOND_US <= now_us
    pending = p.effective_time_us > now_us
    empty = p.used_quantity >= p.total_quantity
    if state == PackageState.REVOKED:
        return revoked
    if state == PackageState.EXPIRED:
        return and_(~revoked, expired)
    if state == PackageState.PENDING:
        return and_(~revoked, ~expired, pending)
    if state == PackageState.EXHAUSTED:
        return and_(~revoked, ~expired, ~pending, empty)
    return and_(~revoked, ~expired, ~pending, ~empty)


def in_force_condition(now_us: int) -> ColumnElement[bool]:
    p = t.packages.c
    return and_(
        p.revoke_time_us.is_(None),
        p.effective_time_us <= now_us,
        p.expire_time_us + ONE_SECOND_US > now_us,
    )


async def list_packages(
    uow: UnitOfWork,
    *,
    account_id: str,
    regions: Iterable[str],
    api: str,
    states: Iterable[PackageState],
    now: datetime,
    after_id: str | None,
    limit: int,
    project: str = "",
) -> list[PackageRecord]:
    p = t.packages.c
    now_us = to_epoch_us(now)
    query = select(t.packages).order_by(p.package_id).limit(limit)
    if account_id:
        query = query.where(p.account_id == account_id)
    if project:
        query = query.where(usable_by_project(project))
    query = query.where(p.region.in_(sorted(set(regions))))
    if api:
        query = query.where(p.api == api)
    states = list(states)
    if states:
        query = query.where(or_(*(state_condition(s, now_us) for s in states)))
    if after_id:
        query = query.where(p.package_id > after_id)
    rows = (await uow.session.execute(query)).all()
    return [to_record(r) for r in rows]


# The usual batch touches one scope: its locking read is built once (bound parameters), so a
# call pays no statement building; more scopes build theirs.
_p = t.packages.c


def _could_pay(after_us) -> ColumnElement[bool]:
    """SQL for "the package can still pay for a call at or after `after_us` + 1 s": not
    revoked, not expired by then, quantity left (docs/design/deduction-order.md, "Explaining a
    deduction"). Expiry is compared bare, so the scope index (account, region, api, expiry)
    skips the expired packages."""
    return and_(
        _p.revoke_time_us.is_(None),
        _p.used_quantity < _p.total_quantity,
        _p.expire_time_us > after_us,
    )


def _quantity_in_force(account_id, region, api, now_us) -> ColumnElement[int]:
    """The scope's quantity in force at `now_us` (packages used up included) as a scalar
    subquery, so the locking read returns it beside the packages that can pay."""
    q = t.packages.alias("in_force").c
    return (
        select(func.coalesce(func.sum(q.total_quantity), 0))
        .where(
            q.account_id == account_id,
            q.region == region,
            q.api == api,
            q.revoke_time_us.is_(None),
            q.effective_time_us <= now_us,
            q.expire_time_us > now_us - ONE_SECOND_US,
        )
        .scalar_subquery()
        .label("scope_in_force")
    )


@functools.cache
def _lock_scopes(size: int):
    """The packages of `size` scopes (account, region, API) that can still pay, locked: built
    once per size with the scopes as parameters (`l_account_<i>`, ...), so SQLAlchemy compiles
    it once; built anew for every batch (the scopes as literals) it cost more than the batch's
    other work (`make bench` contention, 64 accounts). An OR of the scopes, each matched by the
    scope index; one scope, the usual batch, reads its quantity in force once."""
    scopes = [scope_bindparams("l_", i) for i in range(size)]
    columns = scopes[0] if size == 1 else (_p.account_id, _p.region, _p.api)
    return hot(
        select(t.packages, _quantity_in_force(*columns, bindparam("l_now")))
        .where(
            or_(
                *(
                    and_(_p.account_id == account, _p.region == region, _p.api == api)
                    for account, region, api in scopes
                )
            ),
            _could_pay(bindparam("l_after")),
        )
        .order_by(_p.package_id)
        .with_for_update(of=t.packages)
    )


_UPDATE_USED = hot(
    update(t.packages)
    .where(_p.package_id == bindparam("b_id"))
    .values(used_quantity=bindparam("b_used"), announced_state=bindparam("b_announced"))
)


@dataclass(frozen=True)
class Candidates:
    """What the hot path reads: the packages that can pay, locked, and the quantity in force
    per scope (for percentage alerts; scopes with no package that can pay are absent)."""

    records: list[PackageRecord]
    in_force: dict[Scope, int]


async def lock_candidates(
    uow: UnitOfWork, scopes: Iterable[Scope], since: datetime, now: datetime
) -> Candidates:
    """The packages of the scopes that can still pay for a call at or after `since` (the
    batch's earliest call), locked (FOR UPDATE on PostgreSQL) in package-id order, and each
    scope's quantity in force at `now`. Packages revoked, used up or expired before `since`
    cannot pay and are not read: an account's old packages do not slow its calls
    (`ExplainUsage` lists them afterwards, `left_out_packages`)."""
    scopes = sorted(set(scopes))
    if not scopes:
        return Candidates([], {})
    connection = await uow.connection()
    params = {
        **scope_parameters("l_", scopes),
        "l_after": to_epoch_us(since) - ONE_SECOND_US,
        "l_now": to_epoch_us(now),
    }
    records, in_force = [], {}
    for row in (await connection.execute(_lock_scopes(len(scopes)), params)).all():
        record = to_record(row)
        records.append(record)
        in_force[(row.account_id, row.region, row.api)] = int(row.scope_in_force)
    return Candidates(records, in_force)


async def left_out_packages(
    uow: UnitOfWork, scope: Scope, occur_time: datetime, recorded_at: datetime
) -> list[Package]:
    """The scope's packages created by `recorded_at` that had not expired more than
    CANDIDATE_HISTORY before `occur_time`: what an explanation lists beside the packages the
    hot path read."""
    account_id, region, api = scope
    query = select(t.packages).where(
        _p.account_id == account_id,
        _p.region == region,
        _p.api == api,
        _p.create_time_us <= to_epoch_us(recorded_at),
        _p.expire_time_us + ONE_SECOND_US > to_epoch_us(occur_time - CANDIDATE_HISTORY),
    )
    return [to_package(r) for r in (await uow.session.execute(query)).all()]


async def update_used(uow: UnitOfWork, changed: Iterable[PackageRecord]) -> None:
    """One executemany for the batch: new used quantities and announced states."""
    params = [
        {
            "b_id": r.package.package_id,
            "b_used": r.package.used_quantity,
            "b_announced": int(r.announced_state),
        }
        for r in changed
    ]
    if not params:
        return
    connection = await uow.connection()
    await connection.execute(_UPDATE_USED, params)


# --- read models ---------------------------------------------------------------------------


def usable_by_project(project: str) -> ColumnElement[bool]:
    """Packages a call of `project` may use: designated for it, or for every project."""
    p = t.packages.c
    return p.enterprise_project_id.in_([ALL_PROJECTS, project])


async def summarize(
    uow: UnitOfWork,
    account_id: str,
    regions: Iterable[str],
    api: str,
    now: datetime,
    project: str = "",
):
    """(region, api, total, used, active_count) of packages in force, per region and API;
    with `project`, only the packages that project may use."""
    p = t.packages.c
    now_us = to_epoch_us(now)
    query = (
        select(
            p.region,
            p.api,
            func.sum(p.total_quantity).label("total"),
            func.sum(p.used_quantity).label("used"),
            func.sum(case((p.used_quantity < p.total_quantity, 1), else_=0)).label("active"),
        )
        .where(
            p.account_id == account_id,
            p.region.in_(sorted(set(regions))),
            in_force_condition(now_us),
        )
        .group_by(p.region, p.api)
        .order_by(p.region, p.api)
    )
    if api:
        query = query.where(p.api == api)
    if project:
        query = query.where(usable_by_project(project))
    return (await uow.session.execute(query)).all()


async def totals_by_api(
    uow: UnitOfWork, account_id: str, region: str, apis: Iterable[str] | None, now: datetime
) -> dict[str, tuple[int, int]]:
    """api -> (quantity in force, remaining) of the packages in force now, for one account
    and region."""
    p = t.packages.c
    query = (
        select(p.api, func.sum(p.total_quantity), func.sum(p.used_quantity))
        .where(p.account_id == account_id, p.region == region, in_force_condition(to_epoch_us(now)))
        .group_by(p.api)
    )
    if apis is not None:
        query = query.where(p.api.in_(sorted(set(apis))))
    rows = (await uow.session.execute(query)).all()
    return {api: (int(total), int(total) - int(used)) for api, total, used in rows}


async def due_announcements(uow: UnitOfWork, now: datetime, limit: int) -> list[PackageRecord]:
    """Packages whose state moved on with the clock since it was announced (activation,
    expiry), locked, oldest due first."""
    p = t.packages.c
    now_us = to_epoch_us(now)
    return await _lock_due(
        uow,
        limit,
        p.revoke_time_us.is_(None),
        or_(
            and_(
                p.announced_state == int(PackageState.PENDING),
                p.effective_time_us <= now_us,
            ),
            and_(
                p.announced_state.in_(
                    [
                        int(PackageState.PENDING),
                        int(PackageState.ACTIVE),
                        int(PackageState.EXHAUSTED),
                    ]
                ),
                p.expire_time_us + ONE_SECOND_US <= now_us,
            ),
        ),
    )


async def due_expiring(
    uow: UnitOfWork, now: datetime, notice: timedelta, limit: int
) -> list[PackageRecord]:
    """Packages in force with quantity left that expire within `notice` and were not warned."""
    p = t.packages.c
    now_us = to_epoch_us(now)
    return await _lock_due(
        uow,
        limit,
        p.expiring_announced.is_(False),
        p.revoke_time_us.is_(None),
        p.used_quantity < p.total_quantity,
        p.effective_time_us <= now_us,
        p.expire_time_us + ONE_SECOND_US > now_us,
        p.expire_time_us + ONE_SECOND_US <= now_us + int(notice.total_seconds() * 1_000_000),
    )


async def _lock_due(
    uow: UnitOfWork, limit: int, *conditions: ColumnElement[bool]
) -> list[PackageRecord]:
    """At most `limit` packages meeting `conditions`, locked, in package-id order."""
    query = (
        select(t.packages)
        .where(*conditions)
        .order_by(t.packages.c.package_id)
        .limit(limit)
        .with_for_update()
    )
    return [to_record(r) for r in (await uow.session.execute(query)).all()]
