"""Retry timing as a pure policy object: no I/O, no sleeping, easy to test."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped.

    `delay(n)` is the wait before attempt n+1 after n failures (n >= 1): a random value
    between `base * factor**(n-1) * (1 - jitter)` and that value, never above `cap`.
    Jitter spreads thousands of sites that failed together (a network blip) over time.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    jitter: float = 0.5  # 0: exact; 1: anywhere between 0 and the exponential value

    def ceiling(self, failures: int) -> float:
        exponent = max(0, failures - 1)
        # Stop growing once over the cap: keeps the float finite for any failure count.
        value = self.base
        for _ in range(exponent):
            value *= self.factor
            if value >= self.cap:
                return self.cap
        return min(self.cap, value)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = self.ceiling(failures)
        draw = (rng or random).random()
        return ceiling * (1.0 - self.jitter * draw)
