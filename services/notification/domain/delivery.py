"""A delivery: what a sender is given, how an attempt fails, and when to try it again
(exponential backoff with jitter, bounded attempts).

With the defaults (first retry after 60 s, factor 3, 8 attempts) retries come after about
1 m, 3 m, 9 m, 27 m, 1.4 h, 4 h and 12 h: the last attempt is about 18 hours after the first
(at most about 22 with jitter), so a receiver that is down for most of a day still gets the
message; after that the delivery is FAILED and an operator can retry it.

A receiver that answers with Retry-After (a 429 or 503, say) is not tried again before it
asked to be (up to MAX_DELAY); the count of attempts stays the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

# DeliveryState values.
PENDING, SENT, FAILED = 1, 2, 3

# No single wait is longer than this, whatever the factor.
MAX_DELAY = timedelta(hours=24)
# Each delay is stretched or shrunk by up to this fraction so receivers that come back do not
# get every retry at the same instant.
JITTER = 0.2
# `last_error` is stored (and shown to the account) — keep it a readable line, not a page.
MAX_ERROR_CHARS = 500


class DeliveryError(Exception):
    """One attempt failed. `retryable`: a later attempt may succeed (the receiver was down,
    busy or slow); otherwise it will fail the same way until someone changes something.
    `retry_after` is the receiver's Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class OutgoingMessage:
    """One notification addressed to one contact."""

    notification_id: str
    account_id: str
    channel: int
    address: str
    subject: str
    body: str
    message_type: str
    payload: dict[str, Any]  # the structured fields (JSON-able); webhooks send them as `data`
    create_time: datetime
    secret: str = field(default="", repr=False)  # the webhook contact's signing secret


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    first_delay: timedelta = timedelta(seconds=60)
    factor: int = 3

    def next_attempt(
        self,
        attempts: int,
        now: datetime,
        rng: random.Random | None = None,
        retry_after: float | None = None,
    ) -> datetime | None:
        """After `attempts` failed attempts, when to try again; None when it is time to give up.
        `retry_after`: the seconds the receiver asked to be left alone, if it said."""
        if attempts >= self.max_attempts:
            return None
        delay = self.first_delay
        for _ in range(attempts - 1):  # grown step by step: never past the cap, never overflows
            delay = min(delay * self.factor, MAX_DELAY)
        wait = delay * (rng or random).uniform(1 - JITTER, 1 + JITTER)
        if retry_after is not None and retry_after > 0:
            wait = max(wait, min(timedelta(seconds=retry_after), MAX_DELAY))
        return now + wait
