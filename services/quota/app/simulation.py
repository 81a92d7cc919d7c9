"""Use case of the what-if replay, `SimulateUsage` (docs/design/what-if.md). Read-only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.quota.adapters import history_repository as history_repo
from services.quota.app.context import QuotaContext
from services.quota.domain.deduction import DeductionPolicy
from services.quota.domain.packages import ALL_PROJECTS, Package, PackageSource
from services.quota.domain.simulation import Replay, SimulationResult
from shared.db import UnitOfWork
from shared.errors import InvalidArgument
from shared.projects import normalize_project_id
from shared.validation import check_account_id
from shared.validity import ValidityOutOfRange, package_expire_time

# The bounds of one replay (docs/design/what-if.md, "Bounds").
MAX_RANGE = timedelta(days=400)
MAX_EVENTS = 1_000_000
MAX_HYPOTHETICAL_ENTRIES = 20
MAX_HYPOTHETICAL_PACKAGES = 100


@dataclass(frozen=True)
class HypotheticalInput:
    offer_id: str
    start_time: datetime | None
    count: int
    enterprise_project_id: str = ""


@dataclass(frozen=True)
class SimulationInput:
    account_id: str
    region: str
    api: str
    start_time: datetime | None
    end_time: datetime | None
    policy: str = ""
    packages: tuple[HypotheticalInput, ...] = ()
    # None: the real packages take part only when no hypothetical ones are given.
    use_real_packages: bool | None = None


def _policy(ctx: QuotaContext, value: str) -> DeductionPolicy:
    if not value:
        return ctx.policy
    try:
        return DeductionPolicy(value)
    except ValueError as exc:
        raise InvalidArgument("policy", "policy must be standard or expiring_first") from exc


def _range(spec: SimulationInput) -> tuple[datetime, datetime]:
    if spec.start_time is None:
        raise InvalidArgument("start_time", "start_time is required")
    if spec.end_time is None:
        raise InvalidArgument("end_time", "end_time is required")
    if spec.end_time <= spec.start_time:
        raise InvalidArgument("end_time", "end_time must be after start_time")
    if spec.end_time - spec.start_time > MAX_RANGE:
        raise InvalidArgument("end_time", f"the range is longer than {MAX_RANGE.days} days")
    return spec.start_time, spec.end_time


def hypothetical_packages(ctx: QuotaContext, spec: SimulationInput) -> list[Package]:
    """The packages the request pretends the account had, built from the catalog's offers."""
    if len(spec.packages) > MAX_HYPOTHETICAL_ENTRIES:
        raise InvalidArgument("packages", f"at most {MAX_HYPOTHETICAL_ENTRIES} packages")
    built: list[Package] = []
    for i, wanted in enumerate(spec.packages):
        field = f"packages[{i}]"
        offer = ctx.catalog.offers.get(wanted.offer_id)
        if offer is None:
            raise InvalidArgument(f"{field}.offer_id", f"no offer {wanted.offer_id!r}")
        if offer.api != spec.api or spec.region not in offer.regions:
            raise InvalidArgument(
                f"{field}.offer_id",
                f"offer {offer.id!r} is not sold for {spec.api!r} in {spec.region!r}",
            )
        if wanted.start_time is None:
            raise InvalidArgument(f"{field}.start_time", "start_time is required")
        count = wanted.count or 1
        if not 1 <= count <= MAX_HYPOTHETICAL_PACKAGES:
            raise InvalidArgument(
                f"{field}.count", f"count must be between 1 and {MAX_HYPOTHETICAL_PACKAGES}"
            )
        project = wanted.enterprise_project_id
        if project and normalize_project_id(project) != project:
            raise InvalidArgument(f"{field}.enterprise_project_id", "malformed project id")
        try:
            expire = package_expire_time(wanted.start_time, offer.validity_months, ctx.tz)
        except ValidityOutOfRange as exc:
            raise InvalidArgument(f"{field}.start_time", "start_time is out of range") from exc
        for k in range(count):
            built.append(
                Package(
                    package_id=f"hypothetical-{i + 1}-{k + 1}",
                    account_id=spec.account_id,
                    region=spec.region,
                    api=spec.api,
                    enterprise_project_id=project or ALL_PROJECTS,
                    source=PackageSource.SUBSCRIPTION,
                    total_quantity=offer.quantity,
                    used_quantity=0,
                    effective_time=wanted.start_time,
                    expire_time=expire,
                    create_time=wanted.start_time,
                )
            )
        if len(built) > MAX_HYPOTHETICAL_PACKAGES:
            raise InvalidArgument(
                f"{field}.count", f"at most {MAX_HYPOTHETICAL_PACKAGES} packages in all"
            )
    return built


def _too_many(count: int) -> InvalidArgument:
    return InvalidArgument(
        "start_time",
        f"the replay would read {count} events, more than {MAX_EVENTS}; narrow the range",
    )


async def simulate_usage(
    ctx: QuotaContext, spec: SimulationInput, keep_events: bool = False
) -> SimulationResult:
    """Replay the scope's recorded usage; with `keep_events`, every replayed event's outcome
    beside what was recorded (the exactness check)."""
    check_account_id(spec.account_id)
    ctx.check_region(spec.region)
    ctx.check_api(spec.api)
    start, end = _range(spec)
    policy = _policy(ctx, spec.policy)
    hypothetical = hypothetical_packages(ctx, spec)
    use_real = spec.use_real_packages
    if use_real is None:
        use_real = not spec.packages
    scope = (spec.account_id, spec.region, spec.api)
    # Without the real packages, events before the window matter to nothing.
    since = None if use_real else start

    async def work(uow: UnitOfWork) -> SimulationResult:
        count = await history_repo.count_events(uow, scope, end, since)
        if count > MAX_EVENTS:
            raise _too_many(count)
        changes = await history_repo.scope_changes(uow, scope) if use_real else []
        base = await history_repo.packages_without_history(uow, scope) if use_real else []
        replay = Replay(
            scope=scope,
            start=start,
            end=end,
            policy=policy,
            changes=changes,
            base=base,
            hypothetical=hypothetical,
            keep_events=keep_events,
            tz=ctx.tz,
        )
        read = 0
        async for page in history_repo.recorded_events(uow, scope, end, since):
            read += len(page)
            if read > MAX_EVENTS:  # late events recorded while the replay runs
                raise _too_many(read)
            replay.feed(page)
        return replay.finish()

    return await ctx.db.read(work)
