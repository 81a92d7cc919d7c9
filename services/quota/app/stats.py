"""Use case of usage statistics: an account's usage per minute, hour or billing day.

Minutes and hours are aligned to UTC. Days run from local midnight to local midnight in the
billing time zone, so across a DST change a day lasts 23 or 25 hours. The calendar work is
done in `domain/stats.py` (pure); the database only sums events per bucket.

A bucket may be split by enterprise project or by IAM user (`group_by`), and the events kept
to one project or one user; every event stores both as reported (the project normalized,
docs/design/deduction-order.md), so a grouped answer adds up to the ungrouped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from services.quota.adapters.stats_queries import usage_per_bucket
from services.quota.app.context import QuotaContext
from services.quota.domain.stats import MAX_GROUPED_BUCKETS, Granularity, GroupBy, bucket_runs
from shared.db import UnitOfWork
from shared.errors import InvalidArgument
from shared.projects import check_project_filter
from shared.timeutil import from_epoch_us, to_epoch_us
from shared.validation import check_account_id, check_enum, check_length

_GROUP_COLUMN = {
    GroupBy.NONE: "",
    GroupBy.PROJECT: "enterprise_project_id",
    GroupBy.USER: "user_id",
}


@dataclass(frozen=True)
class StatsBucket:
    """Usage in one bucket. `start_time` is the bucket's aligned start (UTC); the project or
    the user is the bucket's group key when grouped by it, else empty."""

    start_time: datetime
    successful_calls: int
    failed_calls: int
    package_quantity: int
    pay_per_use_quantity: int
    enterprise_project_id: str = ""
    user_id: str = ""


async def usage_stats(
    ctx: QuotaContext,
    tz: ZoneInfo,
    *,
    account_id: str,
    region: str,
    api: str,
    start_time: datetime | None,
    end_time: datetime | None,
    granularity: int,
    group_by: int = 0,
    enterprise_project_id: str = "",
    user_id: str = "",
) -> list[StatsBucket]:
    """Usage of `account_id` in `region` (one API, or every API summed when `api` is empty)
    by events that occurred in [start_time, end_time), per bucket of `granularity`.

    Only buckets with usage are returned, in time order. Each carries its aligned start, so
    the first one may start before `start_time` (a DAY bucket starts at local midnight in
    `tz`); only events inside the range are counted in it. successful_calls sums the quantity
    of billable (2xx) events, failed_calls that of the others. At most MAX_BUCKETS buckets
    may lie in the range, else INVALID_ARGUMENT names end_time.

    `group_by` splits each bucket by project or user (ordered by it within the bucket);
    `enterprise_project_id` and `user_id`, when not empty, keep only that project's or user's
    events. A grouped answer holds at most MAX_GROUPED_BUCKETS buckets, else INVALID_ARGUMENT
    names end_time (a shorter range or a filter answers).
    """
    check_account_id(account_id)
    ctx.check_region(region)
    if api:
        ctx.check_api(api)
    if start_time is None:
        raise InvalidArgument("start_time", "start_time is required")
    if end_time is None:
        raise InvalidArgument("end_time", "end_time is required")
    if end_time <= start_time:
        raise InvalidArgument("end_time", "end_time must be after start_time")
    try:
        unit = Granularity(granularity)
    except ValueError:
        raise InvalidArgument(
            "granularity", "granularity must be MINUTE, HOUR or DAY", granularity=granularity
        ) from None
    group = GroupBy(check_enum(group_by, [g.value for g in GroupBy], "group_by"))
    project = check_project_filter(enterprise_project_id)
    user = check_length(user_id, "user_id")
    runs = bucket_runs(start_time, end_time, unit, tz)

    async def work(uow: UnitOfWork) -> list[StatsBucket]:
        rows = await usage_per_bucket(
            uow,
            account_id=account_id,
            region=region,
            api=api,
            start_us=to_epoch_us(start_time),
            end_us=to_epoch_us(end_time),
            runs=runs,
            group=_GROUP_COLUMN[group],
            project=project,
            user=user,
            limit=MAX_GROUPED_BUCKETS + 1 if group else None,
        )
        if len(rows) > MAX_GROUPED_BUCKETS:
            raise InvalidArgument(
                "end_time",
                f"more than {MAX_GROUPED_BUCKETS} grouped buckets: shorten the range or filter",
            )
        return [_bucket(group, *row) for row in rows]

    return await ctx.db.read(work)


def _bucket(group: GroupBy, start_us: int, key: str, *totals: int) -> StatsBucket:
    return StatsBucket(
        from_epoch_us(start_us),
        *totals,
        enterprise_project_id=key if group == GroupBy.PROJECT else "",
        user_id=key if group == GroupBy.USER else "",
    )
