"""Property tests of the deduction engine: a state machine of packages and usage events.

Hypothesis grants packages and reports (and replays) events in random order, and checks the
ledger after every step: remaining never negative, every billable call paid exactly once by
packages or pay-per-use, failed calls free, replays changing nothing, and the engine following
the deduction order (docs/design/deduction-order.md).
"""

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

from services.quota.domain.deduction import (
    DecisiveRule,
    DeductionPolicy,
    UsageEvent,
    UsageOutcome,
    apply_usage,
    ineligible_reason,
)
from services.quota.domain.packages import ALL_PROJECTS, Package, PackageSource

T0 = datetime(2024, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
SECOND = timedelta(seconds=1)

# Few values, skewed to the first, so that events and packages meet often and ties in the
# order are common; the other values still check that scopes never mix.
ACCOUNTS = ("acct-1", "acct-1", "acct-1", "acct-2")
REGIONS = ("ap-southeast-1", "ap-southeast-1", "ap-southeast-1", "la-south-2")
APIS = ("passport", "passport", "passport", "id-card")
EVENT_PROJECTS = ("0", "proj-1", "proj-2")
PACKAGE_PROJECTS = (ALL_PROJECTS, ALL_PROJECTS, *EVENT_PROJECTS)

event_specs = st.fixed_dictionaries(
    {
        "account_id": st.sampled_from(ACCOUNTS),
        "region": st.sampled_from(REGIONS),
        "api": st.sampled_from(APIS),
        "enterprise_project_id": st.sampled_from(EVENT_PROJECTS),
        "quantity": st.integers(1, 50),
        "http_status": st.one_of(st.just(200), st.sampled_from((200, 404, 500))),
        # Whole hours give or take a second hit the first and last covered seconds exactly.
        "occur_time": st.builds(
            lambda hours, seconds: T0 + hours * HOUR + seconds * SECOND,
            st.integers(-12, 96),
            st.sampled_from((-1, 0, 1)),
        ),
        # Most events are aimed at a granted package (its scope, within its validity), so that
        # deductions, spill-over and ties happen often, not only by luck.
        "aim": st.one_of(st.none(), st.integers(0, 50), st.integers(0, 50)),
    }
)

package_specs = st.fixed_dictionaries(
    {
        "source": st.sampled_from(PackageSource),
        "project": st.sampled_from(PACKAGE_PROJECTS),
        "account": st.sampled_from(ACCOUNTS),
        "region": st.sampled_from(REGIONS),
        "api": st.sampled_from(APIS),
        "start_hour": st.integers(-24, 48),
        "hours": st.integers(1, 120),
        "created_hours_before": st.integers(0, 3),
        "total": st.integers(1, 200),
        "used_percent": st.sampled_from((0, 25, 90, 100)),
        "revoked": st.integers(0, 9).map(lambda n: n == 9),
    }
)


# Oracles: docs/design/deduction-order.md restated independently of the engine, so a bug there is
# not reproduced here.


def is_billable(http_status: int) -> bool:
    return 200 <= http_status <= 299


def can_pay(package: Package, event: UsageEvent) -> bool:
    t = event.occur_time
    return (
        package.revoke_time is None
        and package.effective_time <= t < package.expire_time + timedelta(seconds=1)
        and package.enterprise_project_id in ("", event.enterprise_project_id)
        and package.total_quantity > package.used_quantity
    )


def spec_order(package: Package, event: UsageEvent, policy: DeductionPolicy) -> list:
    """(step name, value) pairs in the order the steps apply; smaller values go first."""
    steps = [
        ("project_scope", 0 if package.enterprise_project_id else 1),
        ("source", ["FREE", "PROMOTION", "SUBSCRIPTION"].index(package.source.name)),
        ("effective_time", package.effective_time),
        ("expire_time", package.expire_time),
        ("create_time", package.create_time),
        ("package_id", package.package_id),
    ]
    if policy == "expiring_first":
        steps[2], steps[3] = steps[3], steps[2]
    return steps


class DeductionMachine(RuleBasedStateMachine):
    """The quota ledger as the app layer drives it, with the engine as the only writer."""

    events = Bundle("events")

    def __init__(self) -> None:
        super().__init__()
        self.policy = DeductionPolicy.STANDARD
        self.packages: dict[str, Package] = {}
        self.initial_used: dict[str, int] = {}
        # event_id -> (event, outcome): the stored result a replay returns, as the app layer's
        # usage-event table does.
        self.recorded: dict[str, tuple[UsageEvent, UsageOutcome]] = {}
        self.event_count = 0

    @initialize(policy=st.sampled_from(DeductionPolicy))
    def choose_policy(self, policy: DeductionPolicy) -> None:
        self.policy = policy

    # --- the app layer, modelled -----------------------------------------------------------

    def report(self, event: UsageEvent) -> tuple[UsageOutcome, dict[str, Package]]:
        """Exactly once: a recorded event returns its stored outcome and changes nothing."""
        if event.event_id in self.recorded:
            stored_event, stored_outcome = self.recorded[event.event_id]
            assert stored_event == event
            return stored_outcome, {}
        outcomes, changed = apply_usage([event], self.packages.values(), self.policy)
        self.packages.update(changed)
        self.recorded[event.event_id] = (event, outcomes[0])
        return outcomes[0], changed

    def new_event(self, spec: dict) -> UsageEvent:
        self.event_count += 1
        spec = dict(spec)
        aim = spec.pop("aim")
        if aim is not None and self.packages:
            target = list(self.packages.values())[aim % len(self.packages)]
            spec["account_id"] = target.account_id
            spec["region"] = target.region
            spec["api"] = target.api
            if target.enterprise_project_id != ALL_PROJECTS and aim % 2 == 0:
                spec["enterprise_project_id"] = target.enterprise_project_id
            # Clamping lands on the first or last covered second as often as inside.
            spec["occur_time"] = max(
                target.effective_time, min(spec["occur_time"], target.expire_time)
            )
        return UsageEvent(event_id=f"evt-{self.event_count:04d}", user_id="user", **spec)

    # --- rules -----------------------------------------------------------------------------

    @initialize(specs=st.lists(package_specs, min_size=1, max_size=4))
    def grant_initial_packages(self, specs: list[dict]) -> None:
        # Without a start-up grant most runs would report events against no package at all.
        self.grant_packages(specs)

    @rule(specs=st.lists(package_specs, min_size=1, max_size=3))
    def grant_more_packages(self, specs: list[dict]) -> None:
        self.grant_packages(specs)

    def grant_packages(self, specs: list[dict]) -> None:
        for spec in specs:
            package_id = f"pkg-{len(self.packages):03d}"
            effective = T0 + spec["start_hour"] * HOUR
            total = spec["total"]
            package = Package(
                package_id=package_id,
                account_id=spec["account"],
                region=spec["region"],
                api=spec["api"],
                enterprise_project_id=spec["project"],
                source=spec["source"],
                total_quantity=total,
                used_quantity=total * spec["used_percent"] // 100,
                effective_time=effective,
                expire_time=effective + spec["hours"] * HOUR - SECOND,
                create_time=effective - spec["created_hours_before"] * HOUR,
                revoke_time=T0 if spec["revoked"] else None,
            )
            self.packages[package_id] = package
            self.initial_used[package_id] = package.used_quantity

    @rule(target=events, spec=event_specs)
    def report_event(self, spec: dict) -> UsageEvent:
        event = self.new_event(spec)
        before = dict(self.packages)

        outcome, changed = self.report(event)

        self.check_outcome(event, outcome, before)
        # The engine is a pure function: the same event on the same packages decides the same.
        again, again_changed = apply_usage([event], before.values(), self.policy)
        assert again == [outcome]
        assert again_changed == changed
        return event

    @rule(target=events, specs=st.lists(event_specs, min_size=2, max_size=5))
    def report_batch(self, specs: list[dict]):
        batch = [self.new_event(spec) for spec in specs]
        before = dict(self.packages)

        outcomes, changed = apply_usage(batch, before.values(), self.policy)

        # A batch decides exactly as the same events reported one by one, in order.
        for event, outcome in zip(batch, outcomes, strict=True):
            assert outcome.event_id == event.event_id
            step_before = dict(self.packages)
            single, _ = self.report(event)
            assert single == outcome
            self.check_outcome(event, outcome, step_before)
        assert {pid: self.packages[pid] for pid in changed} == changed
        return multiple(*batch)

    @rule(event=events)
    def replay_event(self, event: UsageEvent) -> None:
        before = dict(self.packages)
        _, stored = self.recorded[event.event_id]

        outcome, changed = self.report(event)

        assert outcome == stored
        assert changed == {}
        assert self.packages == before

    # --- what every outcome must satisfy --------------------------------------------------

    def check_outcome(
        self, event: UsageEvent, outcome: UsageOutcome, before: dict[str, Package]
    ) -> None:
        in_scope = {
            pid: p
            for pid, p in before.items()
            if (p.account_id, p.region, p.api) == (event.account_id, event.region, event.api)
        }
        assert {c.package_id for c in outcome.candidates} == set(in_scope)
        assert len(outcome.candidates) == len(in_scope)

        eligible = [c for c in outcome.candidates if c.eligible]
        ineligible = [c for c in outcome.candidates if not c.eligible]
        # Eligible first, by rank; then the others by id.
        assert list(outcome.candidates) == eligible + ineligible
        assert [c.rank for c in eligible] == list(range(1, len(eligible) + 1))
        assert [c.package_id for c in ineligible] == sorted(c.package_id for c in ineligible)
        for c in outcome.candidates:
            package = in_scope[c.package_id]
            reason = ineligible_reason(package, event.enterprise_project_id, event.occur_time)
            assert c.ineligible_reason == reason
            assert c.eligible == (reason is None) == can_pay(package, event)
            assert (c.rank == 0) == (not c.eligible)
        steps = [spec_order(in_scope[c.package_id], event, self.policy) for c in eligible]
        assert [[value for _, value in step] for step in steps] == sorted(
            [value for _, value in step] for step in steps
        )

        if not is_billable(event.http_status):
            assert outcome.decisive_rule is DecisiveRule.NOT_BILLABLE
            assert outcome.deductions == ()
            assert outcome.pay_per_use_quantity == 0
            assert all(c.deducted_quantity == 0 for c in outcome.candidates)
            return

        if len(steps) == 0:
            assert outcome.decisive_rule is DecisiveRule.NO_CANDIDATE
        elif len(steps) == 1:
            assert outcome.decisive_rule is DecisiveRule.ONLY_CANDIDATE
        else:
            first_difference = next(
                name for (name, a), (_, b) in zip(steps[0], steps[1], strict=True) if a != b
            )
            assert outcome.decisive_rule.value == first_difference

        # Units go to the eligible packages in rank order, each emptied before the next.
        deducted = [d.package_id for d in outcome.deductions]
        assert deducted == [c.package_id for c in eligible[: len(deducted)]]
        for i, d in enumerate(outcome.deductions):
            remaining = in_scope[d.package_id].remaining_quantity
            assert 0 < d.quantity <= remaining
            if i < len(outcome.deductions) - 1:
                assert d.quantity == remaining
        assert {c.package_id: c.deducted_quantity for c in eligible if c.deducted_quantity} == {
            d.package_id: d.quantity for d in outcome.deductions
        }
        available = sum(in_scope[c.package_id].remaining_quantity for c in eligible)
        assert outcome.package_quantity == min(event.quantity, available)

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def remaining_is_never_negative(self) -> None:
        for package in self.packages.values():
            assert 0 <= package.remaining_quantity <= package.total_quantity

    @invariant()
    def billable_calls_are_paid_exactly_once_and_failed_calls_cost_nothing(self) -> None:
        for event, outcome in self.recorded.values():
            assert outcome.billable == is_billable(event.http_status)
            if outcome.billable:
                assert outcome.package_quantity + outcome.pay_per_use_quantity == event.quantity
                assert outcome.pay_per_use_quantity >= 0
            else:
                assert outcome.deductions == ()
                assert outcome.pay_per_use_quantity == 0

    @invariant()
    def packages_used_exactly_what_was_deducted_from_them(self) -> None:
        deducted: Counter[str] = Counter()
        for _, outcome in self.recorded.values():
            for d in outcome.deductions:
                deducted[d.package_id] += d.quantity
        for package_id, package in self.packages.items():
            assert package.used_quantity - self.initial_used[package_id] == deducted[package_id]
        assert sum(
            p.used_quantity - self.initial_used[pid] for pid, p in self.packages.items()
        ) == (sum(deducted.values()))


DeductionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDeductionMachine = DeductionMachine.TestCase
