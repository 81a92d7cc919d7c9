"""The arrears lifecycle (docs/design/arrears.md): GOOD → GRACE → FROZEN → RELEASED, and back."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.arrears import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_RETENTION_PERIOD,
    ArrearsState,
    Standing,
    StandingChange,
    advance,
    after_charge,
    after_top_up,
    may_call,
    may_purchase,
    next_due_time,
)

PLUS_8 = timezone(timedelta(hours=8))
GOOD = ArrearsState.good()
SETTLED = datetime(2024, 5, 1, 11, 0, tzinfo=PLUS_8)
GRACE_END = datetime(2024, 5, 16, 11, 0, tzinfo=PLUS_8)
RETENTION_END = datetime(2024, 5, 31, 11, 0, tzinfo=PLUS_8)
DEBT = -1_500_000  # -1.50 after a settlement from a zero balance


def in_grace() -> ArrearsState:
    return after_charge(GOOD, DEBT, SETTLED, DEFAULT_GRACE_PERIOD, DEFAULT_RETENTION_PERIOD)


def test_standing_values_match_the_protos():
    assert [(s.name, s.value) for s in Standing] == [
        ("GOOD", 1),
        ("GRACE", 2),
        ("FROZEN", 3),
        ("RELEASED", 4),
    ]


def test_a_settlement_leaving_the_balance_below_zero_starts_grace_then():
    state = in_grace()

    assert state == ArrearsState(Standing.GRACE, SETTLED, GRACE_END, RETENTION_END)
    assert state.since.tzinfo is UTC


def test_the_default_periods_are_15_and_15_days():
    assert DEFAULT_GRACE_PERIOD == timedelta(days=15)
    assert DEFAULT_RETENTION_PERIOD == timedelta(days=15)
    assert after_charge(GOOD, DEBT, SETTLED) == in_grace()


def test_in_grace_calls_work_and_purchases_are_refused():
    assert may_call(Standing.GRACE)
    assert not may_purchase(Standing.GRACE)


def test_frozen_at_2024_05_16_1100_and_released_at_2024_05_31_1100():
    state = in_grace()
    assert advance(state, GRACE_END - timedelta(microseconds=1)) == []

    (frozen,) = advance(state, GRACE_END)
    assert frozen.previous == Standing.GRACE
    assert frozen.standing == Standing.FROZEN
    assert frozen.change_time == GRACE_END
    assert frozen.state == ArrearsState(Standing.FROZEN, GRACE_END, GRACE_END, RETENTION_END)
    assert not may_call(Standing.FROZEN)

    assert advance(frozen.state, RETENTION_END - timedelta(seconds=1)) == []
    (released,) = advance(frozen.state, RETENTION_END)
    assert released == StandingChange(
        Standing.FROZEN,
        Standing.RELEASED,
        RETENTION_END,
        ArrearsState(Standing.RELEASED, RETENTION_END, GRACE_END, RETENTION_END),
    )
    assert not may_call(Standing.RELEASED)
    assert advance(released.state, RETENTION_END + timedelta(days=365)) == []


def test_a_clock_far_ahead_yields_both_changes_each_at_its_own_time():
    changes = advance(in_grace(), datetime(2024, 7, 1, tzinfo=UTC))

    assert [(c.standing, c.change_time) for c in changes] == [
        (Standing.FROZEN, GRACE_END),
        (Standing.RELEASED, RETENTION_END),
    ]


def test_a_top_up_on_2024_05_10_that_covers_the_debt_returns_to_good_at_once():
    top_up = datetime(2024, 5, 10, 9, 30, tzinfo=PLUS_8)

    state = after_top_up(in_grace(), 500_000, top_up)

    assert state == ArrearsState(Standing.GOOD, top_up)
    assert advance(state, RETENTION_END) == []
    assert may_purchase(state.standing)


def test_a_top_up_to_exactly_zero_settles_the_debt():
    assert after_top_up(in_grace(), 0, SETTLED + timedelta(days=1)).standing == Standing.GOOD


def test_a_top_up_that_leaves_a_debt_changes_nothing():
    state = in_grace()
    assert after_top_up(state, -1, SETTLED + timedelta(days=1)) == state


def test_a_top_up_while_frozen_returns_to_good():
    (frozen,) = advance(in_grace(), GRACE_END)
    top_up = GRACE_END + timedelta(days=2)

    assert after_top_up(frozen.state, 10_000, top_up) == ArrearsState.good(top_up)


def test_a_released_account_returns_to_good_when_its_debt_is_paid():
    # Its API subscriptions were cancelled at release and are not restored: the customer
    # subscribes again, which a GOOD standing allows.
    released = advance(in_grace(), RETENTION_END)[-1].state
    top_up = RETENTION_END + timedelta(days=30)

    state = after_top_up(released, 0, top_up)

    assert state == ArrearsState.good(top_up)
    assert may_purchase(state.standing)


def test_a_top_up_of_a_good_account_changes_nothing():
    assert after_top_up(GOOD, 10_000_000, SETTLED) is GOOD


def test_a_charge_leaving_exactly_zero_keeps_the_account_good():
    assert after_charge(GOOD, 0, SETTLED) is GOOD


def test_further_charges_in_arrears_do_not_restart_the_clock():
    state = in_grace()
    later = SETTLED + timedelta(days=3)

    assert after_charge(state, DEBT * 2, later) is state
    frozen = advance(state, GRACE_END)[-1].state
    assert after_charge(frozen, DEBT * 3, GRACE_END + timedelta(days=1)) is frozen


def test_per_account_periods():
    state = after_charge(GOOD, DEBT, SETTLED, timedelta(days=3), timedelta(days=7))

    assert state.grace_end == SETTLED + timedelta(days=3)
    assert state.retention_end == SETTLED + timedelta(days=10)


def test_a_zero_grace_period_freezes_at_once():
    state = after_charge(GOOD, DEBT, SETTLED, timedelta(0), DEFAULT_RETENTION_PERIOD)

    (frozen,) = advance(state, SETTLED)
    assert frozen.standing == Standing.FROZEN
    assert frozen.change_time == SETTLED


def test_negative_periods_are_refused():
    with pytest.raises(ValueError):
        after_charge(GOOD, DEBT, SETTLED, timedelta(days=-1), DEFAULT_RETENTION_PERIOD)
    with pytest.raises(ValueError):
        after_charge(GOOD, DEBT, SETTLED, DEFAULT_GRACE_PERIOD, timedelta(seconds=-1))


def test_next_due_time():
    state = in_grace()
    assert next_due_time(GOOD) is None
    assert next_due_time(state) == GRACE_END
    frozen = advance(state, GRACE_END)[-1].state
    assert next_due_time(frozen) == RETENTION_END
    assert next_due_time(advance(frozen, RETENTION_END)[-1].state) is None


def test_what_each_standing_allows():
    assert [may_purchase(s) for s in Standing] == [True, False, False, False]
    assert [may_call(s) for s in Standing] == [True, True, False, False]


def test_inconsistent_states_are_refused():
    with pytest.raises(ValueError):
        ArrearsState(Standing.GOOD, SETTLED, GRACE_END, RETENTION_END)
    with pytest.raises(ValueError):
        ArrearsState(Standing.GRACE, SETTLED, None, None)
    with pytest.raises(ValueError):
        ArrearsState(Standing.FROZEN, SETTLED, RETENTION_END, GRACE_END)
    with pytest.raises(ValueError):
        ArrearsState(Standing.GRACE, datetime(2024, 5, 1), GRACE_END, RETENTION_END)


# --- properties -----------------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.sampled_from(("charge", "top_up", "tick")),
        st.integers(0, 40 * 24),  # hours since the previous step
        st.integers(-5_000_000, 5_000_000),  # the balance after the step
    ),
    max_size=20,
)


@given(steps)
def test_a_history_of_charges_top_ups_and_ticks(history):
    """Driven the way the app drives it: due changes first, then the money event. A charge
    leaving a debt never leaves the account GOOD, a credit clearing it always does, changes
    are stamped in time order, and advancing twice to the same instant adds nothing."""
    state = GOOD
    now = SETTLED
    stamps = []
    for action, hours, balance in history:
        now += timedelta(hours=hours)
        changes = advance(state, now)
        assert advance(state, now) == changes
        if changes:
            state = changes[-1].state
            stamps += [c.change_time for c in changes]
            assert all(c.change_time <= now for c in changes)
            assert advance(state, now) == []
        if action == "charge":
            before = state
            state = after_charge(state, balance, now)
            if balance < 0:
                assert state.standing != Standing.GOOD
            if before.standing != Standing.GOOD:
                assert state is before
        elif action == "top_up":
            state = after_top_up(state, balance, now)
            if balance >= 0:
                assert state.standing == Standing.GOOD
        # With due changes applied, the standing is the one the clock says it is.
        if state.standing == Standing.GRACE:
            assert state.since <= now < state.grace_end
        elif state.standing == Standing.FROZEN:
            assert state.grace_end <= now < state.retention_end
        elif state.standing == Standing.RELEASED:
            assert state.retention_end <= now
    assert stamps == sorted(stamps)


@given(st.integers(0, 60 * 24), st.integers(0, 60 * 24))
def test_advancing_in_steps_equals_advancing_at_once(first_hours, more_hours):
    state = in_grace()
    middle = SETTLED + timedelta(hours=first_hours)
    end = middle + timedelta(hours=more_hours)

    first = advance(state, middle)
    rest = advance(first[-1].state if first else state, end)

    assert first + rest == advance(state, end)
