"""Quota's API subscriptions (which APIs an account may call where) and the account standings
billing announced: the rows admission reads."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import (
    Integer,
    and_,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    union_all,
    update,
)

from services.quota.adapters import tables as t
from services.quota.adapters.packages_repository import in_force_condition
from services.quota.domain.admission import StandingChange
from shared.api_subscriptions import get_api_subscription, put_api_subscription
from shared.db import UnitOfWork
from shared.direct_sql import hot
from shared.timeutil import to_epoch_us


async def get_subscription(uow: UnitOfWork, account_id: str, region: str, api: str):
    return await get_api_subscription(uow, t.api_subscriptions, account_id, region, api)


async def put_subscription(
    uow: UnitOfWork, account_id: str, region: str, api: str, state: int, now: datetime
):
    return await put_api_subscription(uow, t.api_subscriptions, account_id, region, api, state, now)


async def list_subscriptions(
    uow: UnitOfWork, account_id: str, regions: Iterable[str], after: list | None, limit: int
):
    s = t.api_subscriptions.c
    query = (
        select(t.api_subscriptions)
        .where(s.account_id == account_id, s.region.in_(sorted(set(regions))))
        .order_by(s.region, s.api)
        .limit(limit)
    )
    if after:
        region, api = after
        query = query.where(or_(s.region > region, and_(s.region == region, s.api > api)))
    return (await uow.session.execute(query)).all()


def _admission_select(i: int):
    """What CheckQuota reads for key `i` of a statement, as one row of scalar subqueries: the
    subscription's state, the account's standing and its pay-per-use block in grace (one
    primary-key row), the remaining quantity of the packages in force for the project
    (designated + all-project packages), and for the spending cap
    (docs/design/spending-cap.md): the cap, the month's counted pay-per-use of the account
    (its regions in this database), the month's calls of this region and API, and what
    admission let through this month (primary-key reads of small tables)."""
    s, st, p = t.api_subscriptions.c, t.account_standings.c, t.packages.c
    m, a = t.pay_per_use_months.c, t.spending_cap_admissions.c
    month = bindparam("month")
    account, region, api = (
        bindparam(f"account_{i}"),
        bindparam(f"region_{i}"),
        bindparam(f"api_{i}"),
    )
    state = select(s.state).where(s.account_id == account, s.region == region, s.api == api)
    standing = select(st.standing).where(st.account_id == account)
    block = select(st.block_pay_per_use_in_grace).where(st.account_id == account)
    remaining = select(func.coalesce(func.sum(p.total_quantity - p.used_quantity), 0)).where(
        p.account_id == account,
        p.region == region,
        p.api == api,
        p.enterprise_project_id.in_(["", bindparam(f"project_{i}")]),
        in_force_condition(bindparam("now_us")),
    )
    cap = select(st.monthly_spending_cap_micros).where(st.account_id == account)
    spent = select(func.coalesce(func.sum(m.amount_micros), 0)).where(
        m.account_id == account, m.month == month
    )
    used = select(m.quantity).where(
        m.account_id == account, m.month == month, m.region == region, m.api == api
    )
    admitted = select(a.admitted_micros).where(a.account_id == account, a.month == month)
    settled = select(st.settled_pay_per_use).where(st.account_id == account)
    return select(
        literal_column(str(i), Integer).label("i"),
        state.scalar_subquery().label("state"),
        standing.scalar_subquery().label("standing"),
        block.scalar_subquery().label("block"),
        remaining.scalar_subquery().label("remaining"),
        cap.scalar_subquery().label("cap"),
        spent.scalar_subquery().label("spent"),
        used.scalar_subquery().label("used"),
        admitted.scalar_subquery().label("admitted"),
        settled.scalar_subquery().label("settled"),
    )


@functools.cache
def _admission_query(size: int):
    """One statement for `size` keys (built once per size; its parameters bound per call)."""
    if size == 1:
        return hot(_admission_select(0))
    return hot(union_all(*(_admission_select(i) for i in range(size))))


class AdmissionFacts(NamedTuple):
    """What admission reads for one call (`admission_facts_of`)."""

    state: int | None  # the subscription's state, None: never enabled
    standing: int | None  # None: GOOD
    remaining: int  # calls left in the packages in force for the project
    block: bool  # pay-per-use blocked in grace
    cap_micros: int = 0  # the monthly spending cap, 0 = none
    spent_micros: int = 0  # the month's counted pay-per-use of the account
    used_quantity: int = 0  # the month's pay-per-use calls of the region and API
    admitted_micros: int = 0  # what admission let through under the cap this month
    settled: str = ""  # billing's settled pay-per-use by region (`settled_elsewhere`)
    month: str = ""  # the month read ("YYYY-MM", billing time zone)


async def admission_facts_of(
    uow: UnitOfWork, keys: Sequence[tuple[str, str, str, str]], now: datetime, month: str = ""
) -> list[AdmissionFacts]:
    """For each (account, region, API, project) key, the rows admission reads for a call of it
    now, `month` being the billing time zone's month of now. One statement, one round trip,
    one snapshot."""
    params: dict = {"now_us": to_epoch_us(now), "month": month}
    for i, (account_id, region, api, project) in enumerate(keys):
        params.update(
            {
                f"account_{i}": account_id,
                f"region_{i}": region,
                f"api_{i}": api,
                f"project_{i}": project,
            }
        )
    connection = await uow.session.connection()
    rows = (await connection.execute(_admission_query(len(keys)), params)).all()
    found = {
        row.i: AdmissionFacts(
            row.state,
            row.standing,
            int(row.remaining),
            bool(row.block),
            int(row.cap or 0),
            int(row.spent or 0),
            int(row.used or 0),
            int(row.admitted or 0),
            row.settled or "",
            month,
        )
        for row in rows
    }
    return [found[i] for i in range(len(keys))]


async def members_of(uow: UnitOfWork, master_account_id: str) -> frozenset[str]:
    """The accounts whose enterprise master is `master_account_id`, as billing announced."""
    c = t.account_standings.c
    rows = await uow.session.execute(
        select(c.account_id).where(c.master_account_id == master_account_id)
    )
    return frozenset(rows.scalars().all())


async def held_standing(uow: UnitOfWork, account_id: str) -> tuple[int, str] | None:
    """(billing sequence, billing event id) of the standing change the account's row holds."""
    c = t.account_standings.c
    row = (
        await uow.session.execute(
            select(c.billing_sequence, c.billing_event_id).where(c.account_id == account_id)
        )
    ).first()
    return (row.billing_sequence, row.billing_event_id) if row is not None else None


