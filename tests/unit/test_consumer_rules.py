"""The pure rules of the stream consumer: its reconnect backoff and which events it applies."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from shared.streams.backoff import Backoff
from shared.streams.consumer import fresh_events


@dataclass(frozen=True)
class Event:
    sequence: int
    event_id: str = ""


def test_backoff_doubles_with_jitter_up_to_the_maximum():
    backoff = Backoff(initial=0.1, maximum=5.0)
    rng = random.Random(1)
    delays = [backoff.next_delay(rng) for _ in range(12)]
    bases = [min(5.0, 0.1 * 2**n) for n in range(12)]
    for delay, base in zip(delays, bases, strict=True):
        assert base / 2 <= delay <= base
    assert max(delays) <= 5.0
    assert delays[-1] >= 2.5  # at the cap: never back to a short pause while still failing


def test_backoff_is_never_zero_and_survives_a_long_outage():
    backoff = Backoff(initial=0.1, maximum=5.0)
    rng = random.Random(2)
    delays = [backoff.next_delay(rng) for _ in range(5000)]
    assert min(delays) >= 0.05
    assert max(delays) <= 5.0


def test_backoff_reset_starts_short_again():
    backoff = Backoff(initial=0.1, maximum=5.0)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_jitter_spreads_replicas_apart():
    delays = {round(Backoff(initial=1.0, maximum=1.0).next_delay(), 6) for _ in range(50)}
    assert len(delays) > 40


@pytest.mark.parametrize(
    ("initial", "maximum", "multiplier"), [(0, 1, 2), (2, 1, 2), (0.1, 1, 0.5), (-1, 1, 2)]
)
def test_backoff_rejects_settings_that_could_spin_or_shrink(initial, maximum, multiplier):
    with pytest.raises(ValueError):
        Backoff(initial=initial, maximum=maximum, multiplier=multiplier)


def test_events_at_or_before_the_cursor_are_skipped():
    events = [Event(s) for s in (3, 4, 5, 6)]
    fresh, skipped = fresh_events(events, cursor=4)
    assert [e.sequence for e in fresh] == [5, 6]
    assert skipped == 2


def test_a_repeat_inside_one_batch_is_applied_once():
    events = [Event(s) for s in (5, 6, 6, 5, 7)]
    fresh, skipped = fresh_events(events, cursor=4)
    assert [e.sequence for e in fresh] == [5, 6, 7]
    assert skipped == 2


def test_a_filtered_stream_may_have_gaps():
    # event_types filters leave holes in the sequence; they are not an error.
    fresh, skipped = fresh_events([Event(s) for s in (10, 42, 43)], cursor=0)
    assert [e.sequence for e in fresh] == [10, 42, 43]
    assert skipped == 0


def test_nothing_to_apply():
    assert fresh_events([], cursor=7) == ([], 0)
