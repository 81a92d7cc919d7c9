"""The deduction engine: which packages pay for a usage event, and why.

How a call is paid for
======================

A usage event reports ``quantity`` calls of one API, in one region, by one account, under one
enterprise project, at ``occur_time`` t. Only *billable* calls (HTTP status 2xx) cost
anything; a failed call is recorded and touches no package.

The *candidates* of an event are the account's packages for the same region and API. A
candidate is *eligible* when all of these hold, checked in this order (the first that fails
is the ``IneligibleReason`` that ``ExplainUsage`` reports):

- it has not been revoked (``REVOKED``) — whenever the revocation happened: an event reported
  late, with t before the revocation, still cannot draw on quota that was taken back;
- it has begun at t (``NOT_YET_EFFECTIVE``) and not ended (``EXPIRED``): validity runs from
  ``effective_time`` up to and including the second ``expire_time``. Only t matters, so a
  late report of a call made while the package was valid is still paid by it;
- it is designated for the event's project or for all projects (``OTHER_PROJECT``);
- it has quantity left (``EXHAUSTED``).

Eligible packages are burnt down one after another in this order (policy ``standard``):

1. ``project_scope`` — packages designated for the event's project before all-project ones,
   so quota bought for a project is spent there and the shared quota is kept for the others;
2. ``source`` — ``FREE``, then ``PROMOTION``, then ``SUBSCRIPTION`` (purchased): what was
   given away is used before what was paid for, however old the purchase;
3. ``effective_time`` — the earlier start first;
4. ``expire_time`` — then the earlier end first;
5. ``create_time`` — then the package created first;
6. ``package_id`` — then the smaller id, so the order is total and reproducible.

Policy ``expiring_first`` swaps steps 3 and 4: the earlier end goes first, which minimises the
quota forfeited at expiry. The step names stay the same under either policy.

The units of an event are taken from the first package until it is empty, then from the next;
whatever no package covers is *pay-per-use* quantity. Events of a batch are applied in order,
each seeing the packages as the previous ones left them.

Every outcome records the candidates (eligible ones by rank, then the others by id), what
each paid, and the *decisive rule*: the first step at which the first two eligible candidates
differ — the reason the call was paid by package B and not by A. ``only_candidate`` and
``no_candidate`` say there was nothing to choose between; ``not_billable`` marks failed calls.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from services.quota.domain.packages import ALL_PROJECTS, Package
from shared.projects import normalize_project_id
from shared.validity import ONE_SECOND, as_utc


class DeductionPolicy(enum.StrEnum):
    STANDARD = "standard"
    # Swaps steps 3 and 4 of the order: the package that expires first is used first.
    EXPIRING_FIRST = "expiring_first"


class DecisiveRule(enum.StrEnum):
    PROJECT_SCOPE = "project_scope"
    SOURCE = "source"
    EFFECTIVE_TIME = "effective_time"
    EXPIRE_TIME = "expire_time"
    CREATE_TIME = "create_time"
    PACKAGE_ID = "package_id"
    ONLY_CANDIDATE = "only_candidate"
    NO_CANDIDATE = "no_candidate"
    NOT_BILLABLE = "not_billable"


class IneligibleReason(enum.StrEnum):
    NOT_YET_EFFECTIVE = "not_yet_effective"
    EXPIRED = "expired"
    REVOKED = "revoked"
    EXHAUSTED = "exhausted"
    OTHER_PROJECT = "other_project"


_STANDARD_STEPS = (
    DecisiveRule.PROJECT_SCOPE,
    DecisiveRule.SOURCE,
    DecisiveRule.EFFECTIVE_TIME,
    DecisiveRule.EXPIRE_TIME,
    DecisiveRule.CREATE_TIME,
    DecisiveRule.PACKAGE_ID,
)
_EXPIRING_FIRST_STEPS = (
    DecisiveRule.PROJECT_SCOPE,
    DecisiveRule.SOURCE,
    DecisiveRule.EXPIRE_TIME,
    DecisiveRule.EFFECTIVE_TIME,
    DecisiveRule.CREATE_TIME,
    DecisiveRule.PACKAGE_ID,
)


_STEPS = {
    DeductionPolicy.STANDARD: _STANDARD_STEPS,
    DeductionPolicy.EXPIRING_FIRST: _EXPIRING_FIRST_STEPS,
}


def deduction_steps(policy: DeductionPolicy) -> tuple[DecisiveRule, ...]:
    """The steps of the deduction order under ``policy``, most significant first."""
    return _STEPS[DeductionPolicy(policy)]


@dataclass(frozen=True)
class UsageEvent:
    """``quantity`` calls reported by a gateway; ``enterprise_project_id`` is normalized."""

    event_id: str
    account_id: str
    user_id: str
    region: str
    api: str
    enterprise_project_id: str
    quantity: int
    http_status: int
    occur_time: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "occur_time", as_utc(self.occur_time, "occur_time"))
        if isinstance(self.quantity, bool) or not isinstance(self.quantity, int):
            raise TypeError(f"quantity must be an int, got {type(self.quantity).__name__}")
        if self.quantity < 1:
            raise ValueError(f"quantity must be >= 1, got {self.quantity}")
        # An un-normalized id (an empty one above all) would match packages it must not.
        if normalize_project_id(self.enterprise_project_id) != self.enterprise_project_id:
            raise ValueError(
                f"enterprise_project_id {self.enterprise_project_id!r} is not normalized"
            )

    @property
    def billable(self) -> bool:
        return 200 <= self.http_status <= 299


@dataclass(frozen=True)
class Deduction:
    package_id: str
    quantity: int


@dataclass(frozen=True)
class Candidate:
    """One package considered for an event; ``rank`` is 1-based among eligible ones, else 0."""

    package_id: str
    rank: int
    eligible: bool
    ineligible_reason: IneligibleReason | None
    deducted_quantity: int


@dataclass(frozen=True)
class UsageOutcome:
    event_id: str
    billable: bool
    deductions: tuple[Deduction, ...]
    pay_per_use_quantity: int
    candidates: tuple[Candidate, ...]
    decisive_rule: DecisiveRule
    policy: DeductionPolicy

    @property
    def package_quantity(self) -> int:
        return sum(d.quantity for d in self.deductions)


def ineligible_reason(package: Package, event_project: str, t: datetime) -> IneligibleReason | None:
    """Why ``package`` cannot pay for a call of ``event_project`` at ``t``; None if it can."""
    return _ineligibility(package, package.remaining_quantity, event_project, as_utc(t, "t"))


def _ineligibility(
    package: Package, remaining: int, event_project: str, t: datetime
) -> IneligibleReason | None:
    # The order of the checks decides which reason is reported when several apply; it is the
    # order of the module docstring.
    if package.revoke_time is not None:
        return IneligibleReason.REVOKED
    if t < package.effective_time:
        return IneligibleReason.NOT_YET_EFFECTIVE
    if t >= package.expire_time + ONE_SECOND:
        return IneligibleReason.EXPIRED
    if package.enterprise_project_id not in (ALL_PROJECTS, event_project):
        return IneligibleReason.OTHER_PROJECT
    if remaining <= 0:
        return IneligibleReason.EXHAUSTED
    return None


def left_out_reason(
    package: Package, event_project: str, t: datetime, recorded_at: datetime
) -> IneligibleReason:
    """Why a package that the hot path did not read for an event could not pay for it.

    The hot path reads only the packages that could still pay when the event was recorded at
    ``recorded_at``: not revoked by then, not expired before the call, quantity left. So one
    left out was revoked, expired, or else used up; the reason reported is the first in the
    order above that applies (a revocation after ``recorded_at`` did not yet count).
    """
    if package.revoke_time is not None and package.revoke_time > as_utc(recorded_at, "recorded_at"):
        package = replace(package, revoke_time=None)
    reason = _ineligibility(package, 0, event_project, as_utc(t, "t"))
    assert reason is not None  # nothing remaining: never eligible
    return reason


def _project_scope(package: Package, event_project: str) -> int:
    if package.enterprise_project_id == ALL_PROJECTS:
        return 1
    if package.enterprise_project_id == event_project:
        return 0
    return 2  # another project's package; never eligible, ranked last for completeness


def deduction_key(package: Package, event_project: str, policy: DeductionPolicy) -> tuple:
    """The sort key of ``package`` for a call of ``event_project``; smaller is used first.

    Its components follow ``deduction_steps(policy)`` one for one.
    """
    return _key(package, event_project, deduction_steps(policy))


# The components of a key in the order of _STANDARD_STEPS; a policy's key picks them in the
# order of its steps (positions, not a dict per call: this runs for every candidate of every
# event on the hot path).
_COMPONENTS = _STANDARD_STEPS
_ORDER = {steps: tuple(_COMPONENTS.index(step) for step in steps) for steps in _STEPS.values()}


def _key(package: Package, event_project: str, steps: tuple[DecisiveRule, ...]) -> tuple:
    values = (
        _project_scope(package, event_project),
        int(package.source),
        package.effective_time,
        package.expire_time,
        package.create_time,
        package.package_id,
    )
    order = _ORDER[steps]
    if order == (0, 1, 2, 3, 4, 5):
        return values
    return tuple(values[i] for i in order)


def _decisive_rule(keys: Sequence[tuple], steps: tuple[DecisiveRule, ...]) -> DecisiveRule:
    if not keys:
        return DecisiveRule.NO_CANDIDATE
    if len(keys) == 1:
        return DecisiveRule.ONLY_CANDIDATE
    for step, first, second in zip(steps, keys[0], keys[1], strict=True):
        if first != second:
            return step
    # Unreachable while package ids are unique, which apply_usage checks.
    raise ValueError("two candidates have the same deduction key")


def _deduct(
    event: UsageEvent,
    candidates: Iterable[Package],
    used: dict[str, int],
    policy: DeductionPolicy,
    keys: dict[tuple[str, str], tuple],
) -> UsageOutcome:
    """Decide and record one event; ``used`` is the batch's working ledger, updated in place;
    ``keys`` the batch's deduction keys by (package, project), filled as needed (a package's
    key does not change within a batch)."""
    steps = _STEPS[policy]
    project = event.enterprise_project_id
    eligible: list[tuple[tuple, Package]] = []
    ineligible: list[tuple[Package, IneligibleReason]] = []
    for package in candidates:
        remaining = package.total_quantity - used[package.package_id]
        reason = _ineligibility(package, remaining, project, event.occur_time)
        if reason is None:
            key = keys.get((package.package_id, project))
            if key is None:
                key = keys[(package.package_id, project)] = _key(package, project, steps)
            eligible.append((key, package))
        else:
            ineligible.append((package, reason))
    eligible.sort(key=lambda pair: pair[0])
    ineligible.sort(key=lambda pair: pair[0].package_id)

    deductions: list[Deduction] = []
    pay_per_use = 0
    if event.billable:
        left = event.quantity
        for _, package in eligible:
            if left == 0:
                break
            take = min(left, package.total_quantity - used[package.package_id])
            deductions.append(Deduction(package.package_id, take))
            used[package.package_id] += take
            left -= take
        pay_per_use = left
        rule = _decisive_rule([key for key, _ in eligible], steps)
    else:
        rule = DecisiveRule.NOT_BILLABLE

    deducted = {d.package_id: d.quantity for d in deductions}
    listed = [
        Candidate(package.package_id, rank, True, None, deducted.get(package.package_id, 0))
        for rank, (_, package) in enumerate(eligible, start=1)
    ]
    listed += [Candidate(package.package_id, 0, False, reason, 0) for package, reason in ineligible]
    return UsageOutcome(
        event_id=event.event_id,
        billable=event.billable,
        deductions=tuple(deductions),
        pay_per_use_quantity=pay_per_use,
        candidates=tuple(listed),
        decisive_rule=rule,
        policy=policy,
    )


def apply_usage(
    events: Sequence[UsageEvent],
    packages: Iterable[Package],
    policy: DeductionPolicy = DeductionPolicy.STANDARD,
) -> tuple[list[UsageOutcome], dict[str, Package]]:
    """Apply ``events`` in order to ``packages``.

    Returns one outcome per event, in the order given, and the packages whose
    ``used_quantity`` changed, by id, as the last event left them. The input is not modified.
    Exactly-once is the caller's job (an already-recorded event must not be passed again); an
    event id repeated within one batch is a caller bug and raises ValueError.
    """
    policy = DeductionPolicy(policy)
    originals: dict[str, Package] = {}
    by_scope: dict[tuple[str, str, str], list[Package]] = defaultdict(list)
    for package in packages:
        if package.package_id in originals:
            raise ValueError(f"package {package.package_id!r} given twice")
        originals[package.package_id] = package
        by_scope[(package.account_id, package.region, package.api)].append(package)

    # A working ledger of used quantities rather than a new Package per deduction: a batch of
    # single calls against one package would otherwise rebuild it once per call.
    used = {package_id: package.used_quantity for package_id, package in originals.items()}
    outcomes: list[UsageOutcome] = []
    seen: set[str] = set()
    keys: dict[tuple[str, str], tuple] = {}
    for event in events:
        if event.event_id in seen:
            raise ValueError(f"event {event.event_id!r} appears twice in one batch")
        seen.add(event.event_id)
        scope = by_scope.get((event.account_id, event.region, event.api), ())
        outcomes.append(_deduct(event, scope, used, policy, keys))

    changed = {
        package_id: replace(package, used_quantity=used[package_id])
        for package_id, package in originals.items()
        if used[package_id] != package.used_quantity
    }
    return outcomes, changed
