"""What-if replay: recorded usage run again through the deduction engine (docs/design/what-if.md).

A replay walks one scope's (account, region, API) recorded events in the order they were
recorded. Before each event it applies the package changes (grants, renewals, revocations)
recorded before it, so every real package is as that event saw it; the events themselves go
through `apply_usage`, the one deduction engine, in runs between two changes. Events that
occurred before the window are not decided again: their recorded deductions are applied as
they happened, so the real packages enter the window with what was really used. Hypothetical
packages are there from the start (their effective time decides when they can pay).

*Forfeited* is what a package still held when it expired within the window: a package whose
last covered second lies in [start, end) (and that was not revoked), or the remainder a renewal
of an expired package gave up (its old expiry in the window).

Nothing here reads a clock or a database.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from services.quota.domain.deduction import DeductionPolicy, UsageEvent, UsageOutcome, apply_usage
from services.quota.domain.packages import ALL_PROJECTS, Package, PackageSource
from shared.validity import ONE_SECOND

UTC_ZONE = ZoneInfo("UTC")


class ChangeKind(enum.IntEnum):
    GRANT = 1
    RENEWAL = 2
    REVOCATION = 3


@dataclass(frozen=True)
class PackageChange:
    """A recorded grant, renewal or revocation: the package's state after it, numbered `seq`
    in the order of the scope's history."""

    seq: int
    kind: ChangeKind
    package_id: str
    change_time: datetime
    total_quantity: int
    expire_time: datetime
    # A renewal of an expired package: the old remainder was forfeited (used = old total).
    forfeit: bool
    enterprise_project_id: str
    source: PackageSource
    effective_time: datetime
    create_time: datetime


@dataclass(frozen=True)
class RecordedEvent:
    """A recorded usage event, its place in the history and what it was recorded to cost."""

    event: UsageEvent
    seq: int
    deductions: tuple[tuple[str, int], ...]
    pay_per_use_quantity: int


@dataclass(frozen=True)
class Forfeiture:
    package_id: str
    quantity: int
    expire_time: datetime


@dataclass(frozen=True)
class EventReplay:
    """One replayed event: as recorded and as the replay decided it."""

    recorded: RecordedEvent
    outcome: UsageOutcome

    @property
    def replayed_deductions(self) -> tuple[tuple[str, int], ...]:
        return tuple((d.package_id, d.quantity) for d in self.outcome.deductions)


@dataclass(frozen=True)
class MonthTotals:
    """The replayed calls of one calendar month (``month_start``: its first instant, UTC)."""

    month_start: datetime
    package_paid_quantity: int
    pay_per_use_quantity: int


@dataclass(frozen=True)
class SimulationResult:
    package_paid_quantity: int
    pay_per_use_quantity: int
    forfeited: tuple[Forfeiture, ...]
    # package id -> calls it paid for, for every package that paid for at least one.
    per_package: dict[str, int]
    event_count: int
    # Per calendar month of the replay's time zone, oldest first; months without events left out.
    months: tuple[MonthTotals, ...] = ()
    # Every replayed event, when the replay was asked to keep them.
    events: tuple[EventReplay, ...] = ()


