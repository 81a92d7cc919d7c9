"""Use cases of packages: grant, read, list, renew, revoke, and the quota summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from services.quota.adapters import history_repository as history_repo
from services.quota.adapters import packages_repository as packages_repo
from services.quota.app import alerts
from services.quota.app.context import QuotaContext
from services.quota.domain.packages import (
    ALL_PROJECTS,
    Package,
    PackageSource,
    PackageState,
    QuotaTotals,
)
from services.quota.domain.simulation import ChangeKind
from shared.db import UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.ids import new_id
from shared.projects import check_project_filter, normalize_project_id
from shared.validation import MAX_QUANTITY, check_account_id


@dataclass(frozen=True)
class GrantInput:
    account_id: str
    region: str
    api: str
    enterprise_project_id: str
    source: int
    total_quantity: int
    effective_time: datetime | None
    expire_time: datetime | None
    order_id: str


def package_not_found(package_id: str) -> NotFound:
    return NotFound("PACKAGE_NOT_FOUND", f"no package {package_id!r}", package_id=package_id)


async def grant_package(
    ctx: QuotaContext, uow: UnitOfWork, spec: GrantInput
) -> packages_repo.PackageRecord:
    now = ctx.now()
    check_account_id(spec.account_id, "package.account_id")
    ctx.check_region(spec.region, "package.region")
    ctx.check_api(spec.api, "package.api")
    project = spec.enterprise_project_id
    if project and normalize_project_id(project) != project:
        raise InvalidArgument(
            "package.enterprise_project_id",
            "enterprise_project_id must be 1-64 letters, digits, '-' or '_' (empty = all projects)",
        )
    if spec.source not in tuple(PackageSource):
        raise InvalidArgument("package.source", "source must be FREE, PROMOTION or SUBSCRIPTION")
    if not 0 < spec.total_quantity <= MAX_QUANTITY:
        raise InvalidArgument(
            "package.total_quantity", f"total_quantity must be between 1 and {MAX_QUANTITY}"
        )
    if spec.expire_time is None:
        raise InvalidArgument("package.expire_time", "expire_time is required")
    effective = spec.effective_time or now
    if spec.expire_time < effective:
        raise InvalidArgument("package.expire_time", "expire_time is before effective_time")
    if len(spec.order_id) > 64:
        raise InvalidArgument("package.order_id", "order_id is longer than 64 characters")
    package = Package(
        package_id=new_id("pkg"),
        account_id=spec.account_id,
        region=spec.region,
        api=spec.api,
        enterprise_project_id=project or ALL_PROJECTS,
        source=PackageSource(spec.source),
        total_quantity=spec.total_quantity,
        used_quantity=0,
        effective_time=effective,
        expire_time=spec.expire_time,
        create_time=now,
        order_id=spec.order_id,
    )
    # What the outbox will consider announced: a package granted in force needs no activation
    # event; one that starts later is announced when the clock reaches it.
    record = packages_repo.PackageRecord(package, announced_state=package.state_at(now))
    await packages_repo.insert_package(uow, record)
    await history_repo.record_change(uow, package, ChangeKind.GRANT, now)
    if package.in_force_at(now):
        await alerts.reevaluate(ctx, uow, package.account_id, package.region, [package.api], now)
    return record


async def get_package(ctx: QuotaContext, package_id: str) -> packages_repo.PackageRecord:
    if not package_id:
        raise InvalidArgument("package_id", "package_id is required")

    async def work(uow: UnitOfWork) -> packages_repo.PackageRecord:
        record = await packages_repo.get_package(uow, package_id)
        if record is None:
            raise package_not_found(package_id)
        return record

    return await ctx.db.read(work)


async def list_packages(
    ctx: QuotaContext,
    *,
    account_id: str,
    region: str,
    visible_regions: tuple[str, ...] | None,
    api: str,
    states: list[int],
    after_id: str | None,
    limit: int,
    project: str = "",
) -> list[packages_repo.PackageRecord]:
    """A page of packages; with `project`, only those that project may use (designated for
    it, or for every project)."""
    if account_id:
        check_account_id(account_id)
    regions = ctx.regions_or_all(region, visible_regions)
    if api:
        ctx.check_api(api)
    project = check_project_filter(project)
    try:
        wanted = [PackageState(s) for s in states]
    except ValueError as exc:
        raise InvalidArgument("states", "unknown package state") from exc

    async def work(uow: UnitOfWork) -> list[packages_repo.PackageRecord]:
        return await packages_repo.list_packages(
            uow,
            account_id=account_id,
            regions=regions,
            api=api,
            states=wanted,
            now=ctx.now(),
            after_id=after_id,
            limit=limit,
            project=project,
        )

    return await ctx.db.read(work)


# Called with a package before it is changed: the API layer's check that the caller may.
Guard = Callable[[Package], None]


async def _load_for_change(
    uow: UnitOfWork, package_id: str, guard: Guard
) -> packages_repo.PackageRecord:
    if not package_id:
        raise InvalidArgument("package_id", "package_id is required")
    record = await packages_repo.get_package(uow, package_id, for_update=True)
    if record is None:
        raise package_not_found(package_id)
    guard(record.package)
    return record


async def renew_package(
    ctx: QuotaContext,
    uow: UnitOfWork,
    package_id: str,
    expire_time: datetime | None,
    add_quantity: int,
    guard: Guard,
) -> packages_repo.PackageRecord:
    """Extend to `expire_time` and add quantity. Renewing an expired package (billing allows a
    grace window) forfeits its old remainder first: the new period does not revive it."""
    now = ctx.now()
    record = await _load_for_change(uow, package_id, guard)
    package = record.package
    state = package.state_at(now)
    if state == PackageState.REVOKED:
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            "a revoked package cannot be renewed",
            package_id=package_id,
            state=state.name,
        )
    if add_quantity < 0 or package.total_quantity + add_quantity > MAX_QUANTITY:
        raise InvalidArgument(
            "add_quantity",
            f"add_quantity must not be negative nor take total_quantity past {MAX_QUANTITY}",
        )
    new_expire = expire_time or package.expire_time
    if new_expire < package.expire_time:
        raise InvalidArgument("expire_time", "expire_time must not move the expiry earlier")
    if new_expire == package.expire_time and add_quantity == 0:
        raise InvalidArgument("expire_time", "a renewal must extend expire_time or add quantity")
    used = package.total_quantity if state == PackageState.EXPIRED else package.used_quantity
    renewed = dataclasses.replace(
        package,
        total_quantity=package.total_quantity + add_quantity,
        used_quantity=used,
        expire_time=new_expire,
    )
    # A new expiry gets its own expiring warning.
    record = dataclasses.replace(
        record, expiring_announced=record.expiring_announced and new_expire == package.expire_time
    )
    forfeit = state == PackageState.EXPIRED
    await history_repo.record_change(uow, renewed, ChangeKind.RENEWAL, now, forfeit=forfeit)
    return await _save_change(ctx, uow, record, renewed, now)


async def revoke_package(
    ctx: QuotaContext, uow: UnitOfWork, package_id: str, reason: str, guard: Guard
) -> packages_repo.PackageRecord:
    now = ctx.now()
    if len(reason) > 500:
        raise InvalidArgument("reason", "reason is longer than 500 characters")
    record = await _load_for_change(uow, package_id, guard)
    if record.package.revoke_time is not None:
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            "the package is already revoked",
            package_id=package_id,
            state="REVOKED",
        )
    revoked = dataclasses.replace(record.package, revoke_time=now)
    await history_repo.record_change(uow, revoked, ChangeKind.REVOCATION, now)
    return await _save_change(
        ctx, uow, dataclasses.replace(record, revoke_reason=reason), revoked, now
    )


async def _save_change(
    ctx: QuotaContext,
    uow: UnitOfWork,
    record: packages_repo.PackageRecord,
    package: Package,
    now: datetime,
) -> packages_repo.PackageRecord:
    """Save a renewed or revoked package: announce its new state if it moved, and re-arm the
    scope's alerts when the aggregate in force changed."""
    share_before = _share_in_force(record.package, now)
    state = package.state_at(now)
    changed = dataclasses.replace(record, package=package, announced_state=state)
    if state != record.announced_state:
        ctx.events.package_state_changed(uow, changed, record.announced_state, now)
    await packages_repo.save_package(uow, changed)
    if _share_in_force(package, now) != share_before:
        await alerts.reevaluate(ctx, uow, package.account_id, package.region, [package.api], now)
    return changed


