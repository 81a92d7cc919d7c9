"""The deduction order, package states and totals (docs/design/deduction-order.md), by example."""

from datetime import UTC, datetime, timedelta

import pytest

from services.quota.domain.deduction import (
    Candidate,
    DecisiveRule,
    Deduction,
    DeductionPolicy,
    IneligibleReason,
    UsageEvent,
    apply_usage,
    deduction_key,
    deduction_steps,
)
from services.quota.domain.packages import (
    ALL_PROJECTS,
    Package,
    PackageSource,
    PackageState,
    QuotaTotals,
    totals_in_force,
)
from shared.projects import normalize_project_id

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
REGION = "ap-southeast-1"
API = "passport"
STANDARD = DeductionPolicy.STANDARD
EXPIRING_FIRST = DeductionPolicy.EXPIRING_FIRST


def pkg(
    package_id: str = "p1",
    *,
    source: PackageSource = PackageSource.SUBSCRIPTION,
    project: str = ALL_PROJECTS,
    total: int = 100,
    used: int = 0,
    effective: datetime = T0,
    expire: datetime = T0 + 365 * DAY - SECOND,
    create: datetime | None = None,
    revoke: datetime | None = None,
    account: str = "acct",
    region: str = REGION,
    api: str = API,
) -> Package:
    return Package(
        package_id=package_id,
        account_id=account,
        region=region,
        api=api,
        enterprise_project_id=project,
        source=source,
        total_quantity=total,
        used_quantity=used,
        effective_time=effective,
        expire_time=expire,
        create_time=create if create is not None else effective,
        revoke_time=revoke,
    )


def ev(
    event_id: str = "e1",
    quantity: int = 1,
    *,
    status: int = 200,
    project: str = "0",
    at: datetime = T0 + DAY,
    account: str = "acct",
    region: str = REGION,
    api: str = API,
) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        account_id=account,
        user_id="user",
        region=region,
        api=api,
        enterprise_project_id=project,
        quantity=quantity,
        http_status=status,
        occur_time=at,
    )


def apply_one(event, packages, policy=STANDARD):
    outcomes, changed = apply_usage([event], packages, policy)
    assert len(outcomes) == 1
    return outcomes[0], changed


def order(outcome) -> list[str]:
    return [c.package_id for c in outcome.candidates if c.eligible]


# --- the design's quantity examples -------------------------------------------------------


def test_100000_call_package_and_100001_calls_in_one_event_leave_one_pay_per_use():
    outcome, changed = apply_one(ev(quantity=100_001), [pkg(total=100_000)])

    assert outcome.deductions == (Deduction("p1", 100_000),)
    assert outcome.package_quantity == 100_000
    assert outcome.pay_per_use_quantity == 1
    assert changed["p1"].used_quantity == 100_000
    assert changed["p1"].remaining_quantity == 0
    assert changed["p1"].state_at(T0 + DAY) is PackageState.EXHAUSTED


def test_100000_call_package_and_100001_single_calls_leave_one_pay_per_use():
    events = [ev(f"e{i}", at=T0 + DAY + i * SECOND) for i in range(100_001)]

    outcomes, changed = apply_usage(events, [pkg(total=100_000)], STANDARD)

    assert len(outcomes) == 100_001
    assert sum(o.package_quantity for o in outcomes) == 100_000
    assert sum(o.pay_per_use_quantity for o in outcomes) == 1
    assert outcomes[-1].pay_per_use_quantity == 1
    assert outcomes[-1].decisive_rule is DecisiveRule.NO_CANDIDATE
    assert outcomes[-1].candidates == (Candidate("p1", 0, False, IneligibleReason.EXHAUSTED, 0),)
    assert changed["p1"].used_quantity == 100_000


@pytest.mark.parametrize("status", [199, 300, 404, 429, 500, 503])
def test_failed_calls_change_nothing(status):
    outcome, changed = apply_one(ev(quantity=5, status=status), [pkg("a"), pkg("b")])

    assert not outcome.billable
    assert outcome.deductions == ()
    assert outcome.pay_per_use_quantity == 0
    assert outcome.decisive_rule is DecisiveRule.NOT_BILLABLE
    assert changed == {}
    # The candidates are still listed, so ExplainUsage can show what would have been used.
    assert [(c.package_id, c.rank, c.deducted_quantity) for c in outcome.candidates] == [
        ("a", 1, 0),
        ("b", 2, 0),
    ]


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_every_2xx_status_is_billable(status):
    outcome, _ = apply_one(ev(status=status), [pkg()])

    assert outcome.billable
    assert outcome.deductions == (Deduction("p1", 1),)


