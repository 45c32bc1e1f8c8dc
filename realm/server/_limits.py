"""Rate limits: a token bucket per tenant for calls and for generated tokens."""

from __future__ import annotations

import time

import attrs


@attrs.define
class TokenBucket:
    """``rate`` units per second, at most ``burst`` saved up.

    ``take`` refuses when the bucket is empty; ``spend`` always succeeds and may leave the
    bucket in debt (a stream already under way is not cut short; the tenant's next call waits
    until the debt is paid back).
    """

    rate: float
    burst: float
    level: float = attrs.field(default=None)
    stamp: float = attrs.field(factory=time.monotonic)

    def __attrs_post_init__(self) -> None:
        if self.level is None:
            self.level = self.burst

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: float = 1.0) -> bool:
        self._refill()
        if self.level < n:
            return False
        self.level -= n
        return True

    def available(self) -> bool:
        self._refill()
        return self.level > 0

    def spend(self, n: float = 1.0) -> None:
        self._refill()
        self.level -= n

    def seconds_until_available(self) -> float:
        """Until ``available`` (the level above 0): what a caller refused by it waits."""
        self._refill()
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate

    def seconds_until(self, n: float = 1.0) -> float:
        """Until ``take(n)`` would succeed: what a caller refused by it waits."""
        self._refill()
        return max(0.0, (n - self.level) / self.rate)