def _settled_json(change: StandingChange) -> str:
    if not change.spending_month:
        return ""
    regions = dict(change.settled_by_region)
    return json.dumps({"month": change.spending_month, "regions": regions}, sort_keys=True)


def settled_elsewhere(text: str, month: str, served: Iterable[str]) -> int:
    """Micros of the account's settled pay-per-use of `month` in regions not in `served`, from
    the row's `settled_pay_per_use` ('' or another month: none)."""
    if not text:
        return 0
    found = json.loads(text)
    if found.get("month") != month:
        return 0
    skip = set(served)
    return sum(int(a) for r, a in found.get("regions", {}).items() if r not in skip)


async def put_standing(uow: UnitOfWork, change: StandingChange, now: datetime, new: bool) -> None:
    """Write `change` into the account's row (a `new` row, or over the one it has)."""
    values = {
        "standing": int(change.standing),
        "update_time_us": to_epoch_us(now),
        "change_time_us": to_epoch_us(change.change_time) if change.change_time is not None else 0,
        "billing_sequence": change.sequence,
        "billing_event_id": change.event_id,
        "block_pay_per_use_in_grace": change.block_pay_per_use_in_grace,
        "master_account_id": change.master_account_id,
        "monthly_spending_cap_micros": change.monthly_spending_cap_micros,
        "settled_pay_per_use": _settled_json(change),
    }
    if new:
        # Only the consumer holding the stream's lease writes here; should a second writer
        # ever insert first, the primary key fails and the whole transaction is retried.
        await uow.session.execute(
            insert(t.account_standings).values(account_id=change.account_id, **values)
        )
    else:
        c = t.account_standings.c
        await uow.session.execute(
            update(t.account_standings).where(c.account_id == change.account_id).values(**values)
        )