@pytest.mark.parametrize(
    "other",
    [{"region": "ap-southeast-2"}, {"api": "id-card"}, {"account": "someone-else"}],
    ids=["other-region", "other-api", "other-account"],
)
def test_usage_of_another_region_api_or_account_leaves_the_package_untouched(other):
    outcome, changed = apply_one(ev(quantity=3, **other), [pkg()])

    assert changed == {}
    assert outcome.deductions == ()
    assert outcome.pay_per_use_quantity == 3
    assert outcome.candidates == ()
    assert outcome.decisive_rule is DecisiveRule.NO_CANDIDATE


# --- each step of the order ---------------------------------------------------------------


def test_step_1_project_designated_packages_before_all_project_packages():
    packages = [
        # A FREE all-project package that would win on every later step ...
        pkg("shared", source=PackageSource.FREE, project=ALL_PROJECTS, create=T0 - DAY),
        # ... loses to the package bought for the caller's project.
        pkg("mine", source=PackageSource.SUBSCRIPTION, project="proj-1", effective=T0 + SECOND),
        pkg("theirs", source=PackageSource.FREE, project="proj-2", effective=T0 - DAY),
    ]

    outcome, _ = apply_one(ev(quantity=1, project="proj-1"), packages)

    assert outcome.deductions == (Deduction("mine", 1),)
    assert order(outcome) == ["mine", "shared"]
    assert outcome.decisive_rule is DecisiveRule.PROJECT_SCOPE
    assert outcome.candidates[-1] == Candidate(
        "theirs", 0, False, IneligibleReason.OTHER_PROJECT, 0
    )


def test_calls_without_a_project_use_packages_designated_for_the_default_project():
    packages = [pkg("shared"), pkg("default", project="0"), pkg("proj", project="proj-1")]

    outcome, _ = apply_one(ev(project=normalize_project_id(None)), packages)

    assert order(outcome) == ["default", "shared"]
    assert outcome.decisive_rule is DecisiveRule.PROJECT_SCOPE


def test_step_2_free_before_promotion_before_subscription_even_when_purchase_is_older():
    packages = [
        pkg("bought", source=PackageSource.SUBSCRIPTION, total=10, effective=T0 - 30 * DAY),
        pkg("promo", source=PackageSource.PROMOTION, total=10, effective=T0 - 10 * DAY),
        pkg("free", source=PackageSource.FREE, total=10, effective=T0),
    ]

    outcome, changed = apply_one(ev(quantity=25), packages)

    assert order(outcome) == ["free", "promo", "bought"]
    assert outcome.decisive_rule is DecisiveRule.SOURCE
    assert outcome.deductions == (
        Deduction("free", 10),
        Deduction("promo", 10),
        Deduction("bought", 5),
    )
    assert {pid: p.used_quantity for pid, p in changed.items()} == {
        "free": 10,
        "promo": 10,
        "bought": 5,
    }


def test_step_3_earlier_effective_time_first_under_standard_policy():
    packages = [
        pkg("late-start-early-end", effective=T0 + SECOND, expire=T0 + 30 * DAY),
        pkg("early-start-late-end", effective=T0, expire=T0 + 300 * DAY),
    ]

    outcome, _ = apply_one(ev(), packages, STANDARD)

    assert outcome.deductions == (Deduction("early-start-late-end", 1),)
    assert outcome.decisive_rule is DecisiveRule.EFFECTIVE_TIME
    assert outcome.policy is STANDARD


def test_step_4_equal_effective_time_then_earlier_expiry_first():
    packages = [pkg("long", expire=T0 + 300 * DAY), pkg("short", expire=T0 + 30 * DAY)]

    outcome, _ = apply_one(ev(), packages)

    assert order(outcome) == ["short", "long"]
    assert outcome.decisive_rule is DecisiveRule.EXPIRE_TIME


def test_expiring_first_policy_uses_the_earlier_expiry_before_the_earlier_start():
    packages = [
        pkg("late-start-early-end", effective=T0 + SECOND, expire=T0 + 30 * DAY),
        pkg("early-start-late-end", effective=T0, expire=T0 + 300 * DAY),
    ]

    outcome, _ = apply_one(ev(), packages, EXPIRING_FIRST)

    assert outcome.deductions == (Deduction("late-start-early-end", 1),)
    # The step is named for what it compares, not for its position under this policy.
    assert outcome.decisive_rule is DecisiveRule.EXPIRE_TIME
    assert outcome.policy is EXPIRING_FIRST


