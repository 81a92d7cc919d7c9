"""When to try a delivery again: exponential backoff with jitter, bounded attempts.

With the defaults (first retry after 60 s, factor 3, 8 attempts) retries come after about
1 m, 3 m, 9 m, 27 m, 1.4 h, 4 h and 12 h: the last attempt is about 18 hours after the first
(at most about 22 with jitter), so a receiver that is down for most of a day still gets the
message; after that the delivery is FAILED and an operator can retry it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

# DeliveryState values.
PENDING, SENT, FAILED = 1, 2, 3

# No single wait is longer than this, whatever the factor.
MAX_DELAY = timedelta(hours=24)
# Each delay is stretched or shrunk by up to this fraction so receivers that come back do not
# get every retry at the same instant.
JITTER = 0.2


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    first_delay: timedelta = timedelta(seconds=60)
    factor: int = 3

    def next_attempt(
        self, attempts: int, now: datetime, rng: random.Random | None = None
    ) -> datetime | None:
        """After `attempts` failed attempts, when to try again; None when it is time to give up."""
        if attempts >= self.max_attempts:
            return None
        delay = self.first_delay
        for _ in range(attempts - 1):  # grown step by step: never past the cap, never overflows
            delay = min(delay * self.factor, MAX_DELAY)
        spread = (rng or random).uniform(1 - JITTER, 1 + JITTER)
        return now + delay * spread
