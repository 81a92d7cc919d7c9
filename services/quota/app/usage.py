"""Use cases of usage events: record a batch exactly once, explain one (near misses included).

`record_usage` is the one hot path: `ReportUsage` is a batch of one. In one transaction it
locks every package the batch touches, finds event ids recorded before, applies the rest
through the pure deduction engine in order, and writes the results with few statements.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import orjson

from services.quota.adapters import near_miss_queries
from services.quota.adapters import packages_repository as packages_repo
from services.quota.adapters import usage_repository as usage_repo
from services.quota.app import alerts, spending_caps
from services.quota.app.context import QuotaContext
from services.quota.domain.deduction import (
    IneligibleReason,
    UsageEvent,
    apply_usage,
    left_out_reason,
)
from services.quota.domain.near_misses import ExplainedEvent, NearMiss, near_misses
from services.quota.domain.packages import Package, PackageState
from shared.db import UnitOfWork
from shared.errors import AllotError, InvalidArgument, NotFound
from shared.projects import normalize_project_id
from shared.timeutil import to_epoch_us
from shared.validation import check_account_id, check_length, check_quantity

MAX_BATCH = 1000
# A gateway's clock may run a little ahead of ours; further in the future is a bad timestamp.
FUTURE_TOLERANCE = timedelta(minutes=5)
# Usage may arrive late (a gateway's backlog; billing re-opens settled cycles and charges the
# rest as a further line), but at most 45 days late: usage of any day of a month may still
# arrive two weeks into the next, and a bill is not re-opened forever (docs/security.md).
MAX_USAGE_AGE = timedelta(days=45)


@dataclass(frozen=True)
class UsageInput:
    """A usage event as reported, before validation (occur_time None = now)."""

    event_id: str
    account_id: str
    user_id: str
    region: str
    api: str
    enterprise_project_id: str
    quantity: int
    http_status: int
    occur_time: datetime | None

    def fingerprint(self) -> str:
        """Digest of the event as reported; an unset occur_time stays unset, so a retry of the
        same report is recognised however late it arrives."""
        occur = "" if self.occur_time is None else str(to_epoch_us(self.occur_time))
        parts = (
            self.account_id,
            self.user_id,
            self.region,
            self.api,
            self.enterprise_project_id,
            str(self.quantity or 1),
            str(self.http_status),
            occur,
        )
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class UsageResult:
    event_id: str
    duplicate: bool
    billable: bool
    deductions: tuple[tuple[str, int], ...]
    pay_per_use_quantity: int
    remaining_quantity: int


class _Valid(NamedTuple):
    event: UsageEvent
    fingerprint: str


def validate_usage(
    ctx: QuotaContext, raw: UsageInput, now: datetime, checked: set | None = None
) -> _Valid:
    """The event checked; `checked` holds the (account, region, API) scopes of a batch found
    valid so far, checked once per batch (the same answer for every event of the scope)."""
    if not raw.event_id:
        raise InvalidArgument("event_id", "event_id is required")
    check_length(raw.event_id, "event_id")
    scope = (raw.account_id, raw.region, raw.api)
    known = checked is not None and scope in checked
    if not known:
        check_account_id(raw.account_id)
    check_length(raw.user_id, "user_id")
    if not known:
        ctx.check_region(raw.region)
        ctx.check_api(raw.api)
        if checked is not None:
            checked.add(scope)
    check_length(raw.enterprise_project_id, "enterprise_project_id")
    check_quantity(raw.quantity, "quantity")
    if not 100 <= raw.http_status <= 599:
        raise InvalidArgument("http_status", "http_status must be an HTTP status code (100-599)")
    occur_time = raw.occur_time or now
    if occur_time > now + FUTURE_TOLERANCE:
        raise InvalidArgument("occur_time", "occur_time lies in the future")
    if occur_time < now - MAX_USAGE_AGE:
        raise InvalidArgument(
            "occur_time", f"occur_time is older than {MAX_USAGE_AGE.days} days; too late to record"
        )
    event = UsageEvent(
        event_id=raw.event_id,
        account_id=raw.account_id,
        user_id=raw.user_id,
        region=raw.region,
        api=raw.api,
        enterprise_project_id=normalize_project_id(raw.enterprise_project_id),
        quantity=raw.quantity or 1,
        http_status=raw.http_status,
        occur_time=occur_time,
    )
    return _Valid(event, raw.fingerprint())


def _replay(stored: usage_repo.StoredUsage, fingerprint: str) -> UsageResult:
    if stored.fingerprint != fingerprint:
        raise InvalidArgument(
            "event_id",
            f"event_id {stored.event_id!r} was reported before with other content",
            reason="EVENT_ID_REUSED",
            event_id=stored.event_id,
        )
    return UsageResult(
        event_id=stored.event_id,
        duplicate=True,
        billable=stored.billable,
        deductions=stored.deductions,
        pay_per_use_quantity=stored.pay_per_use_quantity,
        remaining_quantity=stored.remaining_quantity,
    )


async def record_usage(
    ctx: QuotaContext, inputs: list[UsageInput | AllotError], inline: bool = False
) -> list[UsageResult | AllotError]:
    """Record a batch of events in order; an invalid event fails alone (its error in its slot).

    An input may already be an error (it failed to convert); it keeps its slot. `inline`: a
    short batch, recorded on the loop's thread on SQLite (the coalescer decides;
    `Database.transaction_inline`).
    """
    if len(inputs) > MAX_BATCH:
        raise InvalidArgument("requests", f"at most {MAX_BATCH} events per batch")
    now = ctx.now()
    slots: list[_Valid | AllotError] = []
    checked: set[tuple[str, str, str]] = set()
    for raw in inputs:
        if isinstance(raw, AllotError):
            slots.append(raw)
            continue
        try:
            slots.append(validate_usage(ctx, raw, now, checked))
        except AllotError as error:
            slots.append(error)
    valid = [s for s in slots if isinstance(s, _Valid)]
    if not valid:
        return list(slots)  # type: ignore[arg-type]

    try:
        return await _record_together(ctx, slots, valid, now, inline)
    except AllotError as error:
        if len(valid) == 1:
            return [error if s is valid[0] else s for s in slots]  # type: ignore[misc]
    # One event failed after validation (the batch's transaction rolled back, nothing was
    # written): record each valid event on its own, so the error lands in its slot only
    # (docs/security.md, "Hostile input").
    answers: list[UsageResult | AllotError] = []
    for slot in slots:
        if isinstance(slot, AllotError):
            answers.append(slot)
            continue
        try:
            answers.extend(await _record_together(ctx, [slot], [slot], now, inline))
        except AllotError as error:
            answers.append(error)
    return answers


async def _record_together(
    ctx: QuotaContext,
    slots: list[_Valid | AllotError],
    valid: list[_Valid],
    now: datetime,
    inline: bool = False,
) -> list[UsageResult | AllotError]:
    async def work(uow: UnitOfWork) -> list[UsageResult | AllotError]:
        return await _record(ctx, uow, slots, valid, now)

    if inline:
        return await ctx.db.transaction_inline(work)
    return await ctx.db.transaction(work)


async def _record(
    ctx: QuotaContext,
    uow: UnitOfWork,
    slots: list[_Valid | AllotError],
    valid: list[_Valid],
    now: datetime,
) -> list[UsageResult | AllotError]:
    scopes = {(v.event.account_id, v.event.region, v.event.api) for v in valid}
    since = min([now, *(v.event.occur_time for v in valid)])
    # Lock first, then look for recorded ids: a concurrent twin of an event has then either
    # committed (we see it as recorded) or waits behind us.
    candidates, recorded = await usage_repo.lock_and_find(
        uow, scopes, since, now, (v.event.event_id for v in valid)
    )
    records = candidates.records
    packages = [r.package for r in records]

    fresh: list[_Valid] = []
    first_in_batch: dict[str, _Valid] = {}
    for v in valid:
        if v.event.event_id in recorded or v.event.event_id in first_in_batch:
            continue
        first_in_batch[v.event.event_id] = v
        fresh.append(v)
    outcomes, changed = apply_usage([v.event for v in fresh], packages, ctx.policy)

    # Remaining of the packages in force now, per scope (those not read have none left), walked
    # forward event by event; deductions never change the quantity in force.
    counted = {p.package_id for p in packages if p.in_force_at(now)}
    remaining: dict[packages_repo.Scope, int] = defaultdict(int)
    for p in packages:
        if p.package_id in counted:
            remaining[(p.account_id, p.region, p.api)] += p.remaining_quantity
    walk: list[tuple[packages_repo.Scope, int]] = []

    results: dict[str, UsageResult] = {}
    rows = []
    record_us = to_epoch_us(now)
    for v, outcome in zip(fresh, outcomes, strict=True):
        e = v.event
        scope = (e.account_id, e.region, e.api)
        spent = sum(d.quantity for d in outcome.deductions if d.package_id in counted)
        if spent:
            remaining[scope] -= spent
            walk.append((scope, remaining[scope]))
        if outcome.pay_per_use_quantity:
            ctx.events.pay_per_use_recorded(uow, e, outcome.pay_per_use_quantity, now)
        deductions = tuple((d.package_id, d.quantity) for d in outcome.deductions)
        results[e.event_id] = UsageResult(
            event_id=e.event_id,
            duplicate=False,
            billable=outcome.billable,
            deductions=deductions,
            pay_per_use_quantity=outcome.pay_per_use_quantity,
            remaining_quantity=remaining[scope],
        )
        rows.append(
            {
                "event_id": e.event_id,
                "fingerprint": v.fingerprint,
                "account_id": e.account_id,
                "user_id": e.user_id,
                "region": e.region,
                "api": e.api,
                "enterprise_project_id": e.enterprise_project_id,
                "quantity": e.quantity,
                "http_status": e.http_status,
                "billable": outcome.billable,
                "occur_time_us": to_epoch_us(e.occur_time),
                "record_time_us": record_us,
                "package_quantity": outcome.package_quantity,
                "pay_per_use_quantity": outcome.pay_per_use_quantity,
                "remaining_quantity": remaining[scope],
                # orjson: encoding these two took as long as the deduction itself.
                "deductions": orjson.dumps(deductions).decode(),
                "explanation": orjson.dumps(usage_repo.explanation_json(outcome)).decode(),
            }
        )
    await usage_repo.save_batch(uow, _announce_exhausted(ctx, uow, records, changed, now), rows)
    # The month's pay-per-use, counted for spending caps (docs/design/spending-cap.md).
    recorded_pay_per_use = [
        (v.event, o.pay_per_use_quantity) for v, o in zip(fresh, outcomes, strict=True)
    ]
    await spending_caps.after_usage(ctx, uow, recorded_pay_per_use)
    await alerts.after_usage(ctx, uow, walk, candidates.in_force, now)

    answers = _answers(slots, recorded, first_in_batch, results)
    ctx.events.metrics.usage_recorded(
        uow,
        deducted_events=sum(1 for o in outcomes if o.deductions),
        deducted=sum(d.quantity for o in outcomes for d in o.deductions),
        pay_per_use=sum(o.pay_per_use_quantity for o in outcomes),
        duplicates=sum(1 for a in answers if isinstance(a, UsageResult) and a.duplicate),
    )
    return answers


def _answers(
    slots: list[_Valid | AllotError],
    recorded: dict[str, usage_repo.StoredUsage],
    first_in_batch: dict[str, _Valid],
    results: dict[str, UsageResult],
) -> list[UsageResult | AllotError]:
    """Each slot's answer: its error, a replay of what was recorded, or the new result."""
    answers: list[UsageResult | AllotError] = []
    for slot in slots:
        if isinstance(slot, AllotError):
            answers.append(slot)
            continue
        event_id = slot.event.event_id
        try:
            if event_id in recorded:
                answers.append(_replay(recorded[event_id], slot.fingerprint))
            elif first_in_batch[event_id] is not slot:
                # The same id twice in one batch: the second is a repeat of the first.
                first = first_in_batch[event_id]
                if first.fingerprint != slot.fingerprint:
                    raise InvalidArgument(
                        "event_id",
                        f"event_id {event_id!r} appears twice in the batch with other content",
                        reason="EVENT_ID_REUSED",
                        event_id=event_id,
                    )
                answers.append(dataclasses.replace(results[event_id], duplicate=True))
            else:
                answers.append(results[event_id])
        except AllotError as error:
            answers.append(error)
    return answers