def test_expiring_first_policy_falls_back_to_effective_time_on_equal_expiry():
    packages = [pkg("later", effective=T0 + SECOND), pkg("earlier", effective=T0)]

    outcome, _ = apply_one(ev(), packages, EXPIRING_FIRST)

    assert order(outcome) == ["earlier", "later"]
    assert outcome.decisive_rule is DecisiveRule.EFFECTIVE_TIME


def test_expiring_first_still_respects_project_and_source_first():
    packages = [
        pkg("sub-ends-soon", source=PackageSource.SUBSCRIPTION, expire=T0 + 2 * DAY),
        pkg("free-ends-late", source=PackageSource.FREE, expire=T0 + 300 * DAY),
    ]

    outcome, _ = apply_one(ev(), packages, EXPIRING_FIRST)

    assert order(outcome) == ["free-ends-late", "sub-ends-soon"]
    assert outcome.decisive_rule is DecisiveRule.SOURCE


def test_step_5_equal_times_then_earlier_create_time_first():
    packages = [pkg("newer", create=T0 + DAY), pkg("older", create=T0)]

    outcome, _ = apply_one(ev(at=T0 + 2 * DAY), packages)

    assert order(outcome) == ["older", "newer"]
    assert outcome.decisive_rule is DecisiveRule.CREATE_TIME


def test_step_6_everything_equal_then_the_smaller_package_id_first():
    packages = [pkg("pkg-b"), pkg("pkg-a")]

    outcome, _ = apply_one(ev(), packages)

    assert order(outcome) == ["pkg-a", "pkg-b"]
    assert outcome.deductions == (Deduction("pkg-a", 1),)
    assert outcome.decisive_rule is DecisiveRule.PACKAGE_ID


@pytest.mark.parametrize("policy", list(DeductionPolicy))
def test_the_order_does_not_depend_on_the_order_packages_are_given(policy):
    packages = [
        pkg("a", source=PackageSource.PROMOTION),
        pkg("b", project="0"),
        pkg("c", expire=T0 + 9 * DAY),
        pkg("d", effective=T0 - DAY, expire=T0 + 400 * DAY),
        pkg("e", create=T0 + SECOND),
        pkg("f"),
    ]

    forward, _ = apply_one(ev(), packages, policy)
    backward, _ = apply_one(ev(), list(reversed(packages)), policy)

    assert forward == backward
    expected = {
        STANDARD: ["b", "a", "d", "c", "f", "e"],
        EXPIRING_FIRST: ["b", "a", "c", "f", "e", "d"],
    }[policy]
    assert order(forward) == expected


def test_deduction_key_follows_the_policy_steps():
    package = pkg(effective=T0, expire=T0 + DAY, create=T0 - DAY)

    assert deduction_key(package, "0", STANDARD) == (
        1,
        int(PackageSource.SUBSCRIPTION),
        T0,
        T0 + DAY,
        T0 - DAY,
        "p1",
    )
    assert deduction_key(package, "0", EXPIRING_FIRST)[2:4] == (T0 + DAY, T0)
    assert deduction_steps(EXPIRING_FIRST)[2] is DecisiveRule.EXPIRE_TIME
    assert deduction_key(pkg(project="0"), "0", STANDARD)[0] == 0


# --- decisive rule and spill-over ---------------------------------------------------------


def test_a_single_eligible_candidate_is_the_only_candidate():
    outcome, _ = apply_one(ev(), [pkg("only"), pkg("gone", total=5, used=5)])

    assert outcome.decisive_rule is DecisiveRule.ONLY_CANDIDATE
    assert outcome.candidates == (
        Candidate("only", 1, True, None, 1),
        Candidate("gone", 0, False, IneligibleReason.EXHAUSTED, 0),
    )


def test_no_eligible_candidate_means_everything_is_pay_per_use():
    outcome, changed = apply_one(ev(quantity=7), [pkg(total=5, used=5)])

    assert outcome.decisive_rule is DecisiveRule.NO_CANDIDATE
    assert outcome.deductions == ()
    assert outcome.pay_per_use_quantity == 7
    assert changed == {}


def test_one_event_spills_over_from_the_first_package_into_the_next():
    packages = [pkg("first", total=100, used=70), pkg("second", total=100, create=T0 + SECOND)]

    outcome, changed = apply_one(ev(quantity=50), packages)

    assert outcome.deductions == (Deduction("first", 30), Deduction("second", 20))
    assert outcome.pay_per_use_quantity == 0
    assert outcome.candidates == (
        Candidate("first", 1, True, None, 30),
        Candidate("second", 2, True, None, 20),
    )
    assert changed["first"].remaining_quantity == 0
    assert changed["second"].remaining_quantity == 80