@dataclass
class Replay:
    """A replay of one scope fed page by page (`feed`), then `finish`ed.

    ``changes`` are the scope's package changes in order; ``base`` are packages with no
    recorded grant (granted before the history existed), taken as they are now with nothing
    used; ``hypothetical`` packages exist from the start.
    """

    scope: tuple[str, str, str]  # account, region, API
    start: datetime
    end: datetime
    policy: DeductionPolicy
    changes: Sequence[PackageChange] = ()
    base: Iterable[Package] = ()
    hypothetical: Iterable[Package] = ()
    keep_events: bool = False
    # The calendar of `SimulationResult.months` (the billing time zone).
    tz: ZoneInfo = UTC_ZONE
    _packages: dict[str, Package] = field(default_factory=dict, init=False)
    _next_change: int = field(default=0, init=False)
    _batch: list[RecordedEvent] = field(default_factory=list, init=False)
    _paid: int = field(default=0, init=False)
    _pay_per_use: int = field(default=0, init=False)
    _count: int = field(default=0, init=False)
    _used: dict[str, int] = field(default_factory=lambda: defaultdict(int), init=False)
    _forfeited: list[Forfeiture] = field(default_factory=list, init=False)
    _kept: list[EventReplay] = field(default_factory=list, init=False)
    # month start -> [package-paid, pay-per-use]
    _months: dict[datetime, list[int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for package in (*self.base, *self.hypothetical):
            if package.package_id in self._packages:
                raise ValueError(f"package {package.package_id!r} given twice")
            self._packages[package.package_id] = dataclasses.replace(package, used_quantity=0)

    def feed(self, events: Iterable[RecordedEvent]) -> None:
        """Replay the next events, in the order they were recorded."""
        for recorded in events:
            self._changes_before(recorded.seq)
            if recorded.event.occur_time < self.start:
                self._flush()
                self._as_recorded(recorded)
            elif recorded.event.occur_time < self.end:
                self._batch.append(recorded)

    def finish(self) -> SimulationResult:
        self._flush()
        # Later changes still count when they happened within the window (a renewal before
        # expiry moves the expiry out of it).
        while self._next_change < len(self.changes):
            change = self.changes[self._next_change]
            self._next_change += 1
            if change.change_time < self.end:
                self._apply_change(change)
        forfeited = list(self._forfeited)
        for package in self._packages.values():
            if (
                package.revoke_time is None
                and self.start <= package.expire_time < self.end
                and package.remaining_quantity > 0
            ):
                forfeited.append(
                    Forfeiture(package.package_id, package.remaining_quantity, package.expire_time)
                )
        forfeited.sort(key=lambda f: (f.expire_time, f.package_id))
        return SimulationResult(
            package_paid_quantity=self._paid,
            pay_per_use_quantity=self._pay_per_use,
            forfeited=tuple(forfeited),
            per_package={k: v for k, v in sorted(self._used.items()) if v},
            event_count=self._count,
            months=tuple(MonthTotals(m, *q) for m, q in sorted(self._months.items())),
            events=tuple(self._kept),
        )

    # --- internals ------------------------------------------------------------------------

    def _month_of(self, t: datetime) -> datetime:
        local = t.astimezone(self.tz)
        first = datetime(local.year, local.month, 1, tzinfo=self.tz)
        return first.astimezone(UTC)

    def _changes_before(self, seq: int) -> None:
        while self._next_change < len(self.changes) and self.changes[self._next_change].seq < seq:
            if self._batch:
                self._flush()
            self._apply_change(self.changes[self._next_change])
            self._next_change += 1

    def _apply_change(self, change: PackageChange) -> None:
        current = self._packages.get(change.package_id)
        if change.kind is ChangeKind.GRANT or current is None:
            self._packages[change.package_id] = Package(
                package_id=change.package_id,
                account_id=self.scope[0],
                region=self.scope[1],
                api=self.scope[2],
                enterprise_project_id=change.enterprise_project_id,
                source=change.source,
                total_quantity=change.total_quantity,
                used_quantity=0,
                effective_time=change.effective_time,
                expire_time=change.expire_time,
                create_time=change.create_time,
            )
            return
        if change.kind is ChangeKind.REVOCATION:
            self._packages[change.package_id] = dataclasses.replace(
                current, revoke_time=change.change_time
            )
            return
        used = current.used_quantity
        if change.forfeit:
            # Renewing an expired package forfeits its old remainder (app/packages.py).
            if current.remaining_quantity > 0 and self.start <= current.expire_time < self.end:
                self._forfeited.append(
                    Forfeiture(current.package_id, current.remaining_quantity, current.expire_time)
                )
            used = current.total_quantity
        self._packages[change.package_id] = dataclasses.replace(
            current,
            total_quantity=change.total_quantity,
            used_quantity=used,
            expire_time=change.expire_time,
        )

    def _as_recorded(self, recorded: RecordedEvent) -> None:
        for package_id, quantity in recorded.deductions:
            package = self._packages.get(package_id)
            if package is not None:
                used = min(package.total_quantity, package.used_quantity + quantity)
                self._packages[package_id] = dataclasses.replace(package, used_quantity=used)

    def _runs(self, batch: list[RecordedEvent]) -> list[tuple[RecordedEvent, int]]:
        """Consecutive events the engine cannot tell apart but by their quantity, merged into
        one: the same billability, month, packages whose validity covers the call and, when a
        package is designated for a project, project. Deducting their sum at once takes from
        each package exactly what deducting them one by one takes (the eligible packages and
        their order are the same; each takes until empty, then the next). Not done when the
        replay keeps every event. Returns (event, how many events it stands for)."""
        if self.keep_events:
            return [(r, 1) for r in batch]
        packages = list(self._packages.values())
        designated = any(p.enterprise_project_id != ALL_PROJECTS for p in packages)
        bounds = [(p.effective_time, p.expire_time + ONE_SECOND) for p in packages]
        runs: list[tuple[RecordedEvent, int, int]] = []  # first event, count, quantity
        previous = None
        for recorded in batch:
            e = recorded.event
            t = e.occur_time
            key = (
                e.billable,
                self._month_of(t),
                e.enterprise_project_id if designated else "",
                tuple(start <= t < stop for start, stop in bounds),
            )
            if runs and key == previous:
                first, count, quantity = runs[-1]
                runs[-1] = (first, count + 1, quantity + e.quantity)
            else:
                runs.append((recorded, 1, e.quantity))
                previous = key
        return [
            (
                first
                if count == 1
                else dataclasses.replace(
                    first, event=dataclasses.replace(first.event, quantity=quantity)
                ),
                count,
            )
            for first, count, quantity in runs
        ]

    def _flush(self) -> None:
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        runs = self._runs(batch)
        outcomes, changed = apply_usage(
            [r.event for r, _ in runs], self._packages.values(), self.policy
        )
        for package_id, package in changed.items():
            self._packages[package_id] = dataclasses.replace(
                self._packages[package_id], used_quantity=package.used_quantity
            )
        for (recorded, count), outcome in zip(runs, outcomes, strict=True):
            self._count += count
            self._pay_per_use += outcome.pay_per_use_quantity
            for deduction in outcome.deductions:
                self._paid += deduction.quantity
                self._used[deduction.package_id] += deduction.quantity
            if outcome.billable:
                month = self._months.setdefault(self._month_of(recorded.event.occur_time), [0, 0])
                month[0] += outcome.package_quantity
                month[1] += outcome.pay_per_use_quantity
            if self.keep_events:
                self._kept.append(EventReplay(recorded, outcome))
