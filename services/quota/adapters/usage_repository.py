"""Quota's usage events repository: recorded events <-> `StoredUsage`.

One read of the batch's already-recorded event ids and one executemany INSERT of its new ones
(the packages they paid from are `packages_repository`'s).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select

from services.quota.adapters import tables as t
from services.quota.domain.deduction import UsageOutcome
from shared.db import UnitOfWork
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
        billable=row.billable,
        deductions=tuple((d[0], d[1]) for d in json.loads(row.deductions)),
        pay_per_use_quantity=row.pay_per_use_quantity,
        remaining_quantity=row.remaining_quantity,
        explanation=json.loads(row.explanation),
    )


async def find_usage(uow: UnitOfWork, event_ids: Iterable[str]) -> dict[str, StoredUsage]:
    ids = sorted(set(event_ids))
    if not ids:
        return {}
    rows = (
        await uow.session.execute(select(t.usage_events).where(t.usage_events.c.event_id.in_(ids)))
    ).all()
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


async def insert_usage(uow: UnitOfWork, rows: list[dict]) -> None:
    if rows:
        connection = await uow.session.connection()
        await connection.execute(insert(t.usage_events), rows)
