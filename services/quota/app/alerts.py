"""Use cases of usage alerts: rule CRUD, and evaluation in the transaction of every change.

Evaluation runs where the aggregate changes, in that change's transaction: after the
deductions of a usage batch (no re-arming; the crossing event carries the remaining quantity
the crossing call left), and after anything that changes the quantity in force of a scope —
grant, renewal, revocation, activation, expiry — or the rule itself (re-armed, then evaluated).
Forecast rules (docs/design/forecasts.md) are left out of the usage path; they are evaluated
on those changes and by the due work, edge-triggered on their condition (`app/forecasts.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation

from services.quota.adapters import alerts_repository as alerts_repo
from services.quota.adapters import packages_repository as packages_repo
from services.quota.app import forecasts
from services.quota.app.context import QuotaContext
from services.quota.domain.alerts import (
    MAX_DEPLETION_DAYS,
    AlertRule,
    AlertState,
    Threshold,
    evaluate,
    owner_is_valid,
)
from shared.db import UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.ids import new_id
from shared.validation import check_account_id

MAX_THRESHOLD = 10**15


@dataclass(frozen=True)
class AlertInput:
    account_id: str
    region: str
    api: str
    threshold_quantity: int | None
    threshold_percent: float | None
    enabled: bool
    depletion_within_days: int | None = None
    forfeiture_above_quantity: int | None = None
    owner: str = ""  # "" = the customer's own rule (docs/design/usage-alerts.md, "Owned rules")


@dataclass(frozen=True)
class AlertView:
    """A rule and its state: FIRED when it fired for any of its APIs since last armed."""

    rule: AlertRule
    state: AlertState


def alert_not_found(alert_id: str) -> NotFound:
    return NotFound("USAGE_ALERT_NOT_FOUND", f"no usage alert {alert_id!r}", alert_id=alert_id)


def _threshold(spec: AlertInput) -> Threshold:
    if spec.threshold_quantity is not None:
        if not 0 <= spec.threshold_quantity <= MAX_THRESHOLD:
            raise InvalidArgument(
                "usage_alert.remaining_quantity", "remaining_quantity must be >= 0"
            )
        return Threshold(quantity=spec.threshold_quantity)
    if spec.threshold_percent is not None:
        try:
            # The shortest decimal that round-trips the double: 20.0 -> 20, 12.5 -> 12.5.
            percent = Decimal(repr(spec.threshold_percent))
        except InvalidOperation as exc:
            raise InvalidArgument(
                "usage_alert.remaining_percent", "remaining_percent is not a number"
            ) from exc
        if not (percent.is_finite() and Decimal(0) < percent <= Decimal(100)):
            raise InvalidArgument(
                "usage_alert.remaining_percent", "remaining_percent must be in (0, 100]"
            )
        return Threshold(percent=percent.normalize())
    if spec.depletion_within_days is not None:
        if not 1 <= spec.depletion_within_days <= MAX_DEPLETION_DAYS:
            raise InvalidArgument(
                "usage_alert.depletion_within_days",
                f"depletion_within_days must be in [1, {MAX_DEPLETION_DAYS}]",
            )
        return Threshold(depletion_days=spec.depletion_within_days)
    if spec.forfeiture_above_quantity is not None:
        if not 0 <= spec.forfeiture_above_quantity <= MAX_THRESHOLD:
            raise InvalidArgument(
                "usage_alert.forfeiture_above_quantity",
                "forfeiture_above_quantity must be >= 0",
            )
        return Threshold(forfeiture_quantity=spec.forfeiture_above_quantity)
    raise InvalidArgument(
        "usage_alert.threshold",
        "set remaining_quantity, remaining_percent, depletion_within_days or "
        "forfeiture_above_quantity",
    )


def _check_owner(owner: str, by_service: bool) -> None:
    """Only the suite's services make owned rules (docs/design/usage-alerts.md)."""
    if not owner:
        return
    if not by_service:
        raise InvalidArgument(
            "usage_alert.owner", "only the suite's services may set owner; leave it empty"
        )
    if not owner_is_valid(owner):
        raise InvalidArgument(
            "usage_alert.owner",
            "owner must be lowercase letters, digits and '_', starting with a letter, "
            "at most 40 characters",
        )


