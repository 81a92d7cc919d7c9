"""Quota's usage events repository: recorded events <-> `StoredUsage`.

One read of the batch's already-recorded event ids and one executemany INSERT of its new ones
(the packages they paid from are `packages_repository`'s). Both are built once and run on the
transaction's connection (Core, no ORM session work per call); on PostgreSQL the ids go as one
array parameter, so the statement's text, and the driver's prepared statement, is the same for
every batch size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import orjson
from sqlalchemy import String, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from services.quota.adapters import history_repository as history_repo
from services.quota.adapters import packages_repository as packages_repo
from services.quota.adapters import tables as t
from services.quota.domain.deduction import UsageOutcome
from shared.db import UnitOfWork
from shared.direct_sql import hot
from shared.timeutil import from_epoch_us


@dataclass(frozen=True)
class StoredUsage:
    """A recorded usage event: its digest and the result it got."""

    event_id: str
    fingerprint: str
    account_id: str
    region: str
    api: str
    enterprise_project_id: str
    occur_time: datetime
    record_time: datetime
    billable: bool
    deductions: tuple[tuple[str, int], ...]
    pay_per_use_quantity: int
    remaining_quantity: int
    explanation: dict


def _to_stored(row) -> StoredUsage:
    return StoredUsage(
        event_id=row.event_id,
        fingerprint=row.fingerprint,
        account_id=row.account_id,
        region=row.region,
        api=row.api,
        enterprise_project_id=row.enterprise_project_id,
        occur_time=from_epoch_us(row.occur_time_us),
        record_time=from_epoch_us(row.record_time_us),
        billable=row.billable,
        deductions=tuple((d[0], d[1]) for d in json.loads(row.deductions)),
        pay_per_use_quantity=row.pay_per_use_quantity,
        remaining_quantity=row.remaining_quantity,
        explanation=json.loads(row.explanation),
    )


_FIND = {
    "postgresql": hot(
        select(t.usage_events).where(
            t.usage_events.c.event_id == bindparam("ids", type_=ARRAY(String)).any_()
        )
    ),
    # The ids as one JSON array: one statement text for every batch size (an IN list's text
    # would follow its length), so it runs on the driver directly (shared/direct_sql.py).
    "sqlite": hot(
        select(t.usage_events).where(
            t.usage_events.c.event_id.in_(
                select(func.json_each(bindparam("ids")).table_valued("value").c.value)
            )
        )
    ),
}


async def lock_and_find(
    uow: UnitOfWork,
    scopes: Iterable[packages_repo.Scope],
    since: datetime,
    now: datetime,
    event_ids: Iterable[str],
) -> tuple[packages_repo.Candidates, dict[str, StoredUsage]]:
    """`packages_repo.lock_candidates`, then `find_usage`: the batch's packages locked, and
    which of its event ids are recorded already. Two statements: one statement returning both
    (rows as JSON) measured slower for an account with many packages."""
    candidates = await packages_repo.lock_candidates(uow, scopes, since, now)
    return candidates, await find_usage(uow, event_ids)


async def find_usage(uow: UnitOfWork, event_ids: Iterable[str]) -> dict[str, StoredUsage]:
    ids = sorted(set(event_ids))
    if not ids:
        return {}
    connection = await uow.connection()
    dialect = uow.dialect
    given = ids if dialect == "postgresql" else orjson.dumps(ids).decode()
    rows = (await connection.execute(_FIND[dialect], {"ids": given})).all()
    return {r.event_id: _to_stored(r) for r in rows}


def explanation_json(outcome: UsageOutcome) -> dict:
    return {
        "policy": outcome.policy.value,
        "decisive_rule": outcome.decisive_rule.value,
        "candidates": [
            [
                c.package_id,
                c.rank,
                c.eligible,
                c.ineligible_reason.value if c.ineligible_reason else "",
                c.deducted_quantity,
            ]
            for c in outcome.candidates
        ],
    }


# SQLite's INSERT of a batch's events as the driver's own text, rows as they are (sqlite3 takes
# named parameters from dicts): SQLAlchemy's per-row parameter processing of an executemany
# cost about as much as the database's work (docs/design/scale.md "The hot path's costs").
_SQLITE_INSERT = "INSERT INTO usage_events ({}) VALUES ({})".format(
    ", ".join(c.name for c in t.usage_events.c), ", ".join(f":{c.name}" for c in t.usage_events.c)
)


async def insert_usage(uow: UnitOfWork, rows: list[dict]) -> None:
    """The batch's events (SQLite; PostgreSQL writes them in `save_batch`'s one statement)."""
    if rows:
        connection = await uow.connection()
        await connection.exec_driver_sql(_SQLITE_INSERT, rows)


def _save_statement():
    """PostgreSQL: the batch's used quantities and its events in one statement, each as
    columns of arrays (`unnest`): one round trip whatever the batch's size."""
    p = t.packages
    changed = (
        func.unnest(*(bindparam(f"p_{c.name}", type_=ARRAY(c.type)) for c in _PACKAGE_COLUMNS))
        .table_valued(*(c.name for c in _PACKAGE_COLUMNS))
        .render_derived()
        .alias("changed")
    )
    deducted = (
        update(p)
        .where(p.c.package_id == changed.c.package_id)
        .values(used_quantity=changed.c.used_quantity, announced_state=changed.c.announced_state)
        .cte("deducted")
    )
    names = [c.name for c in _EVENT_COLUMNS]
    events = (
        func.unnest(*(bindparam(f"e_{c.name}", type_=ARRAY(c.type)) for c in _EVENT_COLUMNS))
        .table_valued(*names)
        .render_derived()
        .alias("batch")
    )
    # record_seq: the batch's places in the history, in batch order, from the sequence
    # (adapters/history_repository.py), taken while the batch holds its packages' locks.
    return (
        insert(t.usage_events)
        .from_select(
            [*names, "record_seq"],
            select(*(events.c[n] for n in names), history_repo.next_seq_expression()),
        )
        .add_cte(deducted)
    )


# The columns a batch supplies; record_seq is numbered by the save (`save_batch`).
_EVENT_COLUMNS = tuple(c for c in t.usage_events.c if c.name != "record_seq")


_PACKAGE_COLUMNS = (
    t.packages.c.package_id,
    t.packages.c.used_quantity,
    t.packages.c.announced_state,
)
_SAVE = hot(_save_statement())


async def save_batch(
    uow: UnitOfWork, changed: list[packages_repo.PackageRecord], rows: list[dict]
) -> None:
    """Write a batch's outcome: the packages' new used quantities and announced states
    (`packages_repo.update_used`), and the events (`insert_usage`). On PostgreSQL that is one
    statement; elsewhere two executemany."""
    if uow.dialect != "postgresql" or not rows:
        await packages_repo.update_used(uow, changed)
        if rows:
            seqs = await history_repo.take_seqs(uow, len(rows))
            rows = [{**row, "record_seq": seq} for row, seq in zip(rows, seqs, strict=True)]
        await insert_usage(uow, rows)
        return
    params: dict[str, list] = {
        "p_package_id": [r.package.package_id for r in changed],
        "p_used_quantity": [r.package.used_quantity for r in changed],
        "p_announced_state": [int(r.announced_state) for r in changed],
    }
    for c in _EVENT_COLUMNS:
        params[f"e_{c.name}"] = [row[c.name] for row in rows]
    connection = await uow.connection()
    await connection.execute(_SAVE, params)