def _share_in_force(package: Package, now: datetime) -> int:
    """What the package adds to its scope's aggregate total now; alerts re-arm when it moves."""
    return package.total_quantity if package.in_force_at(now) else 0


@dataclass(frozen=True)
class SummaryItem:
    region: str
    api: str
    totals: QuotaTotals


async def quota_summary(
    ctx: QuotaContext,
    account_id: str,
    region: str,
    visible_regions: tuple[str, ...] | None,
    api: str,
    project: str = "",
) -> list[SummaryItem]:
    """The packages in force summed per region and API; with `project`, only those that
    project may use (designated for it, or for every project): what it can spend."""
    check_account_id(account_id)
    regions = ctx.regions_or_all(region, visible_regions)
    if api:
        ctx.check_api(api)
    project = check_project_filter(project)

    async def work(uow: UnitOfWork) -> list[SummaryItem]:
        rows = await packages_repo.summarize(uow, account_id, regions, api, ctx.now(), project)
        return [
            SummaryItem(
                r.region,
                r.api,
                QuotaTotals(
                    quantity_in_force=int(r.total),
                    used_quantity=int(r.used),
                    remaining_quantity=int(r.total) - int(r.used),
                    active_package_count=int(r.active),
                ),
            )
            for r in rows
        ]

    return await ctx.db.read(work)