def check_may_change(rule: AlertRule, by_operator: bool) -> None:
    """An owned rule is changed and deleted by its owner (or an admin), never by the
    account's own tokens: they would break the feature that keeps it."""
    if rule.owner and not by_operator:
        raise FailedPrecondition(
            "USAGE_ALERT_OWNED",
            f"usage alert {rule.alert_id!r} is kept by {rule.owner!r}; change that instead",
            alert_id=rule.alert_id,
            owner=rule.owner,
        )


def _check_scope(ctx: QuotaContext, spec: AlertInput) -> None:
    check_account_id(spec.account_id, "usage_alert.account_id")
    ctx.check_region(spec.region, "usage_alert.region")
    if spec.api:
        ctx.check_api(spec.api, "usage_alert.api")


async def _view(uow: UnitOfWork, rule: AlertRule) -> AlertView:
    states = await alerts_repo.states_of(uow, [rule.alert_id])
    fired = any(s == AlertState.FIRED for s in states.values())
    return AlertView(rule, AlertState.FIRED if fired else AlertState.ARMED)


async def create_alert(
    ctx: QuotaContext, uow: UnitOfWork, spec: AlertInput, by_service: bool = False
) -> AlertView:
    """A new rule; `by_service` when one of the suite's services asks (it alone may set
    `owner`)."""
    _check_scope(ctx, spec)
    _check_owner(spec.owner, by_service)
    now = ctx.now()
    rule = AlertRule(
        alert_id=new_id("alr"),
        account_id=spec.account_id,
        region=spec.region,
        api=spec.api,
        threshold=_threshold(spec),
        enabled=spec.enabled,
        create_time=now,
        update_time=now,
        owner=spec.owner,
    )
    await alerts_repo.insert_rule(uow, rule)
    await reevaluate(ctx, uow, rule.account_id, rule.region, None, now, only=rule.alert_id)
    return await _view(uow, rule)


async def get_alert(ctx: QuotaContext, alert_id: str) -> AlertView:
    if not alert_id:
        raise InvalidArgument("alert_id", "alert_id is required")

    async def work(uow: UnitOfWork) -> AlertView:
        rule = await alerts_repo.get_rule(uow, alert_id)
        if rule is None:
            raise alert_not_found(alert_id)
        return await _view(uow, rule)

    return await ctx.db.read(work)


async def list_alerts(
    ctx: QuotaContext,
    account_id: str,
    region: str,
    visible_regions: tuple[str, ...] | None,
    after_id: str | None,
    limit: int,
) -> list[AlertView]:
    check_account_id(account_id)
    regions = ctx.regions_or_all(region, visible_regions)

    async def work(uow: UnitOfWork) -> list[AlertView]:
        rules = await alerts_repo.list_rules(uow, account_id, regions, after_id, limit)
        return [await _view(uow, rule) for rule in rules]

    return await ctx.db.read(work)


THRESHOLDS = {
    "remaining_quantity",
    "remaining_percent",
    "depletion_within_days",
    "forfeiture_above_quantity",
}
UPDATABLE = THRESHOLDS | {"enabled", "api"}


async def update_alert(
    ctx: QuotaContext,
    uow: UnitOfWork,
    alert_id: str,
    spec: AlertInput,
    paths: list[str],
    guard,
) -> AlertView:
    """Change the fields named in `paths` (all updatable ones when empty); the account and
    region of a rule never change. The rule is re-armed and evaluated at once."""
    if not alert_id:
        raise InvalidArgument("usage_alert.alert_id", "alert_id is required")
    unknown = sorted(set(paths) - UPDATABLE)
    if unknown:
        raise InvalidArgument(
            "update_mask", f"cannot update {unknown}; updatable: {sorted(UPDATABLE)}"
        )
    rule = await alerts_repo.get_rule(uow, alert_id, for_update=True)
    if rule is None:
        raise alert_not_found(alert_id)
    guard(rule)
    if spec.owner and spec.owner != rule.owner:
        raise InvalidArgument("usage_alert.owner", "owner is set on create and never changes")
    paths = list(paths) or sorted(UPDATABLE)
    changes: dict = {"update_time": ctx.now()}
    if "api" in paths:
        if spec.api:
            ctx.check_api(spec.api, "usage_alert.api")
        changes["api"] = spec.api
    if THRESHOLDS & set(paths):
        changes["threshold"] = _threshold(spec)
    if "enabled" in paths:
        changes["enabled"] = spec.enabled
    updated = dataclasses.replace(rule, **changes)
    await alerts_repo.save_rule(uow, updated)
    # Editing re-arms every API state of the rule: drop the old states, evaluate afresh.
    await alerts_repo.delete_states(uow, alert_id)
    await reevaluate(ctx, uow, updated.account_id, updated.region, None, ctx.now(), only=alert_id)
    return await _view(uow, updated)


