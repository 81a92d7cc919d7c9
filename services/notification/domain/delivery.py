"""When to try a delivery again: exponential backoff with jitter, bounded attempts.

With the defaults (first retry after 60 s, factor 4, 8 attempts) retries come after about
1 m, 4 m, 16 m, 1 h, 4 h, 17 h and a last one up to a day later: a receiver that is down for
most of a day still gets the message; after that the delivery is FAILED and an operator can
retry it.
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
    factor: int = 4

    def next_attempt(
        self, attempts: int, now: datetime, rng: random.Random | None = None
    ) -> datetime | None:
        """After `attempts` failed attempts, when to try again; None when it is time to give up."""
        if attempts >= self.max_attempts:
            return None
        delay = min(self.first_delay * (self.factor ** (attempts - 1)), MAX_DELAY)
        spread = (rng or random).uniform(1 - JITTER, 1 + JITTER)
        return now + delay * spread
