"""The pause between a stream consumer's attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Exponential backoff with jitter, bounded: each delay lies in [base/2, base], where base
    doubles from `initial` up to `maximum`. Never zero, so a failing loop never spins."""

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and multiplier >= 1")

    def next_delay(self, rng: random.Random | None = None) -> float:
        # Cap the exponent so a long outage cannot overflow the float.
        base = min(self.maximum, self.initial * self.multiplier ** min(self.attempt, 64))
        self.attempt += 1
        return (rng or random).uniform(base / 2, base)

    def reset(self) -> None:
        self.attempt = 0