async def delete_alert(ctx: QuotaContext, uow: UnitOfWork, alert_id: str, guard) -> None:
    if not alert_id:
        raise InvalidArgument("alert_id", "alert_id is required")
    rule = await alerts_repo.get_rule(uow, alert_id, for_update=True)
    if rule is None:
        raise alert_not_found(alert_id)
    guard(rule)
    await alerts_repo.delete_rule(uow, alert_id)


async def reevaluate(
    ctx: QuotaContext,
    uow: UnitOfWork,
    account_id: str,
    region: str,
    apis: Iterable[str] | None,
    now: datetime,
    only: str | None = None,
) -> int:
    """Re-arm and evaluate the account's rules in `region` for `apis` (None: every API) after
    the quantity in force changed there, or just rule `only` after it was created or edited.
    Returns how many rules fired."""
    apis = None if apis is None else sorted(set(apis))
    by_api = await packages_repo.totals_by_api(uow, account_id, region, apis, now)
    scope_apis = apis if apis is not None else sorted(ctx.catalog.apis)
    rules = await alerts_repo.lock_rules(uow, [(account_id, region, api) for api in scope_apis])
    if not rules:
        return 0
    before = await alerts_repo.states_of(uow, (r.alert_id for r in rules))
    after = dict(before)
    fired = await forecasts.evaluate_rules(
        ctx,
        uow,
        [r for r in rules if only is None or r.alert_id == only],
        apis,
        before,
        after,
        now,
    )
    for rule in rules:
        if (only is not None and rule.alert_id != only) or rule.threshold.is_forecast:
            continue
        for api in [rule.api] if rule.api else scope_apis:
            if apis is not None and api not in apis:
                continue
            in_force, remaining = by_api.get(api, (0, 0))
            state = before.get((rule.alert_id, api), AlertState.ARMED)
            result = evaluate(state, rule.threshold, remaining, in_force, rearm=True)
            if (rule.alert_id, api) in before or result.fired:
                after[(rule.alert_id, api)] = result.state
            if result.fired:
                ctx.events.threshold_crossed(uow, rule, api, remaining, in_force, now)
                fired += 1
    await alerts_repo.save_states(uow, before, after, now)
    return fired


async def after_usage(
    ctx: QuotaContext,
    uow: UnitOfWork,
    walk: list[tuple[tuple[str, str, str], int]],
    in_force: dict[tuple[str, str, str], int],
    now: datetime,
) -> int:
    """Evaluate rules along a batch's deductions: `walk` is (scope, remaining after the event)
    per billable event in order; `in_force` the quantity in force per scope (deductions do not
    change it). A rule fires on the event that brings remaining to its threshold."""
    if not walk:
        return 0
    rules, before = await alerts_repo.lock_rules_with_states(uow, {scope for scope, _ in walk})
    if not rules:
        return 0
    after = dict(before)
    fired = 0
    for scope, remaining in walk:
        account_id, region, api = scope
        for rule in rules:
            # Forecast rules are not read here (alerts_repository); the check keeps it so.
            if rule.threshold.is_forecast or not rule.watches(account_id, region, api):
                continue
            key = (rule.alert_id, api)
            state = after.get(key, AlertState.ARMED)
            result = evaluate(state, rule.threshold, remaining, in_force.get(scope, 0), rearm=False)
            if result.fired:
                after[key] = result.state
                ctx.events.threshold_crossed(uow, rule, api, remaining, in_force[scope], now)
                fired += 1
    await alerts_repo.save_states(uow, before, after, now)
    return fired
