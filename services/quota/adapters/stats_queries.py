"""Usage statistics read model: usage events summed per time bucket, by the database.

Buckets arrive as runs of equal width (computed from the calendar by the use case), so one
GROUP BY serves UTC minutes and hours and billing-time-zone days alike, DST days included. A
bucket may also be split by the events' enterprise project or IAM user (the group key), and
the events filtered by either.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from sqlalchemy import BigInteger, case, func, literal, select
from sqlalchemy.sql import ColumnElement

from services.quota.adapters import tables as t
from services.quota.domain.stats import BucketRun
from shared.db import UnitOfWork

# (bucket start in microseconds, group key ("" when not grouped), successful calls, failed
# calls, package, pay-per-use)
BucketTotals = tuple[int, str, int, int, int, int]

# What a bucket may be split by: a column of usage_events.
GROUP_COLUMNS = ("enterprise_project_id", "user_id")


def _bigint(value: int) -> ColumnElement[int]:
    # Typed binds: asyncpg must not guess INTEGER for microsecond values.
    return literal(value, BigInteger)


def _start_in_run(occur: ColumnElement[int], run: BucketRun) -> ColumnElement[int]:
    start, width = _bigint(run.start_us), _bigint(run.width_us)
    # `//` renders as `/`, integer division on both dialects. Both truncate toward zero, and
    # floor only differs for negative operands; occur >= run.start_us wherever this is
    # evaluated (the range starts inside the first run, later runs are chosen by CASE), so
    # the dividend is never negative, even for instants before 1970.
    return start + (occur - start) // width * width


def bucket_start(occur: ColumnElement[int], runs: Sequence[BucketRun]) -> ColumnElement[int]:
    """The start (microseconds) of the bucket holding `occur`, as an SQL expression."""
    if not runs:
        raise ValueError("no bucket runs")
    if len(runs) == 1:
        return _start_in_run(occur, runs[0])
    return case(
        *(
            (occur < _bigint(nxt.start_us), _start_in_run(occur, run))
            for run, nxt in pairwise(runs)
        ),
        else_=_start_in_run(occur, runs[-1]),
    )


async def usage_per_bucket(
    uow: UnitOfWork,
    *,
    account_id: str,
    region: str,
    api: str,
    start_us: int,
    end_us: int,
    runs: Sequence[BucketRun],
    group: str = "",
    project: str = "",
    user: str = "",
    limit: int | None = None,
) -> list[BucketTotals]:
    """Usage of [start_us, end_us) per bucket that has any, in time order; `api` '' = all.

    `group` (one of GROUP_COLUMNS, '' = none) splits each bucket by that column, ordered by
    it within the bucket; `project` and `user` ('' = any) keep only events of that project
    or user. At most `limit` rows are read (None = all).

    Reads the range of the (account_id, region, api, occur_time_us) index and sums in the
    database: one row comes back per bucket (and group) with usage, however many events
    there are.
    """
    u = t.usage_events.c
    zero = _bigint(0)
    conditions = [
        u.account_id == account_id,
        u.region == region,
        u.occur_time_us >= _bigint(start_us),
        u.occur_time_us < _bigint(end_us),
    ]
    if api:
        conditions.append(u.api == api)
    if project:
        conditions.append(u.enterprise_project_id == project)
    if user:
        conditions.append(u.user_id == user)
    if group and group not in GROUP_COLUMNS:
        raise ValueError(f"cannot group usage by {group!r}")
    keys = [u[group].label("group_key")] if group else []
    # The bucket is computed in a subquery and grouped by name in the outer one: PostgreSQL
    # only matches a GROUP BY expression to the select list when their binds are the same.
    events = (
        select(
            bucket_start(u.occur_time_us, runs).label("bucket_us"),
            *keys,
            case((u.billable, u.quantity), else_=zero).label("successful"),
            case((u.billable, zero), else_=u.quantity).label("failed"),
            u.package_quantity,
            u.pay_per_use_quantity,
        )
        .where(*conditions)
        .subquery("events")
    )
    e = events.c
    grouping = (e.bucket_us, e.group_key) if group else (e.bucket_us,)
    query = (
        select(
            *grouping,
            func.sum(e.successful),
            func.sum(e.failed),
            func.sum(e.package_quantity),
            func.sum(e.pay_per_use_quantity),
        )
        .group_by(*grouping)
        .order_by(*grouping)
    )
    if limit is not None:
        query = query.limit(limit)
    rows = (await uow.session.execute(query)).all()
    # SUM(bigint) is NUMERIC on PostgreSQL (Decimal in Python): back to exact ints.
    if not group:
        rows = [(b, "", *totals) for b, *totals in rows]
    return [
        (int(b), str(k), int(ok), int(failed), int(package), int(ppu))
        for b, k, ok, failed, package, ppu in rows
    ]