def test_spill_over_past_every_package_is_pay_per_use():
    outcome, _ = apply_one(ev(quantity=20), [pkg("a", total=5), pkg("b", total=6)])

    assert outcome.package_quantity == 11
    assert outcome.pay_per_use_quantity == 9


def test_events_of_a_batch_each_see_the_packages_left_by_the_previous_ones():
    packages = [pkg("a", total=10), pkg("b", total=10)]
    events = [ev("e1", 10), ev("e2", 4, at=T0 + 2 * DAY), ev("e3", 7, at=T0 + 3 * DAY)]

    outcomes, changed = apply_usage(events, packages, STANDARD)

    assert [o.event_id for o in outcomes] == ["e1", "e2", "e3"]
    assert outcomes[0].deductions == (Deduction("a", 10),)
    assert outcomes[0].decisive_rule is DecisiveRule.PACKAGE_ID
    assert outcomes[1].deductions == (Deduction("b", 4),)
    assert outcomes[1].decisive_rule is DecisiveRule.ONLY_CANDIDATE
    assert outcomes[1].candidates[1] == Candidate("a", 0, False, IneligibleReason.EXHAUSTED, 0)
    assert outcomes[2].deductions == (Deduction("b", 6),)
    assert outcomes[2].pay_per_use_quantity == 1
    assert {pid: p.used_quantity for pid, p in changed.items()} == {"a": 10, "b": 10}


def test_a_batch_equals_the_same_events_applied_one_by_one():
    packages = [pkg("a", total=10), pkg("b", total=10, source=PackageSource.FREE)]
    events = [ev("e1", 6), ev("e2", 6, status=500), ev("e3", 6), ev("e4", 6)]

    batch, batch_changed = apply_usage(events, packages, STANDARD)

    state = {p.package_id: p for p in packages}
    singles = []
    for event in events:
        outcome, changed = apply_one(event, state.values())
        state.update(changed)
        singles.append(outcome)
    assert batch == singles
    assert all(state[pid] == p for pid, p in batch_changed.items())


def test_apply_usage_does_not_modify_its_input():
    packages = [pkg("a", total=10)]

    apply_usage([ev(quantity=4)], packages, STANDARD)

    assert packages[0].used_quantity == 0


def test_an_event_id_repeated_within_a_batch_is_rejected():
    with pytest.raises(ValueError, match="twice"):
        apply_usage([ev("same"), ev("same")], [pkg()], STANDARD)


def test_a_package_given_twice_is_rejected():
    with pytest.raises(ValueError, match="twice"):
        apply_usage([ev()], [pkg("p"), pkg("p")], STANDARD)


def test_policy_may_be_given_by_its_setting_value():
    outcome, _ = apply_one(ev(), [pkg()], "expiring_first")

    assert outcome.policy is EXPIRING_FIRST


# --- eligibility at the event's time ------------------------------------------------------


def test_eligibility_is_judged_at_the_event_time():
    expire = T0 + 10 * DAY - SECOND
    packages = [
        pkg("pending", effective=T0 + 20 * DAY),
        pkg("expired", effective=T0 - 10 * DAY, expire=T0 - SECOND),
        pkg("revoked", revoke=T0 + 20 * DAY),
        pkg("exhausted", total=3, used=3),
        pkg("other-project", project="proj-9"),
        pkg("ends-this-second", expire=expire),
    ]

    outcome, _ = apply_one(ev(at=expire), packages)

    assert outcome.candidates == (
        Candidate("ends-this-second", 1, True, None, 1),
        Candidate("exhausted", 0, False, IneligibleReason.EXHAUSTED, 0),
        Candidate("expired", 0, False, IneligibleReason.EXPIRED, 0),
        Candidate("other-project", 0, False, IneligibleReason.OTHER_PROJECT, 0),
        Candidate("pending", 0, False, IneligibleReason.NOT_YET_EFFECTIVE, 0),
        # Revoked later than the call: a late report still cannot use quota taken back.
        Candidate("revoked", 0, False, IneligibleReason.REVOKED, 0),
    )


def test_a_package_is_eligible_from_its_effective_second_until_after_its_last_second():
    package = pkg(effective=T0, expire=T0 + DAY - SECOND)

    assert apply_one(ev(at=T0 - SECOND), [package])[0].candidates[0].ineligible_reason is (
        IneligibleReason.NOT_YET_EFFECTIVE
    )
    assert apply_one(ev(at=T0), [package])[0].candidates[0].eligible
    assert (
        apply_one(ev(at=T0 + DAY - timedelta(microseconds=1)), [package])[0].candidates[0].eligible
    )
    assert apply_one(ev(at=T0 + DAY), [package])[0].candidates[0].ineligible_reason is (
        IneligibleReason.EXPIRED
    )


