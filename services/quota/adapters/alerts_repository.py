"""Usage alert rules and their per-API states: rows <-> domain."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import String, and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from services.quota.adapters import tables as t
from services.quota.adapters.scopes import scope_bindparams, scope_parameters
from services.quota.domain.alerts import AlertRule, AlertState, Threshold
from shared.db import UnitOfWork
from shared.direct_sql import hot
from shared.timeutil import from_epoch_us, to_epoch_us


def to_rule(row) -> AlertRule:
    percent = Decimal(row.threshold_percent) if row.threshold_percent is not None else None
    return AlertRule(
        alert_id=row.alert_id,
        account_id=row.account_id,
        region=row.region,
        api=row.api,
        threshold=Threshold(
            quantity=row.threshold_quantity,
            percent=percent,
            depletion_days=row.threshold_depletion_days,
            forfeiture_quantity=row.threshold_forfeiture_quantity,
        ),
        enabled=row.enabled,
        create_time=from_epoch_us(row.create_time_us),
        update_time=from_epoch_us(row.update_time_us),
        owner=row.owner,
    )


def _values(rule: AlertRule) -> dict:
    percent = rule.threshold.percent
    return {
        "alert_id": rule.alert_id,
        "account_id": rule.account_id,
        "region": rule.region,
        "api": rule.api,
        "threshold_quantity": rule.threshold.quantity,
        "threshold_percent": str(percent) if percent is not None else None,
        "threshold_depletion_days": rule.threshold.depletion_days,
        "threshold_forfeiture_quantity": rule.threshold.forfeiture_quantity,
        "enabled": rule.enabled,
        "create_time_us": to_epoch_us(rule.create_time),
        "update_time_us": to_epoch_us(rule.update_time),
        "owner": rule.owner,
    }


def _check_time(rule: AlertRule, now: datetime) -> int | None:
    # Forecast rules carry when they were last evaluated (due at once after a change);
    # the others NULL, which keeps them out of `due_forecast_rules`.
    return to_epoch_us(now) if rule.threshold.is_forecast else None


async def insert_rule(uow: UnitOfWork, rule: AlertRule) -> None:
    values = _values(rule) | {"forecast_check_time_us": _check_time(rule, rule.update_time)}
    await uow.session.execute(insert(t.usage_alerts).values(**values))


async def save_rule(uow: UnitOfWork, rule: AlertRule) -> None:
    values = _values(rule) | {"forecast_check_time_us": _check_time(rule, rule.update_time)}
    values.pop("alert_id")
    await uow.session.execute(
        update(t.usage_alerts).where(t.usage_alerts.c.alert_id == rule.alert_id).values(**values)
    )


async def get_rule(uow: UnitOfWork, alert_id: str, for_update: bool = False) -> AlertRule | None:
    query = select(t.usage_alerts).where(t.usage_alerts.c.alert_id == alert_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    return to_rule(row) if row else None


async def delete_rule(uow: UnitOfWork, alert_id: str) -> None:
    await delete_states(uow, alert_id)
    await uow.session.execute(delete(t.usage_alerts).where(t.usage_alerts.c.alert_id == alert_id))


async def list_rules(
    uow: UnitOfWork, account_id: str, regions: Iterable[str], after_id: str | None, limit: int
) -> list[AlertRule]:
    a = t.usage_alerts.c
    query = (
        select(t.usage_alerts)
        .where(a.account_id == account_id, a.region.in_(sorted(set(regions))))
        .order_by(a.alert_id)
        .limit(limit)
    )
    if after_id:
        query = query.where(a.alert_id > after_id)
    return [to_rule(r) for r in (await uow.session.execute(query)).all()]


async def lock_rules(uow: UnitOfWork, scopes: Iterable[tuple[str, str, str]]) -> list[AlertRule]:
    """Enabled rules watching any of the (account, region, api) scopes, locked in id order, so
    concurrent evaluations of one scope take turns and a crossing fires once."""
    scopes = sorted(set(scopes))
    if not scopes:
        return []
    query = (
        select(t.usage_alerts)
        .where(_a.enabled.is_(True), _watching(len(scopes)))
        .order_by(_a.alert_id)
        .with_for_update()
    )
    rows = (await uow.session.execute(query, scope_parameters("r_", scopes))).all()
    return [to_rule(r) for r in rows]


_a = t.usage_alerts.c
_s = t.usage_alert_states.c


def _watching(size: int):
    """Rules watching one of `size` scopes (adapters/scopes.py: the scopes as parameters, so
    the statements below are built and compiled once per size): the scope's account and
    region, and its API or every API (`api` "")."""
    return or_(
        *(
            and_(_a.account_id == account, _a.region == region, _a.api.in_(["", api]))
            for account, region, api in (scope_bindparams("r_", i) for i in range(size))
        )
    )


# The usage path evaluates the remaining-quantity rules only: forecast rules are neither read
# nor locked there (docs/design/forecasts.md, "When the alerts are evaluated").
_NOT_FORECAST = _a.forecast_check_time_us.is_(None)


def _rules_with_states(condition):
    return (
        select(t.usage_alerts, _s.api.label("state_api"), _s.state.label("state"))
        .outerjoin(t.usage_alert_states, _s.alert_id == _a.alert_id)
        .where(_a.enabled.is_(True), _NOT_FORECAST, condition)
        .order_by(_a.alert_id, _s.api)
    )


def _rules(condition):
    return (
        select(t.usage_alerts)
        .where(_a.enabled.is_(True), _NOT_FORECAST, condition)
        .order_by(_a.alert_id)
    )


@functools.cache
def _rules_with_states_of(size: int):
    return hot(_rules_with_states(_watching(size)))


@functools.cache
def _locked_rules_of(size: int):
    return hot(_rules(_watching(size)).with_for_update())  # PostgreSQL's (SQLite's: above)


_STATES = hot(
    select(_s.alert_id, _s.api, _s.state).where(
        _s.alert_id == bindparam("ids", type_=ARRAY(String)).any_()
    )
)


async def lock_rules_with_states(
    uow: UnitOfWork, scopes: Iterable[tuple[str, str, str]]
) -> tuple[list[AlertRule], dict[tuple[str, str], AlertState]]:
    """`lock_rules` and `states_of` those rules, with statements built once for one scope.

    On SQLite one statement: its writers take turns on the database lock (`BEGIN IMMEDIATE`),
    so nothing changes between the lock and the read. On PostgreSQL the states are read by a
    second statement after the rules are locked: under READ COMMITTED one statement keeps the
    snapshot it started with, so states written by the transaction it waited for would be
    missed and a crossing could fire twice."""
    scopes = sorted(set(scopes))
    if not scopes:
        return [], {}
    connection = await uow.connection()
    params = scope_parameters("r_", scopes)
    if uow.dialect != "postgresql":
        query = _rules_with_states_of(len(scopes))
        rules: dict[str, AlertRule] = {}
        states: dict[tuple[str, str], AlertState] = {}
        for row in (await connection.execute(query, params)).all():
            if row.alert_id not in rules:
                rules[row.alert_id] = to_rule(row)
            if row.state_api is not None:
                states[(row.alert_id, row.state_api)] = AlertState(row.state)
        return list(rules.values()), states
    query = _locked_rules_of(len(scopes))
    locked = [to_rule(r) for r in (await connection.execute(query, params)).all()]
    if not locked:
        return [], {}
    rows = (await connection.execute(_STATES, {"ids": [r.alert_id for r in locked]})).all()
    return locked, {(r.alert_id, r.api): AlertState(r.state) for r in rows}


async def states_of(uow: UnitOfWork, alert_ids: Iterable[str]) -> dict[tuple[str, str], AlertState]:
    ids = sorted(set(alert_ids))
    if not ids:
        return {}
    s = t.usage_alert_states.c
    rows = (
        await uow.session.execute(select(s.alert_id, s.api, s.state).where(s.alert_id.in_(ids)))
    ).all()
    return {(r.alert_id, r.api): AlertState(r.state) for r in rows}


async def save_states(
    uow: UnitOfWork,
    before: dict[tuple[str, str], AlertState],
    after: dict[tuple[str, str], AlertState],
    now: datetime,
) -> None:
    """Write the states that changed: UPDATE the known ones, INSERT the new ones."""
    s = t.usage_alert_states.c
    now_us = to_epoch_us(now)
    for (alert_id, api), state in after.items():
        if before.get((alert_id, api)) == state:
            continue
        if (alert_id, api) in before:
            await uow.session.execute(
                update(t.usage_alert_states)
                .where(s.alert_id == alert_id, s.api == api)
                .values(state=int(state), update_time_us=now_us)
            )
        else:
            # A concurrent first evaluation inserting the same row loses on the primary key and
            # its transaction is retried (Database.transaction).
            await uow.session.execute(
                insert(t.usage_alert_states).values(
                    alert_id=alert_id, api=api, state=int(state), update_time_us=now_us
                )
            )


async def delete_states(uow: UnitOfWork, alert_id: str) -> None:
    await uow.session.execute(
        delete(t.usage_alert_states).where(t.usage_alert_states.c.alert_id == alert_id)
    )


async def due_forecast_rules(
    uow: UnitOfWork, regions: Iterable[str], checked_before: datetime, limit: int
) -> list[AlertRule]:
    """Enabled forecast rules of `regions` last evaluated before `checked_before`, locked in
    id order (as `lock_rules` locks them), at most `limit`."""
    a = t.usage_alerts.c
    query = (
        select(t.usage_alerts)
        .where(
            a.forecast_check_time_us < to_epoch_us(checked_before),
            a.enabled.is_(True),
            a.region.in_(sorted(set(regions))),
        )
        .order_by(a.alert_id)
        .limit(limit)
        .with_for_update()
    )
    return [to_rule(r) for r in (await uow.session.execute(query)).all()]


async def mark_forecast_checked(uow: UnitOfWork, alert_ids: Iterable[str], now: datetime) -> None:
    ids = sorted(set(alert_ids))
    if ids:
        await uow.session.execute(
            update(t.usage_alerts)
            .where(t.usage_alerts.c.alert_id.in_(ids))
            .values(forecast_check_time_us=to_epoch_us(now))
        )
