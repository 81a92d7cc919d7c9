"""The pure parts of the what-if (docs/design/what-if.md): which mixes a recommendation tries,
how a mix is laid out in time and priced, and the replay's forfeitures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.recommendations import (
    MAX_COUNT,
    MAX_MIXES,
    Mix,
    MixPart,
    SimulatedOutcome,
    candidate_mixes,
    cost,
    layout,
    ranked,
)
from services.quota.domain.deduction import DeductionPolicy, UsageEvent
from services.quota.domain.packages import Package, PackageSource
from services.quota.domain.simulation import ChangeKind, PackageChange, RecordedEvent, Replay
from shared.catalog import Api, Offer, PriceTier

SHANGHAI = ZoneInfo("Asia/Shanghai")
BIG = Offer("big", "passport", ("hk",), 100_000, 12, Decimal("180.00"))
SMALL = Offer("small", "passport", ("hk",), 10_000, 12, Decimal("30.00"))
MONTHLY = Offer("monthly", "passport", ("hk",), 1_000, 1, Decimal("2.00"))
API = Api(
    "passport",
    "Passport",
    0,
    (PriceTier(1_000, Decimal("0.01")), PriceTier(None, Decimal("0.001"))),
)


def test_mixes_are_pay_per_use_each_offer_near_the_usage_and_greedy_pairs():
    mixes = [m.key for m in candidate_mixes([SMALL, BIG], 150_000)]
    assert mixes == [
        (),
        (("big", 1),),
        (("big", 2),),
        (("small", 15),),
        (("big", 1), ("small", 5)),
    ]


def test_no_usage_is_pay_per_use_only():
    assert [m.key for m in candidate_mixes([SMALL, BIG], 0)] == [()]


@given(
    st.lists(st.integers(1, 10**7), min_size=1, max_size=10, unique=True),
    st.integers(0, 10**9),
)
def test_the_search_is_bounded(quantities, billable):
    offers = [Offer(f"o{q}", "passport", ("hk",), q, 12, Decimal("1")) for q in quantities]
    mixes = candidate_mixes(offers, billable)
    assert 1 <= len(mixes) <= MAX_MIXES
    assert len({m.key for m in mixes}) == len(mixes)
    assert all(1 <= p.count <= MAX_COUNT for m in mixes for p in m.parts)


def test_a_mix_is_bought_at_the_start_and_again_when_it_expires():
    start = datetime(2024, 1, 1, 1, tzinfo=UTC)  # 09:00 in the billing time zone
    end = datetime(2024, 4, 1, 1, tzinfo=UTC)
    (yearly,) = layout(Mix((MixPart(BIG, 2),)), start, end, SHANGHAI)
    assert [(p.offer.id, p.count, p.start) for p in yearly] == [("big", 2, start)]
    (monthly,) = layout(Mix((MixPart(MONTHLY, 1),)), start, end, SHANGHAI)
    # 1 January 09:00 local, then the second after each expiry (end of the local day a month
    # later): 2 February 00:00 local, 3 March 00:00 local.
    assert [p.start for p in monthly] == [
        start,
        datetime(2024, 2, 1, 16, tzinfo=UTC),
        datetime(2024, 3, 2, 16, tzinfo=UTC),
    ]


def test_a_mix_costs_its_purchases_and_each_month_of_pay_per_use_from_call_1():
    start = datetime(2024, 1, 1, 1, tzinfo=UTC)
    end = datetime(2024, 4, 1, 1, tzinfo=UTC)
    mix = Mix((MixPart(MONTHLY, 2),))
    laid = layout(mix, start, end, SHANGHAI)
    outcome = SimulatedOutcome(6_000, 2_500, 0, (0, 2_000, 500))
    priced = cost(mix, laid, outcome, API, "hk")
    assert priced.purchases == (3,)
    assert priced.package_cost_micros == 3 * 2 * 2_000_000
    # February: 1,000 at 0.01 and 1,000 at 0.001; March: 500 at 0.01.
    assert priced.pay_per_use_cost_micros == 10_000_000 + 1_000_000 + 5_000_000
    alone = cost(Mix(()), [], SimulatedOutcome(0, 8_500, 0, (3_000, 3_000, 2_500)), API, "hk")
    cheaper = ranked([alone, priced])
    assert cheaper[0].expected_cost_micros <= cheaper[1].expected_cost_micros


# --- the replay -------------------------------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SCOPE = ("acct", "hk", "passport")


def change(seq, kind, total, expire, forfeit=False, package_id="p1"):
    return PackageChange(
        seq=seq,
        kind=kind,
        package_id=package_id,
        change_time=T0 + timedelta(hours=seq),
        total_quantity=total,
        expire_time=expire,
        forfeit=forfeit,
        enterprise_project_id="",
        source=PackageSource.SUBSCRIPTION,
        effective_time=T0,
        create_time=T0,
    )


def event(seq, quantity, at, deductions=(), pay_per_use=0):
    return RecordedEvent(
        UsageEvent(f"e{seq}", *SCOPE[:1], "u", *SCOPE[1:], "0", quantity, 200, at),
        seq,
        tuple(deductions),
        pay_per_use,
    )


def test_a_renewal_of_an_expired_package_forfeits_its_remainder_in_the_window():
    first_expiry = T0 + timedelta(days=10)
    changes = [
        change(1, ChangeKind.GRANT, 100, first_expiry),
        change(3, ChangeKind.RENEWAL, 150, T0 + timedelta(days=40), forfeit=True),
    ]
    replay = Replay(SCOPE, T0, T0 + timedelta(days=30), DeductionPolicy.STANDARD, changes)
    replay.feed([event(2, 30, T0 + timedelta(days=1)), event(4, 70, T0 + timedelta(days=20))])
    result = replay.finish()
    # 30 used, 70 forfeited at the first expiry; the renewal adds 50 which pay 50 of the 70.
    assert [(f.package_id, f.quantity, f.expire_time) for f in result.forfeited] == [
        ("p1", 70, first_expiry)
    ]
    assert (result.package_paid_quantity, result.pay_per_use_quantity) == (80, 20)


def test_events_before_the_window_count_as_recorded():
    changes = [change(1, ChangeKind.GRANT, 100, T0 + timedelta(days=60))]
    window = (T0 + timedelta(days=10), T0 + timedelta(days=20))
    replay = Replay(SCOPE, *window, DeductionPolicy.STANDARD, changes)
    replay.feed(
        [
            event(2, 90, T0 + timedelta(days=1), deductions=[("p1", 90)]),
            event(3, 30, T0 + timedelta(days=15)),
        ]
    )
    result = replay.finish()
    assert (result.package_paid_quantity, result.pay_per_use_quantity) == (10, 20)
    assert result.event_count == 1 and result.per_package == {"p1": 10}


def test_a_revoked_package_pays_nothing_after_and_forfeits_nothing():
    end = T0 + timedelta(days=5)
    changes = [
        change(1, ChangeKind.GRANT, 100, T0 + timedelta(days=2)),
        change(3, ChangeKind.REVOCATION, 100, T0 + timedelta(days=2)),
    ]
    hypothetical = Package(
        "h", *SCOPE, "", PackageSource.SUBSCRIPTION, 5, 0, T0, T0 + timedelta(days=1), T0
    )
    replay = Replay(SCOPE, T0, end, DeductionPolicy.STANDARD, changes, (), [hypothetical])
    replay.feed([event(2, 10, T0 + timedelta(hours=1)), event(4, 10, T0 + timedelta(hours=2))])
    result = replay.finish()
    # Before the revocation: the hypothetical package (same start, the earlier end breaks the
    # tie) pays 5, then p1 5; after it p1 is revoked and h used up: all pay-per-use. The
    # revoked p1 forfeits nothing, h expired empty.
    assert result.per_package == {"h": 5, "p1": 5}
    assert result.pay_per_use_quantity == 10
    assert [(f.package_id, f.quantity) for f in result.forfeited] == []


@st.composite
def replays(draw):
    """Packages (some for a project, some starting or ending within the window) and events
    (both projects, failed calls, out of occurrence order) of one scope."""
    packages = []
    for i in range(draw(st.integers(1, 4))):
        start = T0 + timedelta(hours=draw(st.integers(-48, 200)))
        packages.append(
            Package(
                f"p{i}",
                *SCOPE,
                draw(st.sampled_from(["", "proj-a"])),
                draw(st.sampled_from(list(PackageSource))),
                draw(st.integers(1, 40)),
                0,
                start,
                start + timedelta(hours=draw(st.integers(0, 400))),
                T0,
            )
        )
    events = [
        RecordedEvent(
            UsageEvent(
                f"e{n}",
                SCOPE[0],
                "u",
                *SCOPE[1:],
                draw(st.sampled_from(["0", "proj-a"])),
                draw(st.integers(1, 15)),
                draw(st.sampled_from([200, 200, 500])),
                T0 + timedelta(hours=draw(st.integers(0, 24 * 40))),
            ),
            n + 1,
            (),
            0,
        )
        for n in range(draw(st.integers(0, 30)))
    ]
    return packages, events, draw(st.sampled_from(list(DeductionPolicy)))


@given(replays())
def test_merged_runs_of_events_answer_what_one_by_one_answers(case):
    packages, events, policy = case
    window = (T0, T0 + timedelta(days=35))
    answers = []
    for keep in (True, False):
        replay = Replay(SCOPE, *window, policy, (), (), packages, keep_events=keep)
        replay.feed(events)
        result = replay.finish()
        answers.append(
            (
                result.package_paid_quantity,
                result.pay_per_use_quantity,
                result.per_package,
                result.months,
                result.forfeited,
                result.event_count,
            )
        )
    assert answers[0] == answers[1]
