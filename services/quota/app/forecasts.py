"""Use cases of forecasts (docs/design/forecasts.md): GetQuotaForecast, and the evaluation of
the forecast conditions of usage alerts.

A forecast reads the packages not yet ended of one account, region and API and the billable
calls of the last whole days, then applies the pure rules of `domain/forecast.py`. None of this
runs on the usage path: forecast rules are evaluated by the due work (`forecast_due`, at most
once per rule per FORECAST_INTERVAL) and, through `alerts.reevaluate`, in the transaction of
every change of the packages of a scope and of the rule itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.quota.adapters import alerts_repository as alerts_repo
from services.quota.adapters import forecast_queries as queries
from services.quota.adapters import packages_repository as packages_repo
from services.quota.app.context import QuotaContext
from services.quota.domain.alerts import AlertRule, AlertState, evaluate_forecast
from services.quota.domain.forecast import Forecast, daily_rate, forecast, window
from services.quota.domain.packages import Package
from shared.db import UnitOfWork
from shared.validation import check_account_id

# The due work evaluates a forecast rule at most this often (the rate moves once a day; the
# packages' changes re-evaluate at once anyway).
FORECAST_INTERVAL = timedelta(hours=1)
# Rules evaluated per transaction of the due work.
CHUNK = 50


@dataclass(frozen=True)
class ScopeForecast:
    region: str
    api: str
    forecast: Forecast


async def _forecast_of(
    ctx: QuotaContext,
    uow: UnitOfWork,
    account_id: str,
    region: str,
    api: str,
    packages: Iterable[Package],
    now: datetime,
) -> Forecast:
    first, last = window(now)
    calls = await queries.billable_calls_by_day(uow, account_id, region, api, first, last)
    before = (
        False
        if calls.get(first)
        else await queries.used_before(uow, account_id, region, api, first)
    )
    rate = daily_rate(now, calls, before)
    return forecast(now, rate, packages, ctx.policy)


async def _forecasts(
    ctx: QuotaContext,
    uow: UnitOfWork,
    account_id: str,
    regions: Iterable[str],
    api: str,
    now: datetime,
) -> list[ScopeForecast]:
    """One forecast per region and API of `regions` (`api`; '' = every API) with packages
    not yet ended, by region then API."""
    packages = await queries.packages_not_ended(uow, account_id, regions, api, now)
    by_scope: dict[tuple[str, str], list[Package]] = defaultdict(list)
    for package in packages:
        by_scope[(package.region, package.api)].append(package)
    return [
        ScopeForecast(
            region, api_, await _forecast_of(ctx, uow, account_id, region, api_, items, now)
        )
        for (region, api_), items in sorted(by_scope.items())
    ]


async def quota_forecast(
    ctx: QuotaContext,
    account_id: str,
    region: str,
    visible_regions: tuple[str, ...] | None,
    api: str,
) -> list[ScopeForecast]:
    check_account_id(account_id)
    regions = ctx.regions_or_all(region, visible_regions)
    if api:
        ctx.check_api(api)
    return await ctx.db.read(lambda uow: _forecasts(ctx, uow, account_id, regions, api, ctx.now()))


async def evaluate_rules(
    ctx: QuotaContext,
    uow: UnitOfWork,
    rules: Iterable[AlertRule],
    apis: Iterable[str] | None,
    before: dict[tuple[str, str], AlertState],
    after: dict[tuple[str, str], AlertState],
    now: datetime,
) -> int:
    """Evaluate the forecast rules among `rules` (locked by the caller) for `apis` of their
    scope (None: every API the rule watches), edge-triggered on the condition; `after` is
    updated with the new states. Returns how many fired."""
    fired = 0
    cache: dict[tuple[str, str, str], list[ScopeForecast]] = {}
    for rule in rules:
        if not rule.threshold.is_forecast:
            continue
        key = (rule.account_id, rule.region, rule.api)
        if key not in cache:
            cache[key] = await _forecasts(ctx, uow, rule.account_id, [rule.region], rule.api, now)
        by_api = {item.api: item.forecast for item in cache[key]}
        watched = [rule.api] if rule.api else sorted(ctx.catalog.apis)
        wanted = None if apis is None else set(apis)
        totals = await packages_repo.totals_by_api(
            uow, rule.account_id, rule.region, [a for a in watched if a in by_api], now
        )
        for api in watched:
            if wanted is not None and api not in wanted:
                continue
            state_key = (rule.alert_id, api)
            prediction = by_api.get(api)
            holds = prediction is not None and rule.threshold.forecast_holds(prediction, now)
            result = evaluate_forecast(after.get(state_key, AlertState.ARMED), holds)
            if state_key in before or state_key in after or result.fired:
                after[state_key] = result.state
            if result.fired:
                in_force, remaining = totals.get(api, (0, 0))
                ctx.events.threshold_crossed(
                    uow, rule, api, remaining, in_force, now, forecast=prediction
                )
                fired += 1
    return fired


async def forecast_due(ctx: QuotaContext, now: datetime) -> int:
    """Due work: evaluate the forecast rules not evaluated for FORECAST_INTERVAL, CHUNK per
    transaction. Returns how many rules were evaluated."""
    done = 0
    while True:
        count = await ctx.db.transaction(lambda uow: _forecast_chunk(ctx, uow, now))
        done += count
        if count < CHUNK:
            return done


async def _forecast_chunk(ctx: QuotaContext, uow: UnitOfWork, now: datetime) -> int:
    rules = await alerts_repo.due_forecast_rules(
        uow, ctx.served_regions, now - FORECAST_INTERVAL + timedelta(microseconds=1), CHUNK
    )
    if not rules:
        return 0
    before = await alerts_repo.states_of(uow, (r.alert_id for r in rules))
    after = dict(before)
    await evaluate_rules(ctx, uow, rules, None, before, after, now)
    await alerts_repo.save_states(uow, before, after, now)
    await alerts_repo.mark_forecast_checked(uow, (r.alert_id for r in rules), now)
    return len(rules)