# --- event validation ---------------------------------------------------------------------


@pytest.mark.parametrize("quantity", [0, -1])
def test_an_event_reports_at_least_one_call(quantity):
    with pytest.raises(ValueError, match="quantity"):
        ev(quantity=quantity)


@pytest.mark.parametrize("project", ["", "bad id", "x" * 65])
def test_an_event_project_must_be_normalized(project):
    with pytest.raises(ValueError, match="normalized"):
        ev(project=project)


def test_an_event_time_must_be_timezone_aware():
    with pytest.raises(ValueError, match="timezone-aware"):
        ev(at=datetime(2024, 1, 2))


def test_a_package_cannot_use_more_than_it_holds():
    with pytest.raises(ValueError, match="used_quantity"):
        pkg(total=5, used=6)
    with pytest.raises(ValueError, match="enterprise_project_id"):
        pkg(project="not valid")


# --- project ids --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "0"),
        ("", "0"),
        ("0", "0"),
        ("proj-1", "proj-1"),
        ("Proj_A-9", "Proj_A-9"),
        ("x" * 64, "x" * 64),
        ("x" * 65, "0"),
        ("has space", "0"),
        (" proj", "0"),
        ("proj\n", "0"),
        ("项目", "0"),
        ("a.b", "0"),
    ],
)
def test_normalize_project_id(raw, expected):
    assert normalize_project_id(raw) == expected


# --- package states -----------------------------------------------------------------------


def test_state_moves_from_pending_to_active_at_the_effective_time():
    package = pkg(effective=T0 + DAY)

    assert package.state_at(T0 + DAY - SECOND) is PackageState.PENDING
    assert package.state_at(T0 + DAY) is PackageState.ACTIVE
    assert not package.in_force_at(T0)
    assert package.in_force_at(T0 + DAY)


def test_state_is_expired_after_the_last_covered_second_even_with_quantity_left():
    package = pkg(expire=T0 + DAY - SECOND, used=10)

    assert package.state_at(T0 + DAY - SECOND) is PackageState.ACTIVE
    assert package.covers(T0 + DAY - SECOND)
    assert package.state_at(T0 + DAY) is PackageState.EXPIRED
    assert not package.covers(T0 + DAY)
    assert not package.in_force_at(T0 + DAY)


def test_state_is_exhausted_at_zero_remaining_and_still_in_force():
    package = pkg(total=10, used=10)

    assert package.remaining_quantity == 0
    assert package.state_at(T0 + DAY) is PackageState.EXHAUSTED
    assert package.in_force_at(T0 + DAY)
    assert pkg(total=10, used=10, expire=T0 + DAY - SECOND).state_at(T0 + DAY) is (
        PackageState.EXPIRED
    )


def test_state_is_revoked_from_the_revoke_time_on_and_stays_revoked():
    package = pkg(revoke=T0 + 2 * DAY, expire=T0 + 10 * DAY - SECOND)

    assert package.state_at(T0 + 2 * DAY - SECOND) is PackageState.ACTIVE
    assert package.state_at(T0 + 2 * DAY) is PackageState.REVOKED
    assert package.state_at(T0 + 100 * DAY) is PackageState.REVOKED
    assert pkg(effective=T0 + 5 * DAY, revoke=T0).state_at(T0 + DAY) is PackageState.REVOKED
    assert not package.in_force_at(T0 + 3 * DAY)


def test_package_times_are_stored_in_utc():
    from zoneinfo import ZoneInfo

    local = datetime(2024, 1, 1, 8, 0, tzinfo=ZoneInfo("Asia/Shanghai"))

    package = pkg(effective=local)

    assert package.effective_time == T0
    assert package.effective_time.tzinfo is UTC


# --- totals in force ----------------------------------------------------------------------


def test_totals_sum_active_and_exhausted_packages_only():
    now = T0 + 10 * DAY
    packages = [
        pkg("active", total=100, used=30),
        pkg("exhausted", total=50, used=50),
        pkg("pending", total=1000, effective=now + SECOND),
        pkg("expired", total=1000, used=1, expire=now - SECOND),
        pkg("revoked", total=1000, revoke=now),
    ]

    assert totals_in_force(packages, now) == QuotaTotals(
        quantity_in_force=150,
        used_quantity=80,
        remaining_quantity=70,
        active_package_count=1,
    )


def test_totals_of_nothing_are_zero():
    assert totals_in_force([], T0) == QuotaTotals(0, 0, 0, 0)


def test_totals_reject_a_naive_now():
    with pytest.raises(ValueError, match="timezone-aware"):
        totals_in_force([pkg()], datetime(2024, 1, 1))