def _announce_exhausted(
    ctx: QuotaContext,
    uow: UnitOfWork,
    records: list[packages_repo.PackageRecord],
    changed: dict[str, Package],
    now: datetime,
) -> list[packages_repo.PackageRecord]:
    """The changed packages as records; those the batch emptied announce EXHAUSTED."""
    by_id = {r.package.package_id: r for r in records}
    out = []
    for package_id, package in changed.items():
        record = dataclasses.replace(by_id[package_id], package=package)
        if (
            record.announced_state == PackageState.ACTIVE
            and package.state_at(now) == PackageState.EXHAUSTED
        ):
            record = dataclasses.replace(record, announced_state=PackageState.EXHAUSTED)
            ctx.events.package_state_changed(uow, record, PackageState.ACTIVE, now)
        out.append(record)
    return out


@dataclass(frozen=True)
class Explained:
    """A recorded event's explanation and, for pay-per-use, its near misses."""

    usage: usage_repo.StoredUsage
    near_misses: tuple[NearMiss, ...]


async def explain_usage(
    ctx: QuotaContext, event_id: str, visible_regions: tuple[str, ...] | None = None
) -> Explained:
    """The event as recorded, its explanation completed with the packages of its scope that
    the hot path did not read (revoked, expired or used up when it was recorded; see
    `left_out_reason`), listed with the other ineligible candidates by package id; and for an
    event with pay-per-use calls its near misses (`domain/near_misses.py`), looked for in the
    served regions of `visible_regions` (every served region when None)."""
    if not event_id:
        raise InvalidArgument("event_id", "event_id is required")

    async def work(uow: UnitOfWork) -> Explained:
        found = (await usage_repo.find_usage(uow, [event_id])).get(event_id)
        if found is None:
            raise NotFound(
                "USAGE_EVENT_NOT_FOUND", f"no usage event {event_id!r}", event_id=event_id
            )
        scope = (found.account_id, found.region, found.api)
        scope_packages = await packages_repo.left_out_packages(
            uow, scope, found.occur_time, found.record_time
        )
        explained = _with_left_out(found, scope_packages)
        if found.pay_per_use_quantity <= 0:
            return Explained(explained, ())
        regions = ctx.regions_or_all("", visible_regions)
        others = await near_miss_queries.packages_near(
            uow,
            account_id=found.account_id,
            region=found.region,
            api=found.api,
            regions=regions,
            occur_time=found.occur_time,
            recorded_at=found.record_time,
        )
        ineligible = {
            c[0]: IneligibleReason(c[3]) for c in explained.explanation["candidates"] if not c[2]
        }
        event = ExplainedEvent(
            found.region,
            found.api,
            found.occur_time,
            found.record_time,
            found.pay_per_use_quantity,
        )
        return Explained(explained, near_misses(event, ineligible, scope_packages, others))

    return await ctx.db.read(work)


def _with_left_out(
    found: usage_repo.StoredUsage, packages: list[Package]
) -> usage_repo.StoredUsage:
    listed = found.explanation["candidates"]
    read = {c[0] for c in listed}
    added = [
        [
            p.package_id,
            0,
            False,
            left_out_reason(
                p, found.enterprise_project_id, found.occur_time, found.record_time
            ).value,
            0,
        ]
        for p in packages
        if p.package_id not in read
    ]
    if not added:
        return found
    eligible = [c for c in listed if c[2]]
    ineligible = sorted([*(c for c in listed if not c[2]), *added], key=lambda c: c[0])
    explanation = {**found.explanation, "candidates": eligible + ineligible}
    return dataclasses.replace(found, explanation=explanation)
